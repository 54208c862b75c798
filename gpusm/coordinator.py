"""The coordinator: a worker names its phase, gpusm makes exactly the right services run.

``Coordinator.from_config(path)`` takes the state directory's lock, opens the event
store, recovers (replay, observe, reconcile) and only then returns. Every public verb
is safe to call from several threads; decisions are taken under one lock and recorded
before their side effects.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
from collections.abc import Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any

from gpusm.config import Config, load_config
from gpusm.core import Core, Lease
from gpusm.crashpoints import crash_point
from gpusm.domain import events as ev
from gpusm.domain import policy
from gpusm.domain.events import RecordedEvent
from gpusm.domain.states import RUNNING_STATES, State
from gpusm.errors import GpusmError, RequestTimeout, ServiceStartFailed
from gpusm.lifecycle import (
    begin_drain,
    begin_start,
    finish_stop,
    in_background,
    join_background,
    run_start,
)
from gpusm.lock import StateDirLock
from gpusm.ports import Clock, EventQuery
from gpusm.results import DeviceStatus, PhaseResult, ServiceStatus, Status, StopNote

__all__ = ["Coordinator"]

# Below every configured priority: a prefetch may only evict idle services.
_PREFETCH_PRIORITY = -(2**62)
_POLL_S = 0.2


class Coordinator:
    """Owns the GPU services of one state directory; see the module docstring."""

    def __init__(self, core: Core, lock: StateDirLock | None = None) -> None:
        self.core = core
        self._lock = lock
        self._tickets = itertools.count(1)
        self._waiting: dict[int, int] = {}
        self.recovered = False
        self._monitor: Any = None
        self._closing = False
        self._client_locks: dict[str, threading.Lock] = {}

    # ------------------------------------------------------------ construction
    @classmethod
    def from_config(
        cls,
        config: str | os.PathLike[str] | Config,
        *,
        clock: Clock | None = None,
        monitor: bool = True,
    ) -> Coordinator:
        """Lock the state directory, open the store, recover, start the monitor."""
        from gpusm.monitor import Monitor
        from gpusm.reconcile import recover
        from gpusm.wiring import build_core

        cfg = config if isinstance(config, Config) else load_config(Path(config))
        lock = StateDirLock(cfg.state_dir)
        lock.acquire()
        try:
            core = build_core(cfg, clock=clock)
        except BaseException:
            lock.release()
            raise
        coordinator = cls(core, lock)
        try:
            recover(core)
            coordinator.recovered = True
            if monitor:
                coordinator._monitor = Monitor(core)
                coordinator._monitor.start()
        except BaseException:
            coordinator.close()
            raise
        return coordinator

    def __enter__(self) -> Coordinator:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self, stop_services: bool = False) -> None:
        """Stop the monitor and release the lock; services keep running unless asked."""
        if self.core.closed or self._closing:
            return
        with self.core.cond:
            # From here on no request or prefetch starts anything new.
            self._closing = True
            self.core.cond.notify_all()
        try:
            if stop_services:
                self.release_all(by="close")
        finally:
            with self.core.cond:
                self.core.closed = True
                self.core.cond.notify_all()
            if self._monitor is not None:
                self._monitor.stop()
            join_background(timeout_s=30.0)
            for closer in (self.core.health.close, self.core.probe.close, self.core.store.close):
                # Closing is best effort; nothing recorded is at stake.
                with contextlib.suppress(GpusmError):
                    closer()
            for runtime in self.core.runtimes.values():
                close = getattr(runtime, "close", None)
                if close is not None:
                    close()
            if self._lock is not None:
                self._lock.release()

    # ------------------------------------------------------------ phases
    def enter_phase(
        self,
        name: str,
        client: str = "default",
        timeout: float | None = None,
        priority: int | None = None,
    ) -> PhaseResult:
        """Make exactly ``name``'s services healthy for ``client``; block until they are."""
        phase = self.core.config.phase(name)
        return self._enter(name, list(phase.services), phase.release, client, timeout, priority)

    def ensure_service(
        self, name: str, client: str = "default", timeout: float | None = None
    ) -> PhaseResult:
        """Make one service healthy for ``client`` (its lease becomes just that service)."""
        self.core.config.service(name)
        return self._enter(f"service:{name}", [name], False, client, timeout, None)

    def _enter(
        self,
        phase: str,
        needed: list[str],
        release: bool,
        client: str,
        timeout: float | None,
        priority: int | None,
    ) -> PhaseResult:
        # One request at a time per client: a client has one current phase, and two
        # concurrent requests would each see the other's services as idle.
        with self._client_lock(client):
            return self._enter_locked(phase, needed, release, client, timeout, priority)

    def _client_lock(self, client: str) -> threading.Lock:
        with self.core.cond:
            return self._client_locks.setdefault(client, threading.Lock())

    def _enter_locked(
        self,
        phase: str,
        needed: list[str],
        release: bool,
        client: str,
        timeout: float | None,
        priority: int | None,
    ) -> PhaseResult:
        core = self.core
        t0 = core.clock.monotonic()
        deadline = t0 + (timeout if timeout is not None else self._default_timeout(needed))
        with core.cond:
            self._check_open()
            free_before = core.free_mib(self._device_of(needed))
            ready = all(core.slots[n].state is State.HEALTHY for n in needed)
            prio = policy.request_priority(needed, core.views(), priority)
            core.leases[client] = Lease(phase, frozenset(needed), prio)
            core.note(
                ev.PhaseEntered(
                    data={"client": client, "phase": phase, "services": needed, "priority": prio}
                )
            )
            now = core.clock.monotonic()
            for n in needed:
                core.slots[n].last_used = now
            core.cond.notify_all()
        stops: list[StopNote] = []
        if release:
            stops += self._release_others(needed, client, phase, deadline)
        started, evicted = self._ensure(
            needed, client, prio, deadline, f"client {client}, phase {phase}"
        )
        stops += evicted
        # Already in place and nothing stopped: this request changed nothing on the GPU.
        unchanged = ready and not started and not stops
        free_after = free_before if unchanged else core.free_mib(self._device_of(needed))
        prefetching = self._prefetch(phase, client) if not phase.startswith("service:") else ()
        return PhaseResult(
            phase=phase,
            client=client,
            started=tuple(started),
            kept=tuple(n for n in needed if n not in started),
            stopped=tuple(stops),
            waited_s=round(core.clock.monotonic() - t0, 4),
            free_before_mib=free_before,
            free_after_mib=free_after,
            prefetching=prefetching,
        )

    def _default_timeout(self, needed: Sequence[str]) -> float:
        # Room may have to be made first: allow one full stop and settle per running
        # service, then the slowest start.
        cfg = self.core.config
        starts = max((cfg.services[n].health.timeout_s for n in needed), default=0.0)
        stops = sum(s.stop_timeout_s + cfg.gpu.settle_timeout_s for s in cfg.services.values())
        return starts + stops + 10.0

    def _device_of(self, needed: Sequence[str]) -> int:
        return self.core.config.services[needed[0]].gpu if needed else 0

    def _check_open(self) -> None:
        if self.core.closed or self._closing:
            raise GpusmError("the coordinator is closed")

    def _my_turn(self, ticket: int, prio: int) -> bool:
        # Requests waiting for room are served highest priority first, then oldest.
        return all(
            p < prio or (p == prio and t >= ticket) for t, p in self._waiting.items() if t != ticket
        )

    def _ensure(
        self,
        needed: Sequence[str],
        client: str | None,
        prio: int,
        deadline: float,
        requester: str,
        prefetch: bool = False,
    ) -> tuple[list[str], list[StopNote]]:
        """Stop what the policy says, start what is missing, wait until all are healthy."""
        core = self.core
        started: list[str] = []
        stops: list[StopNote] = []
        mine: dict[str, int] = {}
        ticket = next(self._tickets)
        last_plan: policy.Plan | None = None
        try:
            while True:
                with core.cond:
                    self._check_open()
                    pending = [n for n in needed if core.slots[n].state is not State.HEALTHY]
                    if not pending:
                        return started, stops
                    self._raise_failures(pending, mine)
                    startable = [
                        n
                        for n in pending
                        if core.slots[n].state is State.STOPPED and not core.slots[n].busy
                    ]
                    if (
                        startable
                        and (not prefetch or not self._waiting)
                        and self._my_turn(ticket, prio)
                    ):
                        plan = self._plan(startable, client, prio, requester)
                        if plan.fits and not plan.victims:
                            self._waiting.pop(ticket, None)
                            if stops:
                                crash_point("mid_preemption")
                            self._start_all(plan.to_start, client, requester, prefetch, mine)
                            started += plan.to_start
                            if prefetch:
                                return started, stops  # a prefetch never waits for health
                            continue
                        if prefetch and not plan.fits:
                            return started, stops
                        if plan.fits:
                            # Stops already under way may make the room: stop nothing more.
                            if not self._drains_suffice(plan):
                                self._drain_victims(plan, client or requester, stops)
                        else:
                            last_plan = plan
                            if plan.need_mib > self._ceiling(startable):
                                raise plan.insufficient()  # no amount of waiting helps
                        if not prefetch:
                            # Hold our place until we start: the room being freed is ours.
                            self._waiting[ticket] = prio
                    left = deadline - core.clock.monotonic()
                    if left <= 0:
                        if last_plan is not None and not last_plan.fits:
                            raise last_plan.insufficient()
                        raise RequestTimeout(
                            f"{requester}: {', '.join(pending)} not healthy in time"
                        )
                    core.cond.wait(min(left, _POLL_S))
        finally:
            with core.cond:
                self._waiting.pop(ticket, None)
                core.cond.notify_all()

    def _raise_failures(self, pending: Sequence[str], mine: dict[str, int]) -> None:
        for n in pending:
            slot = self.core.slots[n]
            if slot.state is State.FAILED:
                raise ServiceStartFailed(
                    n, f"failed after its restart budget ({slot.last_error}); reset it first"
                )
            if (
                slot.state is State.STOPPED
                and not slot.busy
                and mine.get(n) == slot.generation
                and slot.last_error
            ):
                raise ServiceStartFailed(n, slot.last_error)

    def _plan(
        self, names: Sequence[str], client: str | None, prio: int, requester: str
    ) -> policy.Plan:
        core = self.core
        plans = []
        for device in sorted({core.config.services[n].gpu for n in names}):
            gpu, _, _ = core.gpu_view(device)
            on_device = [n for n in names if core.config.services[n].gpu == device]
            plans.append(
                policy.plan_admission(
                    on_device, core.views(device), core.other_leases(client), gpu, prio, requester
                )
            )
        return _merge(plans)

    def _drains_suffice(self, plan: policy.Plan) -> bool:
        """Whether the services already draining free enough for ``plan`` on their own."""
        core = self.core
        for device in sorted({core.config.services[n].gpu for n in plan.to_start}):
            views = core.views(device)
            draining = [n for n, v in views.items() if v.state is State.DRAINING]
            if not draining:
                return False
            gpu, _, _ = core.gpu_view(device)
            need = sum(views[n].reservation for n in plan.to_start if n in views)
            if need > policy.free_after_stopping(views, gpu, draining):
                return False
        return True

    def _drain_victims(self, plan: policy.Plan, by: str, stops: list[StopNote]) -> None:
        """Commit each victim's drain and start its stop at once (caller holds the lock)."""
        for victim in plan.victims:
            slot = self.core.slots[victim.name]
            cls = ev.Preempted if victim.kind == "preempt" else ev.Evicted
            data = {"reason": victim.reason, "by": by, "for": list(plan.to_start)}
            if begin_drain(self.core, slot, cls(data=data)):
                wait = victim.kind == "preempt"
                in_background(f"stop-{slot.name}", partial(finish_stop, self.core, slot, wait))
            stops.append(StopNote(victim.name, victim.kind, victim.reason))

    def _ceiling(self, names: Sequence[str]) -> int:
        """The most any request for ``names`` could ever get: total - reserve.

        Foreign usage is left out on purpose: it comes and goes (a crashed service's
        memory counts as foreign until the driver frees it), so it is waited out.
        """
        # Only the device's size matters here: no need to attribute its processes.
        core = self.core
        total = core.snapshot(core.config.services[names[0]].gpu).total_mib
        return total - core.config.gpu.reserve_mib

    def _start_all(
        self,
        names: Sequence[str],
        client: str | None,
        requester: str,
        prefetch: bool,
        mine: dict[str, int],
    ) -> None:
        for n in names:
            slot = self.core.slots[n]
            reason = f"prefetch for {requester}" if prefetch else f"needed by {requester}"
            begin_start(self.core, slot, {"reason": reason, "by": client, "prefetch": prefetch})
            mine[n] = slot.generation
            in_background(f"start-{n}", partial(run_start, self.core, slot))

    def _release_others(
        self, needed: Sequence[str], client: str, phase: str, deadline: float
    ) -> list[StopNote]:
        core = self.core
        # Keep what the pipeline's next GPU phase needs: it may be warming up already.
        upcoming = _next_gpu_phase(core.config, phase)
        spared = list(needed) + (list(core.config.phases[upcoming].services) if upcoming else [])
        with core.cond:
            names = policy.release_plan(spared, core.views(), core.other_leases(client))
        reason = f"phase {phase} releases the GPU (client {client})"
        return self._stop_and_wait(names, reason, client, deadline, "release")

    def _stop_and_wait(
        self, names: Sequence[str], reason: str, by: str | None, deadline: float, kind: str
    ) -> list[StopNote]:
        core = self.core
        notes = []
        with core.cond:
            for n in names:
                slot = core.slots[n]
                if begin_drain(core, slot, ev.DrainRequested(data={"reason": reason, "by": by})):
                    in_background(f"stop-{n}", partial(finish_stop, core, slot))
                notes.append(StopNote(n, kind, reason))
            while any(core.slots[n].state is State.DRAINING for n in names):
                left = deadline - core.clock.monotonic()
                if left <= 0:
                    raise RequestTimeout(f"stopping {', '.join(names)} took too long")
                core.cond.wait(min(left, _POLL_S))
        return notes

    def _prefetch(self, phase: str, client: str) -> tuple[str, ...]:
        """Start the next GPU phase's services in the background if they fit beside us."""
        try:
            return self._try_prefetch(phase, client)
        except GpusmError:
            return ()  # an optional head start; the phase itself already succeeded

    def _try_prefetch(self, phase: str, client: str) -> tuple[str, ...]:
        core = self.core
        upcoming = _next_gpu_phase(core.config, phase)
        if upcoming is None:
            return ()
        needed = list(core.config.phases[upcoming].services)
        with core.cond:
            missing = [n for n in needed if core.slots[n].state not in RUNNING_STATES]
            if not missing or self._waiting:
                return ()
            plan = self._plan(missing, None, _PREFETCH_PRIORITY, f"phase {upcoming}")
            if not plan.fits:
                return ()
        requester = f"phase {upcoming} (next after {phase}, client {client})"
        deadline = core.clock.monotonic() + self._default_timeout(needed)
        in_background(
            f"prefetch-{upcoming}",
            partial(self._ensure, needed, None, _PREFETCH_PRIORITY, deadline, requester, True),
        )
        return tuple(missing)

    # ------------------------------------------------------------ leases and services
    def release(self, client: str = "default") -> None:
        """Drop ``client``'s lease; its services stay warm until their room is needed."""
        with self.core.cond:
            lease = self.core.leases.pop(client, None)
            if lease is not None:
                self.core.note(ev.LeaseReleased(data={"client": client, "phase": lease.phase}))
            self.core.cond.notify_all()

    def release_all(self, by: str = "release_all") -> list[StopNote]:
        """Drop every lease and stop every running service (the plan's CPU-phase release)."""
        core = self.core
        with core.cond:
            for client in list(core.leases):
                self.release(client)
            names = [s.name for s in core.slots.values() if s.state in RUNNING_STATES]
        deadline = core.clock.monotonic() + self._default_timeout([])
        return self._stop_and_wait(
            names, f"release of every service by {by}", by, deadline, "release"
        )

    def start_service(self, name: str, by: str = "api", timeout: float | None = None) -> None:
        """Start one service without a lease (it is idle once healthy)."""
        slot = self.core.slots[self.core.config.service(name).name]
        deadline = self.core.clock.monotonic() + (timeout or self._default_timeout([name]))
        self._ensure([name], None, slot.config.priority, deadline, f"start requested by {by}")

    def stop_service(self, name: str, by: str = "api") -> StopNote:
        """Stop one service now (leases that hold it find it stopped)."""
        self.core.config.service(name)
        deadline = self.core.clock.monotonic() + self._default_timeout([])
        return self._stop_and_wait([name], f"stop requested by {by}", by, deadline, "stop")[0]

    def reset_service(self, name: str, by: str = "api") -> None:
        """Clear a service that gave up (``failed``) so that it may start again."""
        slot = self.core.slots[self.core.config.service(name).name]
        with self.core.cond:
            if slot.state is State.FAILED:
                slot.start_times.clear()
                self.core.record(slot, ev.Reset(data={"by": by}))

    def wait_settled(self, timeout: float = 60.0) -> bool:
        """Wait until no service is starting or draining (prefetches included); True if so."""
        core = self.core
        deadline = core.clock.monotonic() + timeout
        with core.cond:
            while any(s.state in (State.STARTING, State.DRAINING) for s in core.slots.values()):
                left = deadline - core.clock.monotonic()
                if left <= 0 or core.closed:
                    return False
                core.cond.wait(min(left, _POLL_S))
        return True

    # ------------------------------------------------------------ reading
    def plan_phase(
        self, name: str, client: str = "default", priority: int | None = None
    ) -> policy.Plan:
        """Dry run: what entering ``name`` would stop and start, or why it cannot fit."""
        needed = list(self.core.config.phase(name).services)
        core = self.core
        with core.cond:
            prio = policy.request_priority(needed, core.views(), priority)
            missing = [n for n in needed if core.slots[n].state not in RUNNING_STATES]
            if not missing:
                device = self._device_of(needed)
                gpu = core.gpu_view(device)[0]
                return policy.plan_admission([], core.views(device), {}, gpu, prio)
            return self._plan(missing, client, prio, f"client {client}, phase {name}")

    def events(self, query: EventQuery | None = None) -> list[RecordedEvent]:
        """Events from the log (see :class:`gpusm.ports.EventQuery`); all when None."""
        return self.core.store.read(query or EventQuery())

    def status(self) -> Status:
        """Devices, services and leases now."""
        core = self.core
        with core.cond:
            usage: dict[str, int] = {}
            devices = tuple(_device_status(core, d, usage) for d in core.devices())
            now = core.clock.monotonic()
            services = tuple(
                ServiceStatus(
                    name=s.name,
                    state=s.state.value,
                    runtime=s.config.runtime,
                    gpu=s.config.gpu,
                    priority=s.config.priority,
                    vram_mib=s.config.vram_mib,
                    reservation_mib=s.reservation,
                    used_mib=usage.get(s.name, 0),
                    pid=s.handle.pid if s.handle else None,
                    container_id=s.handle.container_id if s.handle else None,
                    leased_by=tuple(
                        sorted(c for c, lease in core.leases.items() if s.name in lease.services)
                    ),
                    in_state_s=round(now - s.state_since, 3),
                    last_error=s.last_error,
                )
                for s in core.slots.values()
            )
            leases = {c: lease.phase for c, lease in core.leases.items()}
        return Status(self.recovered, devices, services, leases)


def _device_status(core: Core, device: int, usage: dict[str, int]) -> DeviceStatus:
    """One device's numbers; adds each of our services' use of it to ``usage``."""
    try:
        gpu, snap, owners = core.gpu_view(device)
    except GpusmError as exc:
        return DeviceStatus(device, "unreadable", 0, 0, 0, 0, 0, error=str(exc))
    for pid, owner in owners.items():
        usage[owner] = usage.get(owner, 0) + snap.processes.get(pid, 0)
    return DeviceStatus(
        index=device,
        name=snap.name,
        total_mib=snap.total_mib,
        used_mib=snap.used_mib,
        free_mib=snap.free_mib,
        foreign_mib=gpu.foreign_mib,
        free_for_admission_mib=policy.free_for_admission(core.views(device), gpu),
    )


def _merge(plans: Sequence[policy.Plan]) -> policy.Plan:
    """One plan from per-device plans: it fits only if every device fits."""
    if len(plans) == 1:
        return plans[0]
    failing = [p for p in plans if not p.fits]
    if failing:
        return failing[0]
    first = plans[0]
    return replace(
        first,
        need_mib=sum(p.need_mib for p in plans),
        to_start=tuple(n for p in plans for n in p.to_start),
        already_running=tuple(n for p in plans for n in p.already_running),
        victims=tuple(v for p in plans for v in p.victims),
        reason="; ".join(p.reason for p in plans),
    )


def _next_gpu_phase(config: Config, phase: str) -> str | None:
    """The next phase in the pipeline (wrapping around) that needs a GPU service."""
    order = config.pipeline
    if phase not in order:
        return None
    start = order.index(phase)
    for step in range(1, len(order) + 1):
        candidate = order[(start + step) % len(order)]
        if config.phases[candidate].services:
            return candidate if candidate != phase else None
    return None
