"""The foreground first: what runs beside the suite yields the CPU to the tests in progress.

The suite's critical path is the foreground (one process running tests one after another);
the background runs (tests/background.py) and their lanes' Ray heads are meant to fill the
second core. Linux schedules by session first when autogroups are on (the default on these
machines, /proc/sys/kernel/sched_autogroup_enabled): every session with runnable processes
gets an equal share of the CPU whatever the processes' nice values. A Ray head, the deployment
engine's SuperLink and each SuperNode start sessions of their own, so at the start of the suite
a dozen sessions split two cores and the foreground got a twelfth of them: tests that take 7 s
alone took 25 s in a quiet CI and 67 s beside other work.

Every process of a background run carries BACKGROUND_ENV=<nice> in its environment (the
run's, its lane head's and everything they start inherit it). A watcher thread gives each such
process that nice value and, when it leads a session of its own, that session's autogroup the
same: the weight of a nice-10 group is a tenth of a nice-0 one, so the lanes take what the
foreground leaves and all of it while the foreground waits. The deployment engine's runs
(`waits=True`) get nice 5 (a third): they mostly wait on 3 s polls, but each message starts a
process, and at nice 10 beside two lanes a deployed run took 429 s instead of 264 s and the
suite waited for it. Raising a nice value needs no privilege; on a machine without autogroups
only the per-process nice applies.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from pathlib import Path

log = logging.getLogger(__name__)

BACKGROUND_ENV = "FEDSCORE_TEST_BACKGROUND"
NICE = 10  # the lanes' runs and heads
WAITS_NICE = 5  # runs that mostly wait (the deployment engine's)
PERIOD = 1.0  # seconds between scans: a run's processes live for seconds to minutes
_MARKER = f"{BACKGROUND_ENV}=".encode()
_PROC = Path("/proc")


def background_env(nice: int = NICE) -> dict[str, str]:
    """What a background process's environment adds to yield to the foreground at `nice`."""
    return {BACKGROUND_ENV: str(nice)}


def _stat(pid: int) -> tuple[int, int] | None:
    """(session ID, start time) of `pid`: fields 6 and 22 of /proc/PID/stat."""
    try:
        stat = (_PROC / str(pid) / "stat").read_bytes()
    except OSError:
        return None
    fields = stat.rsplit(b")", 1)[1].split()  # after the parenthesised name: field 3 on
    return int(fields[3]), int(fields[19])


def _marked(pid: int) -> int | None:
    """The nice value `pid`'s environment asks for, if it is a background process."""
    try:
        environ = (_PROC / str(pid) / "environ").read_bytes()
    except OSError:  # gone, or not ours
        return None
    for entry in environ.split(b"\0"):
        if entry.startswith(_MARKER):
            value = entry.removeprefix(_MARKER)
            return int(value) if value.isdigit() and int(value) <= 19 else None
    return None


def _yield(pid: int, nice: int, session: int, own_session: int) -> None:
    with contextlib.suppress(OSError):
        if os.getpriority(os.PRIO_PROCESS, pid) < nice:
            os.setpriority(os.PRIO_PROCESS, pid, nice)
    # The autogroup belongs to the session: never the suite's own, which holds the foreground.
    if session == pid and session != own_session:
        with contextlib.suppress(OSError):
            (_PROC / str(pid) / "autogroup").write_text(str(nice))


class Yielder:
    """The watcher thread: start() at collection's end, stop() when the session ends."""

    def __init__(self, period: float = PERIOD) -> None:
        self._period = period
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._done: set[tuple[int, int]] = set()  # (pid, start time): pids are reused

    def start(self) -> None:
        if self._thread is None and _PROC.is_dir():
            self._thread = threading.Thread(target=self._watch, daemon=True,
                                            name="yield-background")
            self._thread.start()

    def _watch(self) -> None:
        own = _stat(os.getpid())
        uid = os.getuid()
        while own is not None and not self._stop.wait(self._period):
            for entry in _PROC.iterdir():
                if not entry.name.isdigit():
                    continue
                pid = int(entry.name)
                stat = _stat(pid)
                if stat is None or (pid, stat[1]) in self._done:
                    continue
                try:
                    if entry.stat().st_uid != uid:
                        continue
                except OSError:
                    continue
                # Not cached when unmarked: a child forked from the suite is marked at its exec.
                nice = _marked(pid)
                if nice is not None:
                    _yield(pid, nice, stat[0], own[0])
                    self._done.add((pid, stat[1]))

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)


YIELDER = Yielder()
