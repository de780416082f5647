"""The suite's background yields the CPU to its foreground (tests/priority.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from tests import priority

SLEEPER = (sys.executable, "-c", "import time; time.sleep(30)")


def _wait_for(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def _autogroup_nice(pid: int) -> int | None:
    path = Path(f"/proc/{pid}/autogroup")
    return int(path.read_text().split()[-1]) if path.exists() else None


def test_marked_processes_and_their_sessions_yield_and_the_rest_do_not():
    own_group = _autogroup_nice(os.getpid())
    env = {**os.environ, **priority.background_env()}
    started = [
        subprocess.Popen(SLEEPER, env=env, start_new_session=True),  # a session of its own
        subprocess.Popen(SLEEPER, env=env),  # in the suite's session
        subprocess.Popen(SLEEPER, start_new_session=True),  # unmarked: the foreground's
        subprocess.Popen(SLEEPER, env={**os.environ, **priority.background_env(
            priority.WAITS_NICE)}),  # a run that mostly waits yields less
    ]
    own, shared, unmarked, waits = started
    watcher = priority.Yielder(period=0.05)
    watcher.start()
    try:
        assert _wait_for(lambda: os.getpriority(os.PRIO_PROCESS, shared.pid) == priority.NICE)
        assert _wait_for(lambda: os.getpriority(os.PRIO_PROCESS, own.pid) == priority.NICE)
        assert _wait_for(
            lambda: os.getpriority(os.PRIO_PROCESS, waits.pid) == priority.WAITS_NICE)
        if own_group is not None:  # autogroups: the marked session yields, the suite's not
            assert _wait_for(lambda: _autogroup_nice(own.pid) == priority.NICE)
            assert _autogroup_nice(os.getpid()) == own_group
        time.sleep(0.2)  # several more scans
        assert os.getpriority(os.PRIO_PROCESS, unmarked.pid) == os.getpriority(
            os.PRIO_PROCESS, os.getpid())
        assert os.getpriority(os.PRIO_PROCESS, os.getpid()) < priority.NICE
    finally:
        watcher.stop()
        for proc in started:
            proc.kill()
            proc.wait()
