"""The suite's background yields the CPU to its foreground (tests/priority.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import priority
from tests.waiting import until

pytestmark = pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs Linux's /proc")

# A second thread started at once: nice values are per thread on Linux.
SLEEPER = (sys.executable, "-c", "import threading, time; "
           "threading.Thread(target=time.sleep, args=(30,), daemon=True).start(); time.sleep(30)")


def _threads_nice(pid: int) -> set[int]:
    return {os.getpriority(os.PRIO_PROCESS, int(t.name))
            for t in Path(f"/proc/{pid}/task").iterdir()}


OWN = os.getpriority(os.PRIO_PROCESS, 0)
NICE, WAITS = min(19, OWN + priority.NICE), min(19, OWN + priority.WAITS_NICE)


def test_marked_processes_and_their_sessions_yield_and_the_rest_do_not():
    own_group = priority.autogroup_nice(os.getpid())
    env = {**os.environ, **priority.background_env()}
    started = [
        subprocess.Popen(SLEEPER, env=env, start_new_session=True),  # a session of its own
        subprocess.Popen(SLEEPER, env=env),  # in the suite's session
        subprocess.Popen(SLEEPER, start_new_session=True),  # unmarked: the foreground's
        subprocess.Popen(SLEEPER, env={**os.environ, **priority.background_env(
            priority.WAITS_NICE)}),  # a run that mostly waits yields less
    ]
    own, shared, unmarked, waits = started
    # Their second threads exist before the watcher looks: it must find them itself.
    assert until(lambda: all(len(list(Path(f"/proc/{p.pid}/task").iterdir())) >= 2
                                 for p in (own, shared)))
    watcher = priority.Yielder(period=0.05)
    watcher.start()
    try:
        assert until(lambda: _threads_nice(shared.pid) == {NICE})  # every thread
        assert until(lambda: _threads_nice(own.pid) == {NICE})
        assert until(
            lambda: os.getpriority(os.PRIO_PROCESS, waits.pid) == WAITS)
        if own_group is not None:  # autogroups: the marked session yields, the suite's not
            assert until(lambda: priority.autogroup_nice(own.pid) == NICE)
            assert priority.autogroup_nice(os.getpid()) == own_group
        stranger = subprocess.Popen(SLEEPER, env={  # another test session's background
            **os.environ, priority.BACKGROUND_ENV: f"{priority.NICE}:{os.getpid() + 1}"})
        started.append(stranger)
        time.sleep(0.2)  # several more scans
        assert os.getpriority(os.PRIO_PROCESS, stranger.pid) == OWN
        assert os.getpriority(os.PRIO_PROCESS, unmarked.pid) == os.getpriority(
            os.PRIO_PROCESS, os.getpid())
        assert os.getpriority(os.PRIO_PROCESS, os.getpid()) == OWN
    finally:
        watcher.stop()
        for proc in started:
            proc.kill()
            proc.wait()


def test_autogroups_that_do_not_apply_read_as_none(tmp_path, monkeypatch):
    """In a container the file exists but reads empty (the CI machine's case at stop 35)."""
    monkeypatch.setattr(priority, "_PROC", tmp_path)
    (tmp_path / "7").mkdir()
    assert priority.autogroup_nice(7) is None  # no file: a kernel without autogroups
    (tmp_path / "7" / "autogroup").write_text("")
    assert priority.autogroup_nice(7) is None
    assert priority._set_autogroup(7, 10)  # nothing to yield, and nothing written
    assert (tmp_path / "7" / "autogroup").read_text() == ""
    (tmp_path / "7" / "autogroup").write_text("/autogroup-1480 nice 3\n")
    assert priority.autogroup_nice(7) == 3
