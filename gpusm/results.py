"""What the coordinator returns: phase results, plans and status, as frozen dataclasses."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["DeviceStatus", "PhaseResult", "ReloadResult", "ServiceStatus", "Status", "StopNote"]


@dataclass(frozen=True)
class StopNote:
    """A service stopped (or parked) on a request's behalf, and why."""

    service: str
    kind: str  # "evict", "preempt" or "release"
    reason: str
    # "stop", or "park": its process stays, holding only its residual.
    action: str = "stop"


@dataclass(frozen=True)
class PhaseResult:
    """What ``enter_phase`` did: every service of the phase is healthy when it returns."""

    phase: str
    client: str
    started: tuple[str, ...]
    kept: tuple[str, ...]
    stopped: tuple[StopNote, ...]
    waited_s: float
    free_before_mib: int | None
    free_after_mib: int | None
    prefetching: tuple[str, ...] = ()
    # Why the client's previous lease was revoked since its last call, if it was.
    lease_revoked: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


@dataclass(frozen=True)
class ServiceStatus:
    """One service as the coordinator sees it now."""

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
    leased_by: tuple[str, ...]
    in_state_s: float
    last_error: str | None = None
    # What it keeps while parked (None: it cannot park); reservation_mib is this while
    # it is parked.
    residual_mib: int | None = None
    # Every device its instance is (or last was) placed on; ``gpu`` is the first.
    devices: tuple[int, ...] = ()


@dataclass(frozen=True)
class DeviceStatus:
    """One GPU now; ``foreign_mib`` is held by processes gpusm does not own."""

    index: int
    name: str
    total_mib: int
    used_mib: int
    free_mib: int
    foreign_mib: int
    free_for_admission_mib: int
    error: str | None = None


@dataclass(frozen=True)
class ReloadResult:
    """What a config reload changed. Unchanged services kept running as they were;
    changed ones restart with the new config once idle; removed ones were stopped."""

    config_hash: str
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()
    unchanged: tuple[str, ...] = ()
    phases_changed: bool = False


@dataclass(frozen=True)
class Status:
    """The whole picture: devices, services, leases, and whether recovery finished."""

    recovered: bool
    devices: tuple[DeviceStatus, ...]
    services: tuple[ServiceStatus, ...]
    leases: dict[str, str] = field(default_factory=dict)
    # Seconds until each lease with a TTL expires unless its client is heard from.
    lease_expires_s: dict[str, float] = field(default_factory=dict)
    # The running config: a short hash of its content, and when it was loaded (UTC).
    config_hash: str = ""
    config_loaded_at: str = ""

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)
