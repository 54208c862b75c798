"""Service states and the named groups of them that the rest of gpusm asks about."""

from __future__ import annotations

from enum import StrEnum

__all__ = ["ACTIVE_STATES", "RUNNING_STATES", "State"]


class State(StrEnum):
    """Where a service is in its life cycle."""

    # Not running, holds no VRAM; the only state a start may begin from.
    STOPPED = "stopped"
    # Launched (or about to be); holding its reservation, not yet passing health.
    STARTING = "starting"
    # Passed its health check; may be dispatched to.
    HEALTHY = "healthy"
    # No new dispatch; being stopped, its VRAM not yet confirmed free.
    DRAINING = "draining"
    # Gave up after its restart budget; stays down until reset.
    FAILED = "failed"


# States in which a process or container may exist and hold VRAM.
ACTIVE_STATES: frozenset[State] = frozenset({State.STARTING, State.HEALTHY, State.DRAINING})
# States a caller may count on for work (now or soon).
RUNNING_STATES: frozenset[State] = frozenset({State.STARTING, State.HEALTHY})
