"""The background runs' lanes (tests/background.py): queued runs start in order, one at a time
while the foreground runs tests, two at a time while it waits, the awaited run first."""

from __future__ import annotations

import threading
import time

from tests.background import _Lanes


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


def test_one_lane_in_order_then_two_while_the_foreground_waits():
    lanes, log, hold = _Lanes(), [], threading.Event()
    a, b, c = _Fake(), _Fake(), _Fake()
    for runs in (a, b, c):
        lanes.enqueue(runs)  # type: ignore[arg-type]
    numbers: dict = {}
    threads = [_start(lanes, runs, log, hold, numbers) for runs in (c, b, a)]
    _settle()
    assert log == [a]  # one lane: the first queued, whatever thread asked first
    with lanes.foreground_waits_for(c):  # type: ignore[arg-type]
        _settle()
        assert log == [a, c]  # a second lane, and the awaited run jumps the queue
        # Each lane has its own number (its own Ray head): two runs at once never share one.
        assert sorted(numbers.values()) == [0, 1]
        hold.set()
        for thread in threads:
            thread.join(2)
    assert log == [a, c, b]


def test_a_forgotten_run_never_starts_and_its_thread_ends():
    lanes, log, hold = _Lanes(), [], threading.Event()
    a, b = _Fake(), _Fake()
    lanes.enqueue(a)  # type: ignore[arg-type]
    lanes.enqueue(b)  # type: ignore[arg-type]
    first, second = _start(lanes, a, log, hold), _start(lanes, b, log, hold)
    _settle()
    lanes.forget(b)  # type: ignore[arg-type]
    second.join(2)
    assert not second.is_alive()
    hold.set()
    first.join(2)
    assert log == [a]
