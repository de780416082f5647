"""Polling for a condition in tests: one loop for every test that waits on another process."""

from __future__ import annotations

import time
from collections.abc import Callable


def until(predicate: Callable[[], object], timeout: float = 10.0, *,
          every: float = 0.05) -> bool:
    """Whether `predicate()` became true within `timeout` seconds, asked every `every`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(every)
    return bool(predicate())
