"""The foreground first: what runs beside the suite yields the CPU to the tests in progress.

The suite's critical path is the foreground (one process running tests one after another);
the background runs (tests/background.py) and their lanes' Ray heads are meant to fill the
second core. Linux schedules by session first when autogroups are on (the default on these
machines, /proc/sys/kernel/sched_autogroup_enabled): every session with runnable processes
gets an equal share of the CPU whatever the processes' nice values. A Ray head, the deployment
engine's SuperLink and each SuperNode start sessions of their own, so at the start of the suite
a dozen sessions split two cores and the foreground got a twelfth of them: tests that take 7 s
alone took 25 s in a quiet CI and 67 s beside other work.

Every process of a background run carries BACKGROUND_ENV=<nice>:<the suite's pid> in its
environment (the run's, its lane head's and everything they start inherit it). The suite's
watcher thread gives each of its own such processes (every thread: nice values are per thread)
that much more than the suite's own nice value and, when it belongs to a session other than
the suite's, that session's autogroup the same (retried at the next scan if the kernel
refuses, as it does more often than once per 100 ms without CAP_SYS_ADMIN). The weight of a
nice-10 group is a tenth of a nice-0 one, so the lanes take what the foreground leaves, and
all of it while the foreground waits. The deployment engine's runs (`waits=True`) get nice 5
(a third): they mostly wait on 3 s polls, but each message starts a process, and at nice 10
beside two lanes a deployed run took 429 s instead of 264 s and the suite waited for it.
Raising a nice value needs no privilege; on a machine without autogroups only the per-thread
nice applies.
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
PERIOD = 0.5  # seconds between scans: a run's processes live for seconds to minutes
# Seconds after its start by which a process has exec'd (a child forked from the suite carries
# the suite's environment until then): an unmarked process this old is settled as not ours.
SETTLE = 2.0
_TICKS = os.sysconf("SC_CLK_TCK")
_MARKER = f"{BACKGROUND_ENV}=".encode()
_PROC = Path("/proc")


def background_env(nice: int = NICE) -> dict[str, str]:
    """What a background process's environment adds to yield to the foreground at `nice`:
    the value names this process (the suite), whose watcher alone acts on it, so that two test
    sessions at once (a developer's fast loop beside a full suite) never renice each other."""
    return {BACKGROUND_ENV: f"{nice}:{os.getpid()}"}


def _stat(pid: int) -> tuple[int, int] | None:
    """(session ID, start time) of `pid`: fields 6 and 22 of /proc/PID/stat."""
    try:
        stat = (_PROC / str(pid) / "stat").read_bytes()
    except OSError:
        return None
    fields = stat.rsplit(b")", 1)[1].split()  # after the parenthesised name: field 3 on
    return int(fields[3]), int(fields[19])


def _uptime() -> float:
    """Seconds since boot, the clock of a process's start time in /proc/PID/stat."""
    return float((_PROC / "uptime").read_text().split()[0])


def _marked(pid: int) -> int | None:
    """The nice value `pid`'s environment asks for, if it is a background process of this
    suite."""
    try:
        environ = (_PROC / str(pid) / "environ").read_bytes()
    except OSError:  # gone, or not ours
        return None
    for entry in environ.split(b"\0"):
        if entry.startswith(_MARKER):
            nice, _, owner = entry.removeprefix(_MARKER).partition(b":")
            if owner != str(os.getpid()).encode() or not nice.isdigit():
                return None
            return min(int(nice), 19)
    return None


def _renice_threads(pid: int, nice: int) -> None:
    """Every thread of `pid` at `nice` at least: on Linux a nice value is per thread, and a
    thread started before the watcher saw the process (or a child it forks) would keep 0."""
    try:
        tasks = [int(t.name) for t in (_PROC / str(pid) / "task").iterdir()]
    except OSError:
        tasks = [pid]
    for tid in tasks:
        with contextlib.suppress(OSError):
            if os.getpriority(os.PRIO_PROCESS, tid) < nice:
                os.setpriority(os.PRIO_PROCESS, tid, nice)


def autogroup_nice(pid: int) -> int | None:
    """The nice value of `pid`'s autogroup, or None where autogroups do not apply: no such file
    (a kernel without them), or an empty one (the process sits in a cgroup of its own, as in
    a container: the kernel then schedules by that cgroup and the file reads nothing)."""
    try:
        words = (_PROC / str(pid) / "autogroup").read_text().split()
    except OSError:
        return None
    return int(words[-1]) if len(words) >= 3 and words[-2] == "nice" else None


def _set_autogroup(pid: int, nice: int) -> bool:
    """The autogroup of `pid`'s session at `nice`; False if the kernel refused (without
    CAP_SYS_ADMIN it takes one such write per 100 ms on the whole machine: EAGAIN)."""
    if autogroup_nice(pid) is None:  # no autogroup to yield: the per-thread nice is all
        return True
    try:
        (_PROC / str(pid) / "autogroup").write_text(str(nice))
    except FileNotFoundError:  # no autogroups here: the per-thread nice is all there is
        return True
    except OSError:
        return False
    return True


class Yielder:
    """The watcher thread: start() at collection's end, stop() when the session ends."""

    def __init__(self, period: float = PERIOD) -> None:
        self._period = period
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # (pid, start time, session) of the processes never read again: yielded, or settled as
        # not ours (pids are reused, and a process may lead a session later). Reading every
        # process's environment at every scan cost 5 ms a scan at 70 processes, and the suite
        # runs several hundred.
        self._settled: set[tuple[int, int, int]] = set()
        self._groups: set[int] = set()  # sessions whose autogroup yields already
        self._warned = False
        self._base = os.getpriority(os.PRIO_PROCESS, 0)  # a suite run under `nice` keeps its

    def start(self) -> None:
        if self._thread is None and _PROC.is_dir():
            self._thread = threading.Thread(target=self._watch, daemon=True,
                                            name="yield-background")
            self._thread.start()

    def _watch(self) -> None:
        own = _stat(os.getpid())
        if own is None:
            return
        while not self._stop.wait(self._period):
            try:
                self._scan(own[0])
            except Exception:  # a scan must never end the watcher; the next one retries
                log.exception("scanning for background processes failed")

    def _scan(self, own_session: int) -> None:
        me, uid = os.getpid(), os.getuid()
        settled_before = _uptime() - SETTLE
        for entry in _PROC.iterdir():
            if not entry.name.isdigit() or int(entry.name) == me:
                continue
            pid = int(entry.name)
            stat = _stat(pid)
            if stat is None:
                continue
            key = (pid, stat[1], stat[0])
            if key in self._settled:
                continue
            try:
                theirs = entry.stat().st_uid != uid
            except OSError:
                continue
            nice = None if theirs else _marked(pid)
            if nice is None:
                # A child forked from the suite is marked at its exec: settled once it is old.
                if theirs or stat[1] / _TICKS < settled_before:
                    self._settled.add(key)
            elif self._yield(pid, min(19, self._base + nice), stat[0], own_session):
                self._settled.add(key)

    def _yield(self, pid: int, nice: int, session: int, own_session: int) -> bool:
        """Renice `pid` and its session's autogroup (never the suite's own, which holds the
        foreground); False to try again at the next scan."""
        _renice_threads(pid, nice)
        if session == own_session or session in self._groups:
            return True
        if not _set_autogroup(pid, nice):
            if not self._warned:
                log.warning("the kernel refused an autogroup nice value (retried each scan): "
                            "background runs may slow the suite's foreground")
                self._warned = True
            return False
        self._groups.add(session)
        return True

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)


YIELDER = Yielder()
