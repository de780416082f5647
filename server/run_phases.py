"""`phases.json` in a run directory: which phases of the run have finished, and what a later
phase needs from an earlier one that is not in the run's other files.

Why: the checkpoint covers training only and is deleted once the scores are written, so a run
killed during its baselines or its audit could not be resumed ("never finished a training
round") although its federated results were complete. `fedscore run --resume` now continues at
the first unfinished phase: the federated part (align, train, score) from its checkpoint, the
rest (baselines, audit, report) from here.

Written atomically (temporary file, fsync, rename): a kill leaves the old record or the new
one, never half of one. It holds metrics only (the baselines' AUCs and histories, the audit's
bounds), nothing about a person.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from crypto.private_files import write_atomic

log = logging.getLogger(__name__)

PHASES_FILE = "phases.json"
# In run order. align/train/score are the authority's federated part; the rest the runner's.
PHASES = ("align", "train", "score", "baselines", "audit", "report")
FAIL_AT_PHASE = "FEDSCORE_FAIL_AT_PHASE"


class InjectedFailureError(RuntimeError):
    """A crash on purpose (FEDSCORE_FAIL_AT_PHASE), for resume tests."""


def read(run_dir: Path) -> dict:
    path = Path(run_dir) / PHASES_FILE
    if not path.exists():
        return {"finished": [], "saved": {}}
    record = json.loads(path.read_text())
    record.setdefault("finished", [])
    record.setdefault("saved", {})
    return record


def finished(run_dir: Path) -> list[str]:
    return list(read(run_dir)["finished"])


def is_finished(run_dir: Path, phase: str) -> bool:
    return phase in read(run_dir)["finished"]


def saved(run_dir: Path, phase: str) -> object | None:
    """What `finish(run_dir, phase, result)` kept for a resumed run, or None."""
    return read(run_dir)["saved"].get(phase)


def finish(run_dir: Path, phase: str, result: object | None = None) -> None:
    """Record `phase` as finished (with `result`, JSON, for the phases after it)."""
    if phase not in PHASES:
        raise ValueError(f"unknown run phase {phase!r}; choose one of {', '.join(PHASES)}")
    record = read(run_dir)
    if phase not in record["finished"]:
        record["finished"].append(phase)
    if result is not None:
        record["saved"][phase] = result
    write_atomic(Path(run_dir) / PHASES_FILE, json.dumps(record, allow_nan=True) + "\n",
                 public=True)
    log.info("run phase %s finished", phase)


def first_unfinished(run_dir: Path) -> str | None:
    done = set(finished(run_dir))
    return next((p for p in PHASES if p not in done), None)


def federated_done(run_dir: Path) -> bool:
    """Whether the authority's federated part finished: its scores and authority.json are
    written (authority.json is written last, after the scores, before the checkpoint goes)."""
    return is_finished(run_dir, "score") or (Path(run_dir) / "authority.json").exists()


def maybe_fail(phase: str) -> None:
    """Crash on purpose as `phase` starts: `FEDSCORE_FAIL_AT_PHASE=baselines` (resume tests)."""
    if os.environ.get(FAIL_AT_PHASE) == phase:
        raise InjectedFailureError(f"injected failure as phase {phase} starts ({FAIL_AT_PHASE})")


class PhaseTimer:
    """Wall time per phase of one run (metrics.json's `seconds`), reported to the progress
    display as it goes: `start(name)` ... `stop()` around a stretch of code, or
    `timer(name, fn, *args)` around one call."""

    def __init__(self, progress: Callable[..., None] | None) -> None:
        self.progress = progress
        self.seconds: dict[str, float] = {}
        self._name: str | None = None
        self._t = 0.0

    def start(self, name: str) -> None:
        self.stop()
        self._name, self._t = name, time.perf_counter()
        if self.progress:
            self.progress(name, 0, None)
        log.info("phase %s", name)

    def stop(self) -> None:
        if self._name is not None:
            self.seconds[self._name] = round(time.perf_counter() - self._t, 3)
            if self.progress:
                self.progress(self._name, 1, 1)
        self._name = None

    def __call__(self, name: str, fn: Callable[..., Any], *args: Any) -> Any:
        self.start(name)
        value = fn(*args)
        self.stop()
        return value
