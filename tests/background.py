"""Engine runs that tests await, started in the background when collection ends.

Most of the suite runs in one process on one core, and some engine runs mostly wait (under the
deployment engine every SuperNode polls for work every 3 s). A test module registers such a run
with `register(name, commands)` at import; if a collected test uses the fixture `name`, the
commands start one after another in a thread as soon as collection ends, and the fixture
collects them with `finish(name)`. Tests that await one go last (conftest).

The runs queue for two lanes, in the order the tests need them; the run the foreground waits
for goes to the front of the queue. Every background process yields the CPU to the foreground
(tests/priority.py), so the lanes take what the foreground leaves: two runs fill the gaps one
leaves while it starts processes or waits for Ray. (Before the background yielded, all runs at
once slowed the foreground so much that the suite took longer than without them, 1,013 s
against 887 s in CI, and one lane beside the foreground was the best.) A run that mostly waits
(`waits=True`: the deployment engine's polling) takes no lane.
"""

from __future__ import annotations

import inspect
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import pytest

from tests import priority


@dataclass(frozen=True)
class Command:
    """One command of a background run, with environment settings of its own (a run whose
    messages are captured names its capture directory)."""

    args: Sequence[str]
    env: Mapping[str, str] = field(default_factory=dict)
    # The exit code that lets the next command start (a run stopped on purpose exits 2).
    expect: int = 0
    # Called with the work directory before the command starts (a check, or a copy of what
    # the previous command left); an exception ends the run as a failed command would.
    before: Callable[[Path], None] | None = None
    # A program of its own instead of `python -m simulations.cli ARGS` (a script using the
    # Python API): not prepared as a run.
    program: Sequence[str] | None = None
    # A process of its own, never forked from the lane's zygote (tests/zygote.py): a run
    # compared with another the zygote forked, which shares its hash seed.
    fresh: bool = False


# work directory -> the commands, each a CLI argument list or a Command
Commands = Callable[[Path], list[Sequence[str] | Command]]
Prepare = Callable[[tuple[str, ...], Path], None]  # what to do before a command starts
LaneEnv = Callable[[int], dict[str, str]]  # a lane's own settings (its Ray head), by number


class Launch(Protocol):
    """Starts `python -m simulations.cli ARGS` for lane `lane` (None: no lane): a process of
    its own, or one forked from the lane's zygote (tests/zygote.py)."""

    def __call__(self, lane: int | None, args: Sequence[str], *, cwd: Path,
                 env: Mapping[str, str], stdin: int, stdout: int, stderr: int
                 ) -> Waitable: ...


class Waitable(Protocol):
    pid: int

    def poll(self) -> int | None: ...
    def wait(self, timeout: float | None = None) -> int: ...
    def terminate(self) -> None: ...
    def kill(self) -> None: ...


def _own_process(lane: int | None, args: Sequence[str], *, cwd: Path, env: Mapping[str, str],
                 stdin: int, stdout: int, stderr: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "simulations.cli", *args], cwd=cwd,
                            env=dict(env), stdin=stdin, stdout=stdout, stderr=stderr)

_registered: dict[str, Commands] = {}
_waits: set[str] = set()
_early: set[str] = set()
_started: dict[str, _Runs] = {}
# (work directory name, command index, seconds from collection to its start, seconds it took,
# exit code): what the suite's summary prints, to show where the end of the suite waits.
_timings: list[tuple[str, int, float, float, int]] = []
_EPOCH = time.monotonic()
_ROOT = Path(__file__).resolve().parents[1]


def register(name: str, commands: Commands, *, waits: bool = False, early: bool = False
             ) -> None:
    """`early`: the tests that await the run have work of their own to do after it (a served
    session on a private Ray): they go first among the tests that await runs,
    and so the run goes first in the lanes' queue, so that their work overlaps the lanes'
    instead of following it on one core at the suite's end (conftest)."""
    _registered[name] = commands
    if waits:
        _waits.add(name)
    if early:
        _early.add(name)


def register_check(name: str, check: Callable[[Path], None], *, waits: bool = False) -> None:
    """A test's body run in a process of its own beside the suite, like a run: `check` (a
    module-level function of tests/) gets an empty work directory and fails by raising. For
    bodies that mostly wait (SuperNodes polling) or start an engine of their own; the test
    that awaits it by fixture `name` fails with the check's traceback (`passed`)."""
    # By file: pytest may have imported the test module under its bare name.
    target = f"tests.{Path(inspect.getfile(check)).stem}:{check.__qualname__}"
    register(name, lambda work: [Command((), env={"PYTHONPATH": str(_ROOT)}, program=(
        sys.executable, "-m", "tests.background_check", target, str(work / "check")))],
        waits=waits)


def passed(name: str, timeout: float = 900) -> None:
    """Await the check `name` (register_check) and fail as it failed."""
    (proc,), work = finish(name, timeout)
    if proc.returncode != 0:
        pytest.fail(f"{name} (run beside the suite in {work}) failed:\n{proc.stdout}"
                    f"{proc.stderr}", pytrace=False)


def awaited_by(item: pytest.Item) -> bool:
    return any(name in getattr(item, "fixturenames", ()) for name in _registered)


def awaits_early(item: pytest.Item) -> bool:
    """Whether `item` awaits a run registered `early`."""
    return any(name in getattr(item, "fixturenames", ()) for name in _early)


class _Lanes:
    """Who may run now: the queued runs in order, one per free lane; the awaited run first."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._queue: list[_Runs] = []
        self._free = [0, 1]  # the lanes' numbers (each lane has a Ray head of its own)

    def enqueue(self, runs: _Runs) -> None:
        with self._cond:
            self._queue.append(runs)

    def acquire(self, runs: _Runs) -> int | None:
        """Wait for `runs`' turn and take a lane: its number, or None if the run was taken
        off the queue."""
        with self._cond:
            self._cond.wait_for(lambda: runs not in self._queue or (
                bool(self._free) and self._queue[0] is runs))
            if runs not in self._queue:
                return None
            self._queue.pop(0)
            self._cond.notify_all()
            return self._free.pop(0)

    def release(self, lane: int) -> None:
        with self._cond:
            self._free.append(lane)
            self._cond.notify_all()

    def forget(self, runs: _Runs) -> None:
        with self._cond:
            if runs in self._queue:
                self._queue.remove(runs)
                self._cond.notify_all()

    def to_front(self, runs: _Runs) -> None:
        """The foreground waits for `runs`: it goes next."""
        with self._cond:
            if runs in self._queue:
                self._queue.remove(runs)
                self._queue.insert(0, runs)
                self._cond.notify_all()


_LANES = _Lanes()


class _Runs:
    """The commands of one background run, one after another (they may share files); stops at
    the first that fails. A queued run takes a lane (_Lanes) for all its commands."""

    def __init__(self, commands: list[Sequence[str] | Command], work: Path,
                 env: Callable[[Path], dict[str, str]], prepare: Prepare,
                 queued: bool, lane_env: LaneEnv, launch: Launch) -> None:
        self.work, self.results = work, []
        self._current: Waitable | None = None
        self._launch = launch
        self._stopped = False
        self._prepare = prepare
        self._lane_env = lane_env
        self.queued = queued
        # How much it yields to the foreground (tests/priority.py): a run that mostly waits
        # on the deployment engine's polls less than the lanes' runs.
        self._nice = priority.NICE if queued else priority.WAITS_NICE
        if queued:
            _LANES.enqueue(self)
        listed = [c if isinstance(c, Command) else Command(c) for c in commands]
        self._thread = threading.Thread(target=self._run_in_lane, args=(listed, env(work)),
                                        daemon=True)
        self._thread.start()

    def _run_in_lane(self, commands: list[Command], env: dict[str, str]) -> None:
        if not self.queued:
            self._run(commands, env, None)
            return
        lane = _LANES.acquire(self)
        if lane is None:
            return
        try:
            self._run(commands, {**env, **self._lane_env(lane)}, lane)
        finally:
            _LANES.release(lane)

    def _run(self, commands: list[Command], env: dict[str, str], lane: int | None) -> None:
        for i, command in enumerate(commands):
            args = tuple(command.args)
            out, err = self.work / f"cli-{i}.stdout", self.work / f"cli-{i}.stderr"
            argv = list(command.program or ())
            if command.program is None:
                self._prepare(args, self.work)
            if command.before is not None:
                try:
                    command.before(self.work)
                except Exception as exc:  # reported to the test that awaits this run
                    self.results.append(subprocess.CompletedProcess(
                        list(args), -1, "", f"before this command: {exc!r}"))
                    return
            with out.open("w") as fo, err.open("w") as fe, open(os.devnull, "rb") as null:
                if self._stopped:
                    return
                full = {**env, **command.env, **priority.background_env(self._nice)}
                launch = _own_process if command.fresh else self._launch
                self._current = (
                    launch(lane, args, cwd=self.work, env=full, stdin=null.fileno(),
                           stdout=fo.fileno(), stderr=fe.fileno())
                    if command.program is None else
                    subprocess.Popen(argv, cwd=self.work, env=full, stdout=fo, stderr=fe))
            (self.work / f"cli-{i}.pid").write_text(str(self._current.pid))
            started = time.monotonic()
            code = self._current.wait()
            _timings.append((self.work.name, i, started - _EPOCH,
                             time.monotonic() - started, code))
            self.results.append(subprocess.CompletedProcess(
                list(args), code, out.read_text(), err.read_text()))
            if code != command.expect:
                return

    def wait(self, timeout: float) -> list[subprocess.CompletedProcess]:
        if self._thread.is_alive():
            _LANES.to_front(self)
            self._thread.join(timeout)
        if self._thread.is_alive():
            self.stop()
            raise TimeoutError(f"background run in {self.work} still running after {timeout} s")
        return self.results

    def stop(self) -> None:
        """End the command still running, if any (the CLI stops the processes it started)."""
        self._stopped = True
        _LANES.forget(self)  # a run still queued never starts
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
              prepare: Prepare, lane_env: LaneEnv, launch: Launch = _own_process) -> None:
    """Start every registered run a collected test awaits, queued in the order of the first
    test that awaits each; `prepare(args, work)` runs before each command (the suite fixes a
    run's secrets there, as for a foreground run); a run in lane n adds `lane_env(n)` to its
    environment (the suite's lanes each join a Ray head of their own) and `launch` starts its
    fedscore commands."""
    first = {}
    for index, item in enumerate(items):
        for name in _registered:
            if name not in first and name in getattr(item, "fixturenames", ()):
                first[name] = index
    for name in sorted(first, key=first.__getitem__):
        if name in _started:
            continue
        work = Path(tempfile.mkdtemp(prefix=f"fedscore-{name}-"))
        _started[name] = _Runs(_registered[name](work), work, env, prepare,
                               queued=name not in _waits, lane_env=lane_env, launch=launch)


def finish(name: str, timeout: float = 900) -> tuple[list[subprocess.CompletedProcess], Path]:
    runs = _started[name]
    return runs.wait(timeout), runs.work


def pids(work: Path) -> list[int]:
    """The process ID of each command of the run in `work` that started, in order (what a
    lock or a log names)."""
    return [int((work / f"cli-{i}.pid").read_text())
            for i in range(len(list(work.glob("cli-*.pid"))))]


def stop_all() -> None:
    for runs in _started.values():
        runs.stop()
        shutil.rmtree(runs.work, ignore_errors=True)
    _started.clear()


def timings() -> list[str]:
    """One line per background command that ran: when it started (seconds after the module
    loaded, about when collection began) and how long it took."""
    return [f"{name} command {i}: started at {start:.0f} s, took {took:.0f} s, exit {code}"
            for name, i, start, took, code in _timings]
