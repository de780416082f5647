"""`fedscore ARGS` inside the test process, for commands that start no engine.

A `python -m simulations.cli` process spends several seconds importing torch, Opacus and
Flower before it reads its arguments; the test process has them imported already. What a
subprocess gives a command for free, this gives it explicitly and takes back afterwards: its
own environment, working directory, standard streams, root logging and warning
filters. The engine is barred: a command that would start one fails instead.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import subprocess
import traceback
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from unittest import mock

ENGINE_BARRED = "the engine is barred here: this command was expected to stop before it"


def run(args: Sequence[str], *, cwd: Path, env: Mapping[str, str], stdin: str = ""
        ) -> subprocess.CompletedProcess:
    from simulations.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    with _isolated(cwd, env), _engine_barred(), contextlib.redirect_stdout(out), \
            contextlib.redirect_stderr(err), mock.patch("sys.stdin", io.StringIO(stdin)):
        try:
            code = main(list(args))
        except SystemExit as exc:  # argparse: usage errors and --help
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:  # what the interpreter would print for an uncaught error
            traceback.print_exc()
            code = 1
    return subprocess.CompletedProcess(["fedscore", *args], code, out.getvalue(),
                                       err.getvalue())


@contextlib.contextmanager
def _isolated(cwd: Path, env: Mapping[str, str]) -> Iterator[None]:
    saved_env, saved_cwd = dict(os.environ), Path.cwd()
    root = logging.getLogger()
    saved_root = (root.level, list(root.handlers))
    named = {n: logging.getLogger(n).level for n in ("flwr", "ray")}
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    try:
        with warnings.catch_warnings():
            yield
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
        root.setLevel(saved_root[0])
        root.handlers[:] = saved_root[1]
        for name, level in named.items():
            logging.getLogger(name).setLevel(level)


@contextlib.contextmanager
def _engine_barred() -> Iterator[None]:
    # Every engine a command can start goes through Flower's simulation entry or Ray.
    def refuse(*_args: object, **_kwargs: object) -> None:
        raise AssertionError(ENGINE_BARRED)

    with mock.patch("flwr.simulation.run_simulation", refuse), mock.patch("ray.init", refuse):
        yield
