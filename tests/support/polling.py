"""The one poller: wait until a condition holds, or fail naming what never happened."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

__all__ = ["eventually"]

T = TypeVar("T")

# Short first gaps catch fast changes; the cap keeps a slow wait from burning a core.
_FIRST_GAP_S = 0.005
_MAX_GAP_S = 0.1


def eventually(check: Callable[[], T], timeout_s: float = 10.0, what: str = "condition") -> T:
    """Call ``check`` until it returns something truthy, and return that.

    Fails the test with ``what`` after ``timeout_s`` seconds. Exceptions from
    ``check`` propagate: a check that can fail transiently must catch its own errors.
    """
    deadline = time.monotonic() + timeout_s
    gap = _FIRST_GAP_S
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout_s:g}s waiting for {what}")
        time.sleep(gap)
        gap = min(gap * 1.5, _MAX_GAP_S)
