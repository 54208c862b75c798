"""Events: what happened, in the past tense, as frozen dataclasses.

A service event carries the trigger that produced it; folding a stream's events through
the state machine rebuilds the service. Coordinator events (phase changes, recovery
notes) live on the ``coordinator`` stream and change no service state.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, ClassVar

__all__ = [
    "COORDINATOR_STREAM",
    "ConfigReloaded",
    "EVENT_TYPES",
    "Adopted",
    "Crashed",
    "DrainRequested",
    "Event",
    "Evicted",
    "GaveUp",
    "HealthPassed",
    "LeaseExpired",
    "LeaseReleased",
    "LeaseRevoked",
    "NewEvent",
    "OrphanReaped",
    "ParkFailed",
    "ParkRequested",
    "Parked",
    "PhaseEntered",
    "Preempted",
    "PrefetchAbandoned",
    "AdmissionRefused",
    "ProxiedRequest",
    "ProcessLaunched",
    "RecordedEvent",
    "Recovered",
    "Reset",
    "ServiceEvent",
    "StartFailed",
    "StartRequested",
    "Stopped",
    "VramObserved",
    "WakeFailed",
    "WakeRequested",
    "Woken",
]

COORDINATOR_STREAM = "coordinator"

JsonMap = Mapping[str, Any]


@dataclass(frozen=True, kw_only=True)
class Event:
    """Something that happened, with JSON-serialisable details in ``data``."""

    data: JsonMap = field(default_factory=dict)

    @classmethod
    def type_name(cls) -> str:
        """The name stored in the ``type`` column (the class name)."""
        return cls.__name__


@dataclass(frozen=True, kw_only=True)
class ServiceEvent(Event):
    """An event on a service's stream; ``TRIGGER`` names the state-machine trigger it fires."""

    TRIGGER: ClassVar[str]


class StartRequested(ServiceEvent):
    """The coordinator decided to start the service (committed before the spawn)."""

    TRIGGER = "request_start"


class ProcessLaunched(ServiceEvent):
    """The process or container exists; data holds pid + create_time or container id."""

    TRIGGER = "launched"


class HealthPassed(ServiceEvent):
    """The health check passed: the service is ready."""

    TRIGGER = "health_passed"


class StartFailed(ServiceEvent):
    """The start did not succeed (launch error, early exit, health deadline)."""

    TRIGGER = "start_failed"


class DrainRequested(ServiceEvent):
    """The coordinator decided to stop the service; data says why and for whom."""

    TRIGGER = "drain"


class Evicted(ServiceEvent):
    """The service was idle and its room was needed (a drain with a named beneficiary)."""

    TRIGGER = "drain"


class Preempted(ServiceEvent):
    """A higher-priority request took the room of this in-use service (a drain)."""

    TRIGGER = "drain"


class Stopped(ServiceEvent):
    """The service exited and its VRAM was seen free."""

    TRIGGER = "stopped"


class Crashed(ServiceEvent):
    """The service died without being asked to, or was found dead on recovery."""

    TRIGGER = "crashed"


class GaveUp(ServiceEvent):
    """The restart budget is spent; the service stays failed until reset."""

    TRIGGER = "give_up"


class Reset(ServiceEvent):
    """A person or the API cleared a failed service."""

    TRIGGER = "reset"


class Adopted(ServiceEvent):
    """Recovery found the service alive and healthy and kept it."""

    TRIGGER = "adopt"


class VramObserved(ServiceEvent):
    """A measurement of the service's VRAM use (feeds the learned peak)."""

    TRIGGER = "observe"


class OrphanReaped(ServiceEvent):
    """Recovery stopped a process carrying our marker that no running state explains."""

    TRIGGER = "observe"


class ParkRequested(ServiceEvent):
    """The coordinator decided to park the service (committed before the sleep action);
    data says why and for whom."""

    TRIGGER = "request_park"


class Parked(ServiceEvent):
    """The GPU shows the service holding no more than its residual (``held_mib``)."""

    TRIGGER = "parked"


class ParkFailed(ServiceEvent):
    """The sleep action failed, or the memory did not come back in time; a verified
    stop follows. Data has the numbers."""

    TRIGGER = "park_failed"


class WakeRequested(ServiceEvent):
    """The coordinator decided to wake the parked service (its full reservation admitted)."""

    TRIGGER = "request_wake"


class Woken(ServiceEvent):
    """The wake action, health check and warm-up passed: the service serves again."""

    TRIGGER = "woken"


class WakeFailed(ServiceEvent):
    """The wake did not succeed; the service is stopped (verified) and started afresh."""

    TRIGGER = "wake_failed"


@dataclass(frozen=True, kw_only=True)
class PhaseEntered(Event):
    """A client entered a phase (coordinator stream)."""


@dataclass(frozen=True, kw_only=True)
class PrefetchAbandoned(Event):
    """A prefetch that evicted services will not start what it evicted them for; data
    says for what, what it evicted and why (coordinator stream)."""


@dataclass(frozen=True, kw_only=True)
class AdmissionRefused(Event):
    """A request was refused for lack of VRAM (``InsufficientVram``): data says for
    which services, by whom, the MiB needed, free and held by foreign processes, and
    what blocked it (coordinator stream)."""


@dataclass(frozen=True, kw_only=True)
class ProxiedRequest(Event):
    """A request through the proxy that started, woke or stopped something: data names
    the route, the model, the client, the service and how long it waited (coordinator
    stream)."""


@dataclass(frozen=True, kw_only=True)
class LeaseReleased(Event):
    """A client gave up its current phase (coordinator stream)."""


@dataclass(frozen=True, kw_only=True)
class LeaseRevoked(Event):
    """A client's lease ended because a service of it was preempted or stopped; data
    names the client, its phase, the service and why (coordinator stream)."""


@dataclass(frozen=True, kw_only=True)
class LeaseExpired(Event):
    """A client was not heard from for its lease's ``ttl_s``; its lease ended
    (coordinator stream)."""


@dataclass(frozen=True, kw_only=True)
class ConfigReloaded(Event):
    """The config was replaced without a restart; data is the diff and the new config's
    hash (coordinator stream)."""


@dataclass(frozen=True, kw_only=True)
class Recovered(Event):
    """Recovery finished; data summarises what it corrected (coordinator stream)."""


EVENT_TYPES: Mapping[str, type[Event]] = {
    cls.__name__: cls
    for cls in (
        StartRequested,
        ProcessLaunched,
        HealthPassed,
        StartFailed,
        DrainRequested,
        Evicted,
        Preempted,
        Stopped,
        Crashed,
        GaveUp,
        Reset,
        Adopted,
        VramObserved,
        OrphanReaped,
        ParkRequested,
        Parked,
        ParkFailed,
        WakeRequested,
        Woken,
        WakeFailed,
        PhaseEntered,
        PrefetchAbandoned,
        AdmissionRefused,
        ProxiedRequest,
        LeaseReleased,
        LeaseRevoked,
        LeaseExpired,
        ConfigReloaded,
        Recovered,
    )
}


@dataclass(frozen=True)
class NewEvent:
    """An event ready to append: ``version`` is the stream version it must become."""

    stream: str
    version: int
    type: str
    at: datetime
    from_state: str | None = None
    to_state: str | None = None
    data: JsonMap = field(default_factory=dict)


@dataclass(frozen=True)
class RecordedEvent(NewEvent):
    """An event as stored, with its global order ``seq``."""

    seq: int = 0
