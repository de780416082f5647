"""`python -m tests.background_check MODULE:FUNCTION WORK`: one check of the suite run beside
it (tests/background.py `register_check`). Exit 0 if the function returns; 1 with the traceback
on stderr if it raises."""

from __future__ import annotations

import importlib
import signal
import sys
import traceback
from pathlib import Path


def _stop(signum: int, frame: object) -> None:
    # The suite ends a check it no longer waits for with SIGTERM (background.stop): unwind, so
    # that the check's own `finally` stops what it started (a SuperLink and its SuperNodes live
    # in sessions of their own and outlived a check killed outright).
    raise SystemExit(128 + signum)


def main(target: str, work: str) -> int:
    signal.signal(signal.SIGTERM, _stop)
    module, _, name = target.partition(":")
    check = getattr(importlib.import_module(module), name)
    Path(work).mkdir(parents=True, exist_ok=True)
    try:
        check(Path(work))
    except BaseException:  # any failure, an assertion or not, is the check's result
        traceback.print_exc()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
