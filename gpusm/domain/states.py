"""Service states and the named groups of them that the rest of gpusm asks about."""

from __future__ import annotations

from enum import StrEnum

__all__ = ["ACTIVE_STATES", "RUNNING_STATES", "SETTLING_STATES", "State"]


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
    # Asked to give its VRAM back while its process stays alive; not yet verified.
    PARKING = "parking"
    # Alive, holding only its residual (e.g. a CUDA context), verified on the GPU.
    PARKED = "parked"
    # Asked to take its memory back; holding its full reservation, not yet healthy again.
    WAKING = "waking"


# States in which a process or container may exist and hold VRAM.
ACTIVE_STATES: frozenset[State] = frozenset(
    {State.STARTING, State.HEALTHY, State.DRAINING, State.PARKING, State.PARKED, State.WAKING}
)
# States a caller may count on for work (now or soon).
RUNNING_STATES: frozenset[State] = frozenset({State.STARTING, State.HEALTHY, State.WAKING})
# States in which one thread is moving the service and its memory is in flux.
SETTLING_STATES: frozenset[State] = frozenset(
    {State.STARTING, State.DRAINING, State.PARKING, State.WAKING}
)
