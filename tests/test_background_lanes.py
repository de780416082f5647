"""The background runs' lanes (tests/background.py): queued runs start in order, two at a time,
the awaited run first."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from tests.background import _Lanes
from tests.waiting import until


class _Fake:
    """Stands in for a queued background run: only its identity matters to the lanes."""


def _start(lanes: _Lanes, runs: _Fake, log: list, hold: threading.Event,
           numbers: dict | None = None) -> threading.Thread:
    def body() -> None:
        lane = lanes.acquire(runs)  # type: ignore[arg-type]
        if lane is not None:
            log.append(runs)
            if numbers is not None:
                numbers[runs] = lane
            hold.wait(5)
            lanes.release(lane)
    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    return thread


def _settle() -> None:
    time.sleep(0.05)


def test_two_lanes_in_order_and_the_awaited_run_next():
    lanes, log = _Lanes(), []
    a, b, c, d = _Fake(), _Fake(), _Fake(), _Fake()
    holds = {runs: threading.Event() for runs in (a, b, c, d)}
    for runs in (a, b, c, d):
        lanes.enqueue(runs)  # type: ignore[arg-type]
    numbers: dict = {}
    threads = [_start(lanes, runs, log, holds[runs], numbers) for runs in (d, c, b, a)]
    assert until(lambda: len(log) == 2)
    _settle()
    assert set(log) == {a, b}  # the first two queued, whoever asked first
    # Each lane has its own number (its own Ray head): two runs at once never share one.
    assert sorted(numbers.values()) == [0, 1]
    lanes.to_front(d)  # type: ignore[arg-type]  # the foreground waits for d: it goes next
    holds[a].set()
    assert until(lambda: len(log) == 3)
    assert log[2] is d
    holds[b].set()
    assert until(lambda: len(log) == 4)
    assert log[3] is c
    for hold in holds.values():
        hold.set()
    for thread in threads:
        thread.join(2)


def test_a_forgotten_run_never_starts_and_its_thread_ends():
    lanes, log, hold = _Lanes(), [], threading.Event()
    a, b, c = _Fake(), _Fake(), _Fake()
    for runs in (a, b, c):
        lanes.enqueue(runs)  # type: ignore[arg-type]
    threads = [_start(lanes, runs, log, hold) for runs in (a, b, c)]
    _settle()
    lanes.forget(c)  # type: ignore[arg-type]
    threads[2].join(2)
    assert not threads[2].is_alive()
    hold.set()
    for thread in threads[:2]:
        thread.join(2)
    assert sorted(log, key=id) == sorted([a, b], key=id)


def holds_a_process_of_its_own(work) -> None:
    """A check that starts a process in a session of its own (as a SuperLink is) and stops it
    in its `finally`."""
    import signal
    import subprocess

    child = subprocess.Popen(["sleep", "60"], start_new_session=True)
    (work / "pid").write_text(str(child.pid))
    try:
        time.sleep(60)
    finally:
        os.killpg(child.pid, signal.SIGTERM)
        child.wait()


@pytest.mark.slow  # two processes of their own
def test_a_check_ended_by_the_suite_stops_what_it_started(tmp_path):
    import signal
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    check = subprocess.Popen(
        [sys.executable, "-m", "tests.background_check",
         "tests.test_background_lanes:holds_a_process_of_its_own", str(tmp_path)],
        cwd=root, env={**os.environ, "PYTHONPATH": str(root)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert until(lambda: (tmp_path / "pid").exists(), 60), check.communicate()
    child = int((tmp_path / "pid").read_text())
    check.send_signal(signal.SIGTERM)  # as background.stop ends it
    assert check.wait(30) != 0
    assert until(lambda: not Path(f"/proc/{child}").exists(), 10)


def test_tests_awaiting_an_early_run_go_first_among_those_that_await(monkeypatch):
    """conftest's order: tests that await no run, then those awaiting an `early` run, then
    the rest, each group in collection order."""
    from types import SimpleNamespace

    from tests import background, conftest

    monkeypatch.setattr(background, "_registered", {"late": lambda work: [],
                                                    "first": lambda work: []})
    monkeypatch.setattr(background, "_early", {"first"})
    items = [SimpleNamespace(name=name, fixturenames=fixtures) for name, fixtures in [
        ("awaits_late", ["late"]), ("plain", ["tmp_path"]), ("awaits_first", ["first"]),
        ("awaits_both", ["late", "first"]), ("plain_too", [])]]
    conftest.pytest_collection_modifyitems(None, None, items)  # type: ignore[arg-type]
    assert [item.name for item in items] == ["plain", "plain_too", "awaits_first",
                                             "awaits_both", "awaits_late"]
