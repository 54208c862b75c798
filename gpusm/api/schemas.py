"""Request and response bodies of the HTTP API (pydantic models, published in OpenAPI).

Requests name phases, services and clients only: nothing in a request ever becomes a
command line, an image or a mount; those come from the config file alone.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "ActionRequest",
    "ClientName",
    "DeviceStatusModel",
    "EnsureRequest",
    "EventModel",
    "EventPage",
    "HealthModel",
    "PhaseRequest",
    "PhaseResultModel",
    "PlanModel",
    "Problem",
    "ReleaseAllResponse",
    "ReleaseRequest",
    "ReleaseResponse",
    "ServiceStatusModel",
    "StartRequest",
    "StatusModel",
    "StopNoteModel",
    "VictimModel",
]

# A name looked up in the config; anything else is a 404 (so it only needs to be bounded).
LookupName = Annotated[str, Field(min_length=1, max_length=200)]
# Client ids and "by" labels are recorded in events: printable and bounded.
ClientName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:@/+-]{0,127}$")]
# A day is far beyond any sensible phase switch; the bound keeps deadlines finite.
Timeout = Annotated[float, Field(gt=0, le=86400)]
Priority = Annotated[int, Field(ge=-(10**9), le=10**9)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PhaseRequest(_Request):
    """Enter a phase: make exactly its services healthy for ``client``."""

    phase: LookupName
    client: ClientName = "default"
    timeout: Timeout | None = None
    priority: Priority | None = None


class EnsureRequest(_Request):
    """Make one service healthy for ``client`` (its lease becomes that service)."""

    client: ClientName = "default"
    timeout: Timeout | None = None


class ActionRequest(_Request):
    """Who asks (recorded in the event log as ``by``)."""

    by: ClientName = "api"


class StartRequest(ActionRequest):
    """Start one service without a lease; ``timeout`` bounds the wait for health."""

    timeout: Timeout | None = None


class ReleaseRequest(_Request):
    """Drop one client's lease."""

    client: ClientName = "default"


class Problem(BaseModel):
    """An RFC 9457 problem document; extra fields carry the error's numbers."""

    model_config = ConfigDict(extra="allow")

    type: str
    title: str
    status: int
    detail: str


class StopNoteModel(BaseModel):
    """A service stopped on a request's behalf, and why."""

    service: str
    kind: str
    reason: str


class PhaseResultModel(BaseModel):
    """What entering a phase did; every service of the phase is healthy."""

    phase: str
    client: str
    started: list[str]
    kept: list[str]
    stopped: list[StopNoteModel]
    waited_s: float
    free_before_mib: int | None
    free_after_mib: int | None
    prefetching: list[str] = []


class DeviceStatusModel(BaseModel):
    """One GPU now; ``foreign_mib`` is held by processes gpusm does not own."""

    index: int
    name: str
    total_mib: int
    used_mib: int
    free_mib: int
    foreign_mib: int
    free_for_admission_mib: int
    error: str | None = None


class ServiceStatusModel(BaseModel):
    """One service now: state, process, memory, leases and how long it has been so."""

    name: str
    state: str
    runtime: str
    gpu: int
    priority: int
    vram_mib: int
    reservation_mib: int
    used_mib: int
    pid: int | None
    container_id: str | None
    leased_by: list[str]
    in_state_s: float
    last_error: str | None = None


class StatusModel(BaseModel):
    """Devices, services, leases (client -> phase), and whether recovery finished."""

    recovered: bool
    devices: list[DeviceStatusModel]
    services: list[ServiceStatusModel]
    leases: dict[str, str]


class VictimModel(BaseModel):
    """A service the plan would stop: ``evict`` (idle) or ``preempt`` (in use, lower priority)."""

    name: str
    kind: str
    frees_mib: int
    reason: str


class PlanModel(BaseModel):
    """A dry run of entering a phase: what would stop and start, or why it cannot fit."""

    fits: bool
    need_mib: int
    free_before_mib: int
    free_after_mib: int
    to_start: list[str]
    already_running: list[str]
    victims: list[VictimModel]
    blocked_by: list[str]
    reason: str
    foreign_mib: int = 0


class EventModel(BaseModel):
    """One event of the log."""

    seq: int
    stream: str
    version: int
    type: str
    at: datetime
    from_state: str | None
    to_state: str | None
    data: dict[str, Any]


class EventPage(BaseModel):
    """A page of events in ``seq`` order; pass ``next_after_seq`` as ``after_seq`` for more.

    ``next_after_seq`` is null when this page is the last one for now.
    """

    events: list[EventModel]
    next_after_seq: int | None


class HealthModel(BaseModel):
    """Liveness: ``status`` is ``ok``, ``recovering`` or ``failed``."""

    service: str = "gpusm"
    status: str
    recovered: bool
    version: str
    error: str | None = None


class ReleaseResponse(BaseModel):
    """The client whose lease was dropped (its services stay warm)."""

    client: str


class ReleaseAllResponse(BaseModel):
    """Every service stopped by a release of everything."""

    stopped: list[StopNoteModel]
