"""The coordinator's shared state and its one serialization point.

Every decision (admission, eviction, a state change) is taken while holding
``Core.cond``; side effects that take time (spawning, health waits, stops, reclaim
waits) happen outside it, by the one thread that set the service's ``busy`` flag.
Every state change goes through :meth:`Core.record`, which appends the event before
the in-memory state is trusted: if the append fails, the state is rolled back.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from gpusm.config import Config, ServiceConfig
from gpusm.domain import policy
from gpusm.domain.events import COORDINATOR_STREAM, Event, NewEvent, RecordedEvent, ServiceEvent
from gpusm.domain.machine import ServiceMachine
from gpusm.domain.states import ACTIVE_STATES, State
from gpusm.errors import GpuProbeError
from gpusm.ports import (
    Clock,
    DeviceSnapshot,
    EventQuery,
    EventStore,
    GpuProbe,
    Handle,
    HealthCheck,
    Runtime,
)

__all__ = ["Core", "Lease", "Slot"]


@dataclass
class Slot:
    """Everything the coordinator tracks about one configured service."""

    config: ServiceConfig
    machine: ServiceMachine
    handle: Handle | None = None
    # A start or stop of this service is in flight outside the lock; its owner finishes it.
    busy: bool = False
    last_used: float = 0.0
    learned_peak_mib: int = 0
    state_since: float = 0.0
    start_times: list[float] = field(default_factory=list)
    health_failures: int = 0
    restart_at: float | None = None
    # Why the last start or stop went wrong, for the waiting request's error.
    last_error: str | None = None
    # Incremented by every StartRequested, so a request knows whether a failure is its own.
    generation: int = 0
    start_deadline: float = 0.0

    @property
    def name(self) -> str:
        return self.machine.name

    @property
    def state(self) -> State:
        return self.machine.state

    @property
    def reservation(self) -> int:
        return max(self.config.vram_mib, self.learned_peak_mib)


@dataclass(frozen=True)
class Lease:
    """A client's current phase: the services it needs and the priority it asked with."""

    phase: str
    services: frozenset[str]
    priority: int


class Core:
    """Config, adapters, per-service slots, leases and the lock that orders them."""

    def __init__(
        self,
        config: Config,
        *,
        store: EventStore,
        probe: GpuProbe,
        runtimes: Mapping[str, Runtime],
        health: HealthCheck,
        clock: Clock,
    ) -> None:
        self.config = config
        self.store = store
        self.probe = probe
        self.runtimes = dict(runtimes)
        self.health = health
        self.clock = clock
        self.cond = threading.Condition(threading.RLock())
        self.slots: dict[str, Slot] = {}
        self.leases: dict[str, Lease] = {}
        self.coordinator_version = 0
        self.closed = False

    # ------------------------------------------------------------ recording
    def record(self, slot: Slot, event: ServiceEvent) -> RecordedEvent:
        """Move ``slot`` by ``event`` and append it; on a failed append nothing moves."""
        with self.cond:
            machine = slot.machine
            before = (machine.state, machine.version)
            new = machine.record(event, self.clock.now())
            try:
                recorded = self.store.append([new])[0]
            except BaseException:
                slot.machine = ServiceMachine(machine.name, before[0], before[1])
                raise
            if new.from_state != new.to_state:
                slot.state_since = self.clock.monotonic()
            self.cond.notify_all()
            return recorded

    def note(self, event: Event) -> RecordedEvent:
        """Append a coordinator-stream event (phase changes, recovery summaries)."""
        with self.cond:
            new = NewEvent(
                stream=COORDINATOR_STREAM,
                version=self.coordinator_version + 1,
                type=event.type_name(),
                at=self.clock.now(),
                data=dict(event.data),
            )
            recorded = self.store.append([new])[0]
            self.coordinator_version = new.version
            return recorded

    def last_event(self, stream: str, types: Iterable[str]) -> RecordedEvent | None:
        """The newest event of ``stream`` among ``types``, or None."""
        found = self.store.read(
            EventQuery(stream=stream, types=list(types), newest_first=True, limit=1)
        )
        return found[0] if found else None

    # ------------------------------------------------------------ adapters
    def runtime(self, slot: Slot) -> Runtime:
        """The runtime that runs ``slot``'s service."""
        return self.runtimes[slot.config.runtime]

    def snapshot(self, device: int) -> DeviceSnapshot:
        """One reading of ``device`` (GpuProbeError passes through)."""
        return self.probe.snapshot(device)

    def pids(self, slot: Slot) -> set[int]:
        """Host pids of ``slot``'s running instance (empty when none)."""
        if slot.handle is None:
            return set()
        try:
            return self.runtime(slot).pids_of(slot.handle)
        except Exception:  # a vanished process or container: it holds nothing of ours
            return set()

    # ------------------------------------------------------------ views
    def devices(self) -> list[int]:
        """GPU indices that configured services use."""
        return sorted({s.config.gpu for s in self.slots.values()}) or [0]

    def our_pids(self, device: int) -> dict[int, str]:
        """pid -> service for every active service on ``device``."""
        owners: dict[int, str] = {}
        for slot in self.slots.values():
            if slot.config.gpu == device and slot.state in ACTIVE_STATES:
                for pid in self.pids(slot):
                    owners[pid] = slot.name
        return owners

    def gpu_view(self, device: int) -> tuple[policy.GpuView, DeviceSnapshot, dict[int, str]]:
        """The policy's view of ``device``: free memory, foreign usage and reserve."""
        snap = self.snapshot(device)
        owners = self.our_pids(device)
        foreign = sum(mib for pid, mib in snap.processes.items() if pid not in owners)
        view = policy.GpuView(
            total_mib=snap.total_mib,
            driver_free_mib=max(0, snap.free_mib),
            foreign_mib=foreign,
            reserve_mib=self.config.gpu.reserve_mib,
        )
        return view, snap, owners

    def views(self, device: int | None = None) -> dict[str, policy.ServiceView]:
        """Policy views of the services on ``device`` (all when None)."""
        return {
            name: policy.ServiceView(
                name=name,
                state=slot.state,
                vram_mib=slot.config.vram_mib,
                learned_peak_mib=slot.learned_peak_mib,
                priority=slot.config.priority,
                last_used=slot.last_used,
                idle_ttl_s=slot.config.idle_ttl_s,
            )
            for name, slot in self.slots.items()
            if device is None or slot.config.gpu == device
        }

    def other_leases(self, client: str | None) -> dict[str, frozenset[str]]:
        """Services held by each client other than ``client``."""
        return {c: lease.services for c, lease in self.leases.items() if c != client}

    def leased(self) -> set[str]:
        """Every service some client's current phase holds."""
        return {name for lease in self.leases.values() for name in lease.services}

    def free_mib(self, device: int = 0) -> int | None:
        """Driver-reported free MiB of ``device``, or None if the GPU cannot be read."""
        try:
            return self.snapshot(device).free_mib
        except GpuProbeError:
            return None

    def vram_data(self, device: int) -> dict[str, Any]:
        """The VRAM numbers stored with decisions, so the log says how much was free."""
        try:
            snap = self.snapshot(device)
        except GpuProbeError as exc:
            return {"gpu": device, "gpu_error": str(exc)}
        return {"gpu": device, "free_mib": snap.free_mib, "used_mib": snap.used_mib}
