"""Engine runs that tests await, started in the background when collection ends.

Most of the suite runs in one process on one core, and some engine runs mostly wait (under the
deployment engine every SuperNode polls for work every 3 s). A test module registers such a run
with `register(name, commands)` at import; if a collected test uses the fixture `name`, the
commands start one after another in a thread as soon as collection ends, and the fixture
collects them with `finish(name)`. Tests that await one go last (conftest).

The runs queue behind each other, in the order the tests need them: one background engine run
beside the foreground fills the second core. All at once, they slowed each other and the
foreground so much that the suite took longer than without them (1,013 s against 887 s in CI).
A run that mostly waits (`waits=True`: the deployment engine's polling) does not queue.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest


@dataclass(frozen=True)
class Command:
    """One command of a background run, with environment settings of its own (a run whose
    messages are captured names its capture directory)."""

    args: Sequence[str]
    env: Mapping[str, str] = field(default_factory=dict)


# work directory -> the commands, each a CLI argument list or a Command
Commands = Callable[[Path], list[Sequence[str] | Command]]
Prepare = Callable[[tuple[str, ...], Path], None]  # what to do before a command starts

_registered: dict[str, Commands] = {}
_waits: set[str] = set()
_started: dict[str, _Runs] = {}


def register(name: str, commands: Commands, *, waits: bool = False) -> None:
    _registered[name] = commands
    if waits:
        _waits.add(name)


def awaited_by(item: pytest.Item) -> bool:
    return any(name in getattr(item, "fixturenames", ()) for name in _registered)


class _Runs:
    """The commands of one background run, one after another (they may share files); stops at
    the first that fails."""

    def __init__(self, commands: list[Sequence[str] | Command], work: Path,
                 env: Callable[[Path], dict[str, str]], prepare: Prepare,
                 after: _Runs | None = None) -> None:
        self.work, self.results = work, []
        self._current: subprocess.Popen | None = None
        self._stopped = False
        self._prepare = prepare
        self._after = after
        listed = [c if isinstance(c, Command) else Command(c) for c in commands]
        self._thread = threading.Thread(target=self._run, args=(listed, env(work)),
                                        daemon=True)
        self._thread.start()

    def _run(self, commands: list[Command], env: dict[str, str]) -> None:
        if self._after is not None:
            self._after._thread.join()  # queued behind it (its failure is its own tests')
        for i, command in enumerate(commands):
            args = tuple(command.args)
            out, err = self.work / f"cli-{i}.stdout", self.work / f"cli-{i}.stderr"
            self._prepare(args, self.work)
            with out.open("w") as fo, err.open("w") as fe:
                if self._stopped:
                    return
                self._current = subprocess.Popen(
                    [sys.executable, "-m", "simulations.cli", *args], cwd=self.work,
                    env={**env, **command.env}, stdout=fo, stderr=fe)
            code = self._current.wait()
            self.results.append(subprocess.CompletedProcess(
                list(args), code, out.read_text(), err.read_text()))
            if code != 0:
                return

    def wait(self, timeout: float) -> list[subprocess.CompletedProcess]:
        self._thread.join(timeout)
        if self._thread.is_alive():
            self.stop()
            raise TimeoutError(f"background run in {self.work} still running after {timeout} s")
        return self.results

    def stop(self) -> None:
        """End the command still running, if any (the CLI stops the processes it started)."""
        self._stopped = True
        proc = self._current
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._thread.join(60)


def start_for(items: list[pytest.Item], env: Callable[[Path], dict[str, str]],
              prepare: Prepare) -> None:
    """Start every registered run a collected test awaits, queued in the order of the first
    test that awaits each; `prepare(args, work)` runs before each command (the suite fixes a
    run's secrets there, as for a foreground run)."""
    first = {}
    for index, item in enumerate(items):
        for name in _registered:
            if name not in first and name in getattr(item, "fixturenames", ()):
                first[name] = index
    last: _Runs | None = None
    for name in sorted(first, key=first.__getitem__):
        if name in _started:
            continue
        work = Path(tempfile.mkdtemp(prefix=f"fedscore-{name}-"))
        queued = name not in _waits
        runs = _Runs(_registered[name](work), work, env, prepare, after=last if queued else None)
        _started[name] = runs
        if queued:
            last = runs


def finish(name: str, timeout: float = 900) -> tuple[list[subprocess.CompletedProcess], Path]:
    runs = _started[name]
    return runs.wait(timeout), runs.work


def stop_all() -> None:
    for runs in _started.values():
        runs.stop()
        shutil.rmtree(runs.work, ignore_errors=True)
    _started.clear()
