"""Named fault-injection points at every intent/fact boundary.

With ``GPUSM_CRASH_AT=<point>`` in the environment the coordinator ends itself with
``os._exit(CRASH_EXIT_CODE)`` the first time it reaches that point, exactly as a power
cut or ``kill -9`` would leave it: the intent is committed, the fact is not.
``GPUSM_CRASH_AT=<point>:<n>`` crashes at the n-th time instead.
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from typing import Final

__all__ = ["CRASH_EXIT_CODE", "CRASH_POINTS", "RELOAD_CRASH_POINTS", "crash_point"]

CRASH_EXIT_CODE: Final = 77

CRASH_POINTS: Final[tuple[str, ...]] = (
    # StartRequested committed, nothing spawned yet.
    "after_start_requested",
    # Process or container exists, ProcessLaunched not yet committed.
    "after_spawn",
    # ProcessLaunched committed, health wait not begun.
    "after_launched",
    # Health passed, HealthPassed not yet committed.
    "before_health_passed",
    # DrainRequested / Evicted / Preempted committed, no signal sent yet.
    "after_drain_requested",
    # The stop signal was sent and the process is gone, Stopped not yet committed.
    "after_signal",
    # A victim was stopped for a request, the winner not yet started.
    "mid_preemption",
    # ParkRequested committed, no sleep request sent yet (the process holds its memory).
    "after_park_requested",
    # WakeRequested committed, no wake request sent yet (the process is still parked).
    "after_wake_requested",
)

# Reached only by a config reload (the crash sweep's scenario does not reload; a test
# of its own crashes there).
RELOAD_CRASH_POINTS: Final[tuple[str, ...]] = (
    # ConfigReloaded committed, the services it made stale not yet stopped.
    "after_config_reloaded",
)

_seen: Counter[str] = Counter()


def crash_point(name: str) -> None:
    """Die here if ``GPUSM_CRASH_AT`` names this point (and its count is reached)."""
    wanted = os.environ.get("GPUSM_CRASH_AT")
    if not wanted:
        return
    point, _, nth = wanted.partition(":")
    if point != name:
        return
    _seen[name] += 1
    if _seen[name] >= (int(nth) if nth.isdigit() else 1):
        sys.stderr.write(f"gpusm: crash point {name} reached; exiting\n")
        sys.stderr.flush()
        os._exit(CRASH_EXIT_CODE)
