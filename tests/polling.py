"""The one way the tests wait for something to happen: poll a check until it holds, or fail naming it."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(what: str, check: Callable[[], T | None], timeout: float = 120, interval: float = 0.2) -> T:
    """Calls ``check`` until it returns something truthy and returns that; after ``timeout`` seconds fails with
    ``what`` and the last value seen. A deadline, not a sleep: under load it waits longer, never flakes sooner."""
    deadline = time.monotonic() + timeout
    while True:
        last = check()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; last seen: {last!r}")
        time.sleep(interval)
