"""The engine's shared state and its one serialization point.

Every decision (admission, eviction, a state change) is taken while holding
``Engine.cond``; side effects that take time (spawning, health waits, stops, reclaim
waits) happen outside it, by the one thread that holds the service's :class:`Slot`.
Every state change goes through :meth:`Engine.record`, which appends the event before
the in-memory state is trusted: if the append fails, the state is rolled back.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from gpusm.config import Config, ServiceConfig
from gpusm.domain import events as ev
from gpusm.domain import policy
from gpusm.domain.events import COORDINATOR_STREAM, Event, NewEvent, RecordedEvent, ServiceEvent
from gpusm.domain.machine import ServiceMachine
from gpusm.domain.pipeline import typical_load_s
from gpusm.domain.states import ACTIVE_STATES, State
from gpusm.engine.leases import Lease, LeaseBook
from gpusm.errors import GpuProbeError, GpusmError, ServiceRuntimeError
from gpusm.park_config import ParkSteps
from gpusm.ports import (
    Clock,
    DeviceSnapshot,
    EventQuery,
    EventStore,
    GpuProbe,
    Handle,
    HealthCheck,
    Placement,
    Runtime,
    ServiceControl,
)

__all__ = ["Engine", "Lease", "Slot"]

# Measured loads a service remembers (their median is its load cost).
_LOAD_SAMPLES = 9


@dataclass
class Slot:
    """Everything the engine tracks about one configured service.

    The fields are read anywhere under the engine's lock; they change only through the
    methods below, which keep the ownership protocol in one place: a start or stop
    runs outside the lock in the one thread that holds the slot (``busy``), and that
    thread lets go with :meth:`release` whatever happens.
    """

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
    # The latest measured times from start to healthy, newest last.
    load_samples: list[float] = field(default_factory=list)
    # A reloaded config waiting for the running instance to stop (None: none waiting).
    pending: ServiceConfig | None = None
    # Removed from the config by a reload: dropped once stopped.
    removed: bool = False
    # The most a park of it was seen to keep (raises the residual it reserves).
    learned_residual_mib: int = 0
    # The devices its current (or last) instance was placed on; () until placed.
    devices: tuple[int, ...] = ()
    # Monotonic time the wake in flight began.
    wake_started: float = 0.0
    _steps: tuple[ServiceConfig, ParkSteps | None] | None = None

    @property
    def name(self) -> str:
        return self.machine.name

    @property
    def state(self) -> State:
        return self.machine.state

    @property
    def reservation(self) -> int:
        return max(self.config.vram_mib, self.learned_peak_mib)

    @property
    def placed(self) -> tuple[int, ...]:
        """The devices of its instance (or of its last one); its pinned device (else 0)
        before it was ever placed."""
        return self.devices or (self.config.pinned or 0,)

    @property
    def device(self) -> int:
        """The first device it is placed on (the one its events' VRAM numbers describe)."""
        return self.placed[0]

    @property
    def parking(self) -> ParkSteps | None:
        """How it parks and wakes (None: it cannot), resolved once per config."""
        if self._steps is None or self._steps[0] is not self.config:
            self._steps = (self.config, self.config.park_steps())
        return self._steps[1]

    @property
    def residual_mib(self) -> int | None:
        """What it keeps while parked: the configured residual, or more once a park was
        seen to keep more; None when it cannot park."""
        steps = self.parking
        return None if steps is None else max(steps.residual_mib, self.learned_residual_mib)

    # ------------------------------------------------------------ ownership
    def claim_start(self, now: float, fallback: bool = False) -> None:
        """Own a new start: fresh generation, error and failure count; the start's deadline.

        ``fallback``: the start replaces a failed wake of the same request, which keeps
        its generation (the request's failures are still its own).
        """
        self.busy = True
        self.last_error = None
        self.health_failures = 0
        if not fallback:
            self.generation += 1
        self.start_times.append(now)
        self.start_deadline = now + self.config.health.timeout_s

    def claim_wake(self, now: float) -> None:
        """Own a wake: fresh generation and error; the health check's deadline applies."""
        self.busy = True
        self.last_error = None
        self.health_failures = 0
        self.generation += 1
        self.wake_started = now
        self.start_deadline = now + self.config.health.timeout_s

    def claim(self) -> bool:
        """Own the slot for a stop; False if someone else already does."""
        if self.busy:
            return False
        self.busy = True
        return True

    def release(self, error: str | None = None) -> None:
        """Let go of the slot; ``error`` (if any) becomes the last error unless one is set."""
        self.busy = False
        if error is not None and self.last_error is None:
            self.last_error = error

    def attach(self, handle: Handle) -> None:
        """The instance now running for this service."""
        self.handle = handle

    def detach(self, error: str | None = None) -> None:
        """No instance runs any more; ``error`` (or None) says why, for the next request."""
        self.handle = None
        self.last_error = error

    def fail(self, reason: str) -> None:
        """Remember why the service cannot serve, for requests and status."""
        self.last_error = reason

    @property
    def stale(self) -> bool:
        """Whether a reload changed or removed it while it ran (it must stop first)."""
        return self.pending is not None or self.removed

    def apply_pending(self) -> bool:
        """Take the reloaded config, if one waits and nothing runs; True if it did."""
        if self.pending is None or self.state is not State.STOPPED or self.busy:
            return False
        self.config, self.pending = self.pending, None
        self.learned_peak_mib = 0  # a changed service may be another size now
        self.learned_residual_mib = 0
        self.load_samples = []
        return True

    # ------------------------------------------------------------ health and use
    def touch(self, now: float) -> None:
        """The service was just needed (for least-recently-used ordering)."""
        self.last_used = max(self.last_used, now)

    def count_probe(self, ok: bool) -> int:
        """Record one liveness probe; returns the consecutive failures so far."""
        self.health_failures = 0 if ok else self.health_failures + 1
        return self.health_failures

    def learn_load(self, seconds: float) -> None:
        """One more measured time from start to healthy (the last few are kept)."""
        self.load_samples = [*self.load_samples, seconds][-_LOAD_SAMPLES:]

    @property
    def load_cost_s(self) -> float:
        """What starting it costs: the median measured load, else the declared ``load_s``."""
        return typical_load_s(self.load_samples, self.config.load_s)

    def learn_residual(self, held_mib: int) -> None:
        """A verified park kept ``held_mib``: reserve at least that while parked."""
        self.learned_residual_mib = max(self.learned_residual_mib, held_mib)

    def learn_peak(self, used_mib: int) -> bool:
        """Raise the learned peak to ``used_mib``; True if it grew."""
        if used_mib <= self.learned_peak_mib:
            return False
        self.learned_peak_mib = used_mib
        return True

    def schedule_restart(self, at: float | None) -> None:
        """When the monitor should restart this crashed service (None: never)."""
        self.restart_at = at

    def reset_budget(self) -> None:
        """Forget past starts: a reset service gets its whole restart budget back."""
        self.start_times.clear()

    def restore(
        self, machine: ServiceMachine, handle: Handle | None, peak_mib: int, now: float
    ) -> None:
        """Recovery: the state, instance and learned peak that the log says."""
        self.machine = machine
        self.handle = handle
        self.learned_peak_mib = peak_mib
        self.state_since = now

    def resume_start(self, started_at: float) -> None:
        """Recovery: a start recorded at ``started_at`` (monotonic) keeps its deadline."""
        self.start_times.append(started_at)
        self.start_deadline = started_at + self.config.health.timeout_s


class Engine:
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
        open_runtime: Callable[[str], Runtime] | None = None,
        control: ServiceControl | None = None,
    ) -> None:
        self.config = config
        # Computed once per config (status shows it on every read).
        self.config_hash = config.fingerprint()
        self.loaded_at = clock.now()
        self._open_runtime = open_runtime
        self.store = store
        self.probe = probe
        self.runtimes = dict(runtimes)
        self.health = health
        self.device_count = _device_count(probe)
        self._uuids: dict[int, str] = {}
        # Sends park and wake requests; without one, a park or wake step over HTTP fails.
        self.control = control
        self.clock = clock
        self.cond = threading.Condition(threading.RLock())
        self.slots: dict[str, Slot] = {
            name: Slot(config=svc, machine=ServiceMachine(name))
            for name, svc in config.services.items()
        }
        self.leases = LeaseBook(clock)
        self.coordinator_version = 0
        self.closed = False
        # Bumped by every service transition (see ``version``).
        self._transitions = 0
        # The GPU readings of each thread's decision in progress (see :meth:`decision`).
        self._local = threading.local()

    @property
    def version(self) -> int:
        """Moves with every service transition and every change of who holds what."""
        return self._transitions + self.leases.version

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
            self._transitions += 1
            readings = self._readings
            if readings is not None:
                # Who is active changed: attribute the GPU's pids afresh.
                self._local.readings = {d: (snap, None) for d, (snap, _) in readings.items()}
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
        """The runtime of ``slot``'s running instance, else the one its config names."""
        if slot.handle is not None:
            return self.runtime_of(slot.handle)
        return self._runtime_of_kind(slot.config.runtime, slot.name)

    def runtime_of(self, handle: Handle) -> Runtime:
        """The runtime that started ``handle`` (whatever the config says today); one the
        config no longer uses is opened on demand, so its instance can still be seen and
        stopped."""
        return self._runtime_of_kind(handle.kind, handle.service)

    def _runtime_of_kind(self, kind: str, service: str) -> Runtime:
        runtime = self.runtimes.get(kind)
        if runtime is None and self._open_runtime is not None:
            runtime = self.runtimes[kind] = self._open_runtime(kind)
        if runtime is None:
            raise ServiceRuntimeError(service, f"runtime {kind!r} is not loaded")
        return runtime

    @contextmanager
    def decision(self) -> Iterator[None]:
        """Take the lock; inside, each device is read from the GPU once (and attributed
        once), and the plan, the events' VRAM numbers and the result share that reading.

        Nested decisions of the same thread share the outer one's readings. A decision
        must not wait on the condition: the readings would outlive what they describe.
        """
        with self.cond:
            outer = self._readings is not None
            if not outer:
                self._local.readings = {}
            try:
                yield
            finally:
                if not outer:
                    self._local.readings = None

    @property
    def _readings(self) -> dict[int, tuple[DeviceSnapshot, dict[int, str] | None]] | None:
        # Per thread: a decision belongs to the thread that holds the lock for it.
        readings: dict[int, tuple[DeviceSnapshot, dict[int, str] | None]] | None = getattr(
            self._local, "readings", None
        )
        return readings

    def snapshot(self, device: int) -> DeviceSnapshot:
        """One reading of ``device`` (GpuProbeError passes through); within a
        :meth:`decision`, the decision's reading."""
        return self._reading(device)[0]

    def _reading(self, device: int) -> tuple[DeviceSnapshot, dict[int, str] | None]:
        readings = self._readings
        if readings is not None and device in readings:
            return readings[device]
        reading: tuple[DeviceSnapshot, dict[int, str] | None] = (
            self.probe.snapshot(device),
            None,
        )
        if readings is not None:
            readings[device] = reading
        return reading

    def pids(self, slot: Slot) -> set[int]:
        """Host pids of ``slot``'s running instance (empty when none)."""
        if slot.handle is None:
            return set()
        try:
            return self.runtime(slot).pids_of(slot.handle)
        except Exception:  # a vanished process or container: it holds nothing of ours
            return set()

    # ------------------------------------------------------------ devices
    def allowed(self, slot: Slot) -> list[int]:
        """The devices ``slot``'s service may be placed on, on this host."""
        return slot.config.allowed_devices(self.device_count) or [0]

    def devices(self) -> list[int]:
        """GPU indices that configured services may use or are placed on."""
        found = {d for s in self.slots.values() for d in (*self.allowed(s), *s.placed)}
        return sorted(found) or [0]

    def placement(self, slot: Slot) -> Placement:
        """Where ``slot``'s next instance runs: its devices and their UUIDs."""
        return Placement(slot.placed, tuple(self._uuid(d) for d in slot.placed))

    def _uuid(self, device: int) -> str:
        if device not in self._uuids:
            try:
                self._uuids[device] = self.probe.snapshot(device).uuid
            except GpuProbeError:
                return ""  # CUDA_VISIBLE_DEVICES falls back to indices
        return self._uuids[device]

    def on_device(self, slot: Slot, device: int) -> bool:
        """Whether ``slot`` counts on ``device``: placed there while active, else allowed."""
        if slot.state in ACTIVE_STATES:
            return device in slot.placed
        return device in self.allowed(slot)

    # ------------------------------------------------------------ views
    def owners(self, device: int, snap: DeviceSnapshot) -> dict[int, str]:
        """GPU pid -> service, for the pids of ``snap`` that belong to an active service.

        Asks each runtime about the GPU's pids only (marker or ancestry, cached per
        process): the cost follows the GPU's process count, not the host's.
        """
        handles: dict[str, list[Handle]] = {}
        for slot in self.slots.values():
            if slot.state in ACTIVE_STATES and device in slot.placed and slot.handle:
                handles.setdefault(slot.handle.kind, []).append(slot.handle)
        owners: dict[int, str] = {}
        for group in handles.values():
            left = [pid for pid in snap.processes if pid not in owners]
            if not left:
                break
            try:
                found = self.runtime_of(group[0]).attribute(left, group)
            except GpusmError:
                continue  # e.g. its runtime is not loaded: its memory counts as foreign
            owners.update({pid: handle.service for pid, handle in found.items()})
        return owners

    def gpu_view(self, device: int) -> tuple[policy.GpuView, DeviceSnapshot, dict[int, str]]:
        """The policy's view of ``device``: free memory, foreign usage and reserve."""
        snap, owners_known = self._reading(device)
        owners = owners_known if owners_known is not None else self.owners(device, snap)
        if self._readings is not None:
            self._readings[device] = (snap, owners)
        foreign = sum(mib for pid, mib in snap.processes.items() if pid not in owners)
        view = policy.GpuView(
            total_mib=snap.total_mib,
            driver_free_mib=max(0, snap.free_mib),
            foreign_mib=foreign,
            reserve_mib=self.config.gpu.reserve_mib,
        )
        return view, snap, owners

    def views(
        self, device: int | None = None, next_use: Mapping[str, int] | None = None
    ) -> dict[str, policy.ServiceView]:
        """Policy views of the services on ``device`` (all when None); ``next_use`` gives
        each service's distance to its next use in the pipeline, when known."""
        uses = next_use or {}
        return {
            name: policy.ServiceView(
                name=name,
                state=slot.state,
                vram_mib=slot.config.vram_mib,
                learned_peak_mib=slot.learned_peak_mib,
                priority=slot.config.priority,
                last_used=slot.last_used,
                idle_ttl_s=slot.config.idle_ttl_s,
                next_use=uses.get(name),
                load_cost_s=slot.load_cost_s,
                residual_mib=slot.residual_mib,
                state_since=slot.state_since,
            )
            for name, slot in self.slots.items()
            if device is None or self.on_device(slot, device)
        }

    def revoke(self, service: str, reason: str) -> list[str]:
        """End every lease that holds ``service`` (``LeaseRevoked``); returns the clients."""
        ended = []
        for client in self.leases.holders(service):
            lease = self.leases.revoke(client, reason)
            if lease is not None:
                data = {"client": client, "phase": lease.phase, "service": service}
                self.note(ev.LeaseRevoked(data={**data, "reason": reason}))
                ended.append(client)
        return ended

    def expire_leases(self) -> list[str]:
        """End the leases whose client was not heard from for their TTL (``LeaseExpired``)."""
        ended = []
        for client, lease, silent in self.leases.expired():
            data = {"client": client, "phase": lease.phase, "ttl_s": lease.ttl_s}
            self.note(ev.LeaseExpired(data={**data, "silent_s": round(silent, 3)}))
            ended.append(client)
        return ended

    def other_leases(self, client: str | None) -> dict[str, frozenset[str]]:
        """Services held by each client other than ``client``."""
        return self.leases.others(client)

    def leased(self) -> set[str]:
        """Every service some client's current phase holds."""
        return self.leases.leased()

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


def _device_count(probe: GpuProbe) -> int:
    try:
        return max(1, probe.device_count())
    except GpuProbeError:
        return 1  # unreadable now: one device until it can be read (recovery reports it)
