"""The ports: what the coordinator needs from the outside world, as Protocols.

Each port has a real adapter and an in-package fake, and one contract test suite runs
against both (``tests/contracts/``).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from gpusm.domain.events import NewEvent, RecordedEvent

if TYPE_CHECKING:
    from gpusm.config import HealthConfig, ServiceConfig
    from gpusm.park_config import HttpCall

__all__ = [
    "CallResult",
    "Clock",
    "CursorStore",
    "DeviceSnapshot",
    "EventQuery",
    "EventStore",
    "GpuProbe",
    "Handle",
    "HealthCheck",
    "Placement",
    "HealthResult",
    "Notifier",
    "Runtime",
    "ServiceControl",
    "StopResult",
    "StreamHead",
    "WebhookStatus",
]


# ---------------------------------------------------------------- clock
@runtime_checkable
class Clock(Protocol):
    """Wall time for the record, monotonic time for timers, and a sleep tests can drive."""

    def now(self) -> datetime:
        """Current UTC time (timezone-aware)."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back; only differences mean anything."""
        ...

    def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` (a manual clock advances instead)."""
        ...


# ---------------------------------------------------------------- event store
@dataclass(frozen=True)
class StreamHead:
    """The latest known version and state of one stream (from the projection)."""

    stream: str
    version: int
    state: str | None
    last_seq: int
    at: datetime


@dataclass(frozen=True)
class EventQuery:
    """Filters for reading the log; every field narrows, ``None`` means any."""

    stream: str | None = None
    types: Sequence[str] | None = None
    since: datetime | None = None
    until: datetime | None = None
    after_seq: int = 0
    limit: int | None = None
    newest_first: bool = False


class EventStore(Protocol):
    """Append-only log of events with per-stream optimistic concurrency."""

    def append(self, events: Sequence[NewEvent]) -> list[RecordedEvent]:
        """Append atomically; a taken (stream, version) raises ConcurrencyConflict."""
        ...

    def read(self, query: EventQuery = EventQuery()) -> list[RecordedEvent]:
        """Events matching ``query``, in ``seq`` order (or reversed)."""
        ...

    def heads(self) -> dict[str, StreamHead]:
        """Latest version and state of every stream, without scanning the log."""
        ...

    def close(self) -> None:
        """Release connections; idempotent."""
        ...


# ---------------------------------------------------------------- GPU probe
@dataclass(frozen=True)
class DeviceSnapshot:
    """One GPU at one moment; ``processes`` maps host pid to MiB used."""

    index: int
    uuid: str
    name: str
    total_mib: int
    used_mib: int
    free_mib: int
    processes: Mapping[int, int] = field(default_factory=dict)


class GpuProbe(Protocol):
    """Reads VRAM per device and per process.

    ``slack_mib`` is how far memory that no listed process holds (driver contexts,
    caches) may wobble between two readings: 0 where accounting is exact (a simulated
    GPU), a little on a real driver.
    """

    slack_mib: int

    def device_count(self) -> int:
        """Number of visible devices."""
        ...

    def snapshot(self, device: int | str = 0) -> DeviceSnapshot:
        """Memory of one device, by index or UUID; GpuProbeError if it cannot be read."""
        ...

    def oom_count(self) -> int | None:
        """Out-of-memory failures the backend has seen, or None if it cannot know."""
        ...

    def close(self) -> None:
        """Release the library; idempotent."""
        ...


# ---------------------------------------------------------------- runtimes
@dataclass(frozen=True)
class Handle:
    """What identifies a running instance: a pid with its create time, or a container.

    ``kind`` names the runtime that started it (its key in the runtime registry), so
    an instance is always observed and stopped through that runtime, whatever the
    service's configuration says today.
    """

    service: str
    instance: str
    pid: int | None = None
    create_time: float | None = None
    container_id: str | None = None
    kind: str = "native"

    def as_data(self) -> dict[str, object]:
        """The JSON form stored in ``ProcessLaunched`` and ``Adopted`` events."""
        return {
            "instance": self.instance,
            "pid": self.pid,
            "create_time": self.create_time,
            "container_id": self.container_id,
            "runtime": self.kind,
        }

    @classmethod
    def from_data(cls, service: str, data: Mapping[str, Any]) -> Handle:
        """The handle stored by :meth:`as_data` (events written before ``runtime`` was
        recorded name a container id only when Docker started them)."""
        kind = data.get("runtime") or ("docker" if data.get("container_id") else "native")
        return cls(
            service=service,
            instance=str(data["instance"]),
            pid=data.get("pid"),
            create_time=data.get("create_time"),
            container_id=data.get("container_id"),
            kind=str(kind),
        )


@dataclass(frozen=True)
class Placement:
    """The devices an instance is placed on: gpusm's indices and each device's UUID."""

    indices: tuple[int, ...] = (0,)
    uuids: tuple[str, ...] = ()

    def visible_devices(self) -> str:
        """The value of ``CUDA_VISIBLE_DEVICES``: the UUIDs (stable whatever the device
        order), else the indices."""
        if self.uuids and all(self.uuids):
            return ",".join(self.uuids)
        return ",".join(str(i) for i in self.indices)


@dataclass(frozen=True)
class StopResult:
    """How a stop went: how long it took and whether SIGKILL (or docker kill) was needed."""

    duration_s: float
    escalated: bool
    already_dead: bool = False


class Runtime(Protocol):
    """Starts, watches and stops service instances of one kind (native, docker, ...).

    ``kind`` is the runtime's name in the registry; every handle it returns carries it.
    """

    kind: str

    def start(
        self, service: ServiceConfig, instance: str, placement: Placement | None = None
    ) -> Handle:
        """Launch ``service`` on ``placement``'s devices (None: as configured, no device
        environment); ServiceStartFailed if it cannot."""
        ...

    def is_alive(self, handle: Handle) -> bool:
        """Whether this exact instance still runs (a reused pid is not it)."""
        ...

    def stop(self, handle: Handle, grace_s: float) -> StopResult:
        """TERM, wait up to ``grace_s``, then KILL; returns once nothing of it is left."""
        ...

    def pids_of(self, handle: Handle) -> set[int]:
        """Host pids of the instance and its descendants (for VRAM attribution)."""
        ...

    def find_orphans(self) -> list[Handle]:
        """Every live instance that carries gpusm's marker, ours or left from before."""
        ...

    def attribute(self, pids: Collection[int], handles: Sequence[Handle]) -> dict[int, Handle]:
        """Which of ``pids`` (e.g. the GPU's processes) belong to which of ``handles``.

        Cheap enough for every decision: it looks at the given pids only (their marker
        or their ancestry up to an instance's top process, cached per process), never at
        the whole process table. Pids that belong to none of them are left out.
        """
        ...

    def signal(self, handle: Handle, name: str) -> None:
        """Send the signal ``name`` (e.g. ``"SIGUSR1"``) to the instance's top process;
        ServiceRuntimeError if it is gone or cannot be signalled."""
        ...

    def exit_code(self, handle: Handle) -> int | None:
        """The instance's exit status once it ended and is known; else None.

        Negative means killed by that signal, as in :attr:`subprocess.Popen.returncode`.
        """
        ...

    def log_tail(self, handle: Handle, lines: int = 20) -> str:
        """The last ``lines`` lines the instance wrote ("" if none can be read); never raises."""
        ...

    def close(self) -> None:
        """Release connections; idempotent."""
        ...


# ---------------------------------------------------------------- health
@dataclass(frozen=True)
class HealthResult:
    """One verdict: ``ok`` or a ``reason`` a person can read; never an exception."""

    ok: bool
    reason: str = ""
    probes: int = 1
    elapsed_s: float = 0.0


class HealthCheck(Protocol):
    """Asks a service whether it is ready."""

    def probe(self, health: HealthConfig) -> HealthResult:
        """One probe, bounded by the probe timeout."""
        ...

    def wait_healthy(
        self,
        health: HealthConfig,
        deadline_s: float,
        still_alive: Callable[[], bool] = lambda: True,
        started_at: float | None = None,
    ) -> HealthResult:
        """Probe on schedule until ok, ``deadline_s`` (monotonic) passes, or the process dies."""
        ...

    def close(self) -> None:
        """Release connections; idempotent."""
        ...


# ---------------------------------------------------------------- service control
@dataclass(frozen=True)
class CallResult:
    """How one request to a service went: ``ok`` (the expected status) or a ``reason``."""

    ok: bool
    status: int | None = None
    reason: str = ""
    elapsed_s: float = 0.0


class ServiceControl(Protocol):
    """Sends a service the requests that park and wake it (``park:`` steps)."""

    def call(self, request: HttpCall) -> CallResult:
        """Send ``request``, bounded by its timeout; never raises."""
        ...

    def close(self) -> None:
        """Release connections; idempotent."""
        ...


# ---------------------------------------------------------------- webhooks
class CursorStore(Protocol):
    """Where each webhook's delivery cursor (the last ``seq`` it acknowledged) persists."""

    def seed(self, name: str, seq: int) -> int:
        """The cursor of ``name``, created at ``seq`` first if it has none."""
        ...

    def load(self, name: str) -> int | None:
        """The cursor of ``name``, or None if it has none."""
        ...

    def save(self, name: str, seq: int) -> None:
        """Set the cursor of ``name`` to ``seq`` (durably, before returning)."""
        ...

    def close(self) -> None:
        """Release connections; idempotent."""
        ...


@dataclass(frozen=True)
class WebhookStatus:
    """How one webhook's deliveries stand (never its secret).

    ``cursor_seq`` is the last event it acknowledged, ``newest_seq`` the newest event in
    the log it should get, ``pending`` how many of its events wait; the counts are since
    the daemon started.
    """

    name: str
    url: str
    events: tuple[str, ...]
    cursor_seq: int
    newest_seq: int
    pending: int
    delivered_events: int = 0
    deliveries_ok: int = 0
    deliveries_failed: int = 0
    consecutive_failures: int = 0
    last_error: str | None = None
    # UTC ISO-8601 of the last acknowledged POST, if any since the daemon started.
    last_success_at: str | None = None
    # Seconds until the next try after a failure (None: not waiting on a failure).
    next_attempt_in_s: float | None = None


class Notifier(Protocol):
    """Delivers events from the log to the configured webhooks, in the background."""

    def start(self) -> None:
        """Begin delivering (idempotent)."""
        ...

    def status(self) -> list[WebhookStatus]:
        """Each webhook's delivery state, in config order."""
        ...

    def close(self) -> None:
        """Stop delivering (promptly; an unacknowledged POST is sent again next time)."""
        ...
