"""The coordinator: a worker names its phase, gpusm makes exactly the right services run.

``Coordinator.from_config(path)`` (built by :mod:`gpusm.wiring`) takes the state
directory's lock, opens the event store, recovers (replay, observe, reconcile) and only
then returns. Every public verb is safe to call from several threads; decisions are
taken under one lock and recorded before their side effects.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Protocol

from gpusm.config import Config, load_config
from gpusm.domain import events as ev
from gpusm.domain import policy
from gpusm.domain.events import RecordedEvent
from gpusm.domain.states import RUNNING_STATES, SETTLING_STATES, State
from gpusm.engine.admission import Admission, Request
from gpusm.engine.lifecycle import finish_stop, in_background, join_background
from gpusm.engine.monitor import Monitor
from gpusm.engine.parking import park_now
from gpusm.engine.reconcile import recover
from gpusm.engine.reload import loaded_at_text, reload_config, retire_stale
from gpusm.engine.state import Engine, Lease
from gpusm.errors import ConfigError, GpusmError, ReloadRefused
from gpusm.ports import Clock, EventQuery, Handle
from gpusm.results import (
    DeviceStatus,
    PhaseResult,
    ReloadResult,
    ServiceStatus,
    Status,
    StopNote,
)

__all__ = ["Coordinator", "Opener", "set_opener"]

_POLL_S = 0.2


class Opener(Protocol):
    """Builds a recovered coordinator from a config (``gpusm.wiring.open_coordinator``)."""

    def __call__(
        self, config: Config, *, clock: Clock | None = ..., monitor: bool = ...
    ) -> Coordinator: ...


_opener: Opener | None = None


def set_opener(opener: Opener) -> None:
    """Install what :meth:`Coordinator.from_config` calls; ``gpusm.wiring`` does on import."""
    global _opener
    _opener = opener


@dataclass(frozen=True)
class _Phase:
    """What a request asks for: a phase's services, or one service (``ensure``)."""

    name: str
    needed: list[str]
    release: bool = False
    # A pipeline phase prefetches the next GPU phase; a single-service ensure does not.
    pipelined: bool = True
    ttl_s: float | None = None
    # A one-off client's lease (a proxied request) is not logged: only what it changes.
    quiet: bool = False
    cancelled: threading.Event | None = None


class Coordinator:
    """Owns the GPU services of one state directory; see the module docstring."""

    def __init__(self, engine: Engine, on_close: Callable[[], None] | None = None) -> None:
        self._engine = engine
        self._on_close = on_close
        self._admission = Admission(engine)
        self.recovered = False
        self._monitor: Monitor | None = None
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
        if _opener is None:  # pragma: no cover - importing gpusm installs it
            raise GpusmError("gpusm.wiring is not loaded; import gpusm first")
        cfg = config if isinstance(config, Config) else load_config(Path(config))
        return _opener(cfg, clock=clock, monitor=monitor)

    @classmethod
    def open(
        cls, engine: Engine, *, monitor: bool = True, on_close: Callable[[], None] | None = None
    ) -> Coordinator:
        """Recover ``engine`` (replay, observe, reconcile), then start the monitor."""
        coordinator = cls(engine, on_close)
        try:
            recover(engine)
            coordinator.recovered = True
            if monitor:
                coordinator._monitor = Monitor(engine)
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

    @property
    def config(self) -> Config:
        """The configuration this coordinator runs."""
        return self._engine.config

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has finished."""
        return self._engine.closed

    def close(self, stop_services: bool = False) -> None:
        """Stop the monitor and release the lock; services keep running unless asked."""
        engine = self._engine
        if engine.closed or self._admission.closing:
            return
        with engine.cond:
            # From here on no request or prefetch starts anything new.
            self._admission.closing = True
            engine.cond.notify_all()
        try:
            if stop_services:
                self.release_all(by="close")
        finally:
            with engine.cond:
                engine.closed = True
                engine.cond.notify_all()
            if self._monitor is not None:
                self._monitor.stop()
            join_background(timeout_s=30.0)
            closers = [engine.health.close, engine.probe.close, engine.store.close]
            if engine.control is not None:
                closers.insert(1, engine.control.close)
            closers += [runtime.close for runtime in engine.runtimes.values()]
            for closer in closers:
                # Closing is best effort; nothing recorded is at stake.
                with contextlib.suppress(GpusmError):
                    closer()
            if self._on_close is not None:
                self._on_close()

    # ------------------------------------------------------------ phases
    def enter_phase(
        self,
        name: str,
        client: str = "default",
        timeout: float | None = None,
        priority: int | None = None,
        lease_ttl_s: float | None = None,
    ) -> PhaseResult:
        """Make exactly ``name``'s services healthy for ``client``; block until they are.

        ``client`` then holds the phase's services (its lease) until it enters another
        phase, releases, or the lease ends: revoked when a service of it is preempted or
        stopped (the next result says why), or, with ``lease_ttl_s``, expired when the
        client is not heard from (any call, or :meth:`renew`) for that long.
        """
        phase = self._engine.config.phase(name)
        request = _Phase(name, list(phase.services), phase.release, ttl_s=lease_ttl_s)
        return self._enter(request, client, timeout, priority)

    def ensure_service(
        self,
        name: str,
        client: str = "default",
        timeout: float | None = None,
        lease_ttl_s: float | None = None,
        *,
        quiet: bool = False,
        priority: int | None = None,
        cancelled: threading.Event | None = None,
    ) -> PhaseResult:
        """Make one service healthy for ``client`` (its lease becomes just that service).

        ``quiet``: the lease itself is not logged (no ``PhaseEntered``, and no
        ``LeaseReleased`` from :meth:`end_client`), for one-off clients such as proxied
        requests; what it starts or stops is logged as always. ``priority``: the
        request's own (default: the service's). ``cancelled``: once set (see
        :meth:`cancel`), the request stops waiting with RequestCancelled and drains
        what it started that nobody else holds or waits for.
        """
        self._engine.config.service(name)
        request = _Phase(
            f"service:{name}",
            [name],
            pipelined=False,
            ttl_s=lease_ttl_s,
            quiet=quiet,
            cancelled=cancelled,
        )
        return self._enter(request, client, timeout, priority)

    def try_hold(self, name: str, client: str, priority: int | None = None) -> PhaseResult | None:
        """:meth:`ensure_service` (quiet, no TTL) without blocking, for a service that is
        healthy now: hold it for ``client`` if the engine's lock is free this instant,
        and return what ensure_service would; None when it cannot be done at once (the
        lock is taken, the service is not healthy, the coordinator is closing) — then
        call ensure_service. For an event loop, which must not wait on the lock."""
        engine = self._engine
        if not engine.cond.acquire(blocking=False):
            return None
        try:
            slot = engine.slots.get(name)
            if (
                engine.closed
                or self._admission.closing
                or slot is None
                or slot.removed
                or slot.state is not State.HEALTHY
                or client in engine.leases
            ):
                return None
            prio = priority if priority is not None else slot.config.priority
            engine.leases.hold(client, Lease(f"service:{name}", frozenset([name]), prio, None))
            slot.touch(engine.clock.monotonic())
            engine.cond.notify_all()
        finally:
            engine.cond.release()
        return PhaseResult(
            phase=f"service:{name}",
            client=client,
            started=(),
            kept=(name,),
            stopped=(),
            waited_s=0.0,
            free_before_mib=None,
            free_after_mib=None,
            prefetching=(),
            lease_revoked=None,
        )

    def cancel(self, cancelled: threading.Event) -> None:
        """Set ``cancelled`` (given to :meth:`ensure_service`); the waiting request sees
        it at once if the engine's lock is free (it is woken), else at its next poll
        (a fifth of a second). Never blocks: an event loop may call it."""
        cancelled.set()
        if self._engine.cond.acquire(blocking=False):
            try:
                self._engine.cond.notify_all()
            finally:
                self._engine.cond.release()

    def renew(self, client: str) -> bool:
        """``client`` is alive: its lease's TTL starts again. False if it holds no lease
        (it expired or was revoked: enter the phase again)."""
        with self._engine.cond:
            return self._engine.leases.renew(client)

    def reload(self, config: Config | None = None, by: str = "api") -> ReloadResult:
        """Replace the running config by ``config`` (default: the file it was read from,
        read again) without a restart; see :mod:`gpusm.engine.reload` for what each change
        does. ReloadRefused, with the running config unchanged, if the file is invalid or
        changes what only a restart can."""
        if config is None:
            source = self._engine.config.source
            if source is None:
                raise ReloadRefused("this coordinator's config was not read from a file")
            try:
                config = load_config(source)
            except ConfigError as exc:
                raise ReloadRefused(str(exc)) from exc
        result = reload_config(self._engine, config, by)
        with self._engine.decision():
            stale = retire_stale(self._engine)
        for slot in stale:
            in_background(f"stop-{slot.name}", partial(finish_stop, self._engine, slot))
        return result

    def lease_expires_s(self, client: str) -> float | None:
        """Seconds until ``client``'s lease expires unheard-from; None if it has no TTL
        (or no lease)."""
        with self._engine.cond:
            return self._engine.leases.expires_in(client)

    def _enter(
        self, phase: _Phase, client: str, timeout: float | None, priority: int | None
    ) -> PhaseResult:
        # One request at a time per client: a client has one current phase, and two
        # concurrent requests would each see the other's services as idle.
        with self._client_lock(client):
            return self._enter_locked(phase, client, timeout, priority)

    def _client_lock(self, client: str) -> threading.Lock:
        with self._engine.cond:
            return self._client_locks.setdefault(client, threading.Lock())

    def _enter_locked(
        self, phase: _Phase, client: str, timeout: float | None, priority: int | None
    ) -> PhaseResult:
        engine = self._engine
        needed = phase.needed
        t0 = engine.clock.monotonic()
        budget = timeout if timeout is not None else self._admission.default_timeout(needed)
        deadline = t0 + budget
        with engine.decision():
            self._admission.check_open()
            # A quiet (proxied) request on the hot path reads no GPU for numbers nobody
            # logs: admission reads it when something must start.
            free_before = None if phase.quiet else engine.free_mib(self._device_of(needed))
            ready = all(engine.slots[n].state is State.HEALTHY for n in needed)
            prio = policy.request_priority(needed, engine.views(), priority)
            revoked = engine.leases.take_revocation(client)
            lease = Lease(phase.name, frozenset(needed), prio, phase.ttl_s)
            engine.leases.hold(client, lease)
            if not phase.quiet:
                data = {"client": client, "phase": phase.name, "services": needed}
                engine.note(ev.PhaseEntered(data={**data, "priority": prio}))
            now = engine.clock.monotonic()
            for n in needed:
                engine.slots[n].touch(now)
            engine.cond.notify_all()
        stops: list[StopNote] = []
        if phase.release:
            stops += self._release_others(needed, client, phase.name, deadline)
        requester = f"client {client}, phase {phase.name}"
        started, evicted = self._admission.ensure(
            Request(
                needed,
                client,
                prio,
                deadline,
                requester,
                phase=phase.name,
                cancelled=phase.cancelled,
            )
        )
        stops += evicted
        with engine.cond:
            late = engine.leases.take_revocation(client)
            if late is not None:
                # Revoked while it waited (a service of it was preempted, stopped or
                # removed): say so, and hold nothing.
                revoked = late
            elif client not in engine.leases:
                # Expired while it waited: it is in this phase now all the same.
                engine.leases.hold(client, lease)
        # Already in place and nothing stopped: this request changed nothing on the GPU.
        unchanged = ready and not started and not stops
        free_after = (
            free_before if unchanged or phase.quiet else engine.free_mib(self._device_of(needed))
        )
        prefetching: tuple[str, ...] = ()
        upcoming = self._next_gpu_phase(phase.name) if phase.pipelined else None
        if upcoming is not None:
            prefetching = self._admission.prefetch(upcoming, phase.name, client)
        return PhaseResult(
            phase=phase.name,
            client=client,
            started=tuple(started),
            kept=tuple(n for n in needed if n not in started),
            stopped=tuple(stops),
            waited_s=round(engine.clock.monotonic() - t0, 4),
            free_before_mib=free_before,
            free_after_mib=free_after,
            prefetching=prefetching,
            lease_revoked=revoked,
        )

    def _next_gpu_phase(self, phase: str) -> str | None:
        cfg = self._engine.config
        services = {name: p.services for name, p in cfg.phases.items()}
        return policy.next_gpu_phase(cfg.pipeline, services, phase)

    def _device_of(self, needed: Sequence[str]) -> int:
        return self._engine.slots[needed[0]].device if needed else 0

    def _release_others(
        self, needed: Sequence[str], client: str, phase: str, deadline: float
    ) -> list[StopNote]:
        engine = self._engine
        # Keep what the pipeline's next GPU phase needs: it may be warming up already.
        upcoming = self._next_gpu_phase(phase)
        spared = list(needed) + (list(engine.config.phases[upcoming].services) if upcoming else [])
        with engine.cond:
            names = policy.release_plan(spared, engine.views(), engine.other_leases(client))
        reason = f"phase {phase} releases the GPU (client {client})"
        # What can park parks: the GPU gets all but the residuals, and a wake is seconds.
        return self._admission.stop_and_wait(names, reason, client, deadline, "release", park=True)

    # ------------------------------------------------------------ leases and services
    def release(self, client: str = "default") -> None:
        """Drop ``client``'s lease; its services stay warm until their room is needed."""
        with self._engine.cond:
            lease = self._engine.leases.drop(client)
            if lease is not None:
                self._touch(lease.services)
                self._engine.note(ev.LeaseReleased(data={"client": client, "phase": lease.phase}))
            self._engine.cond.notify_all()

    def _touch(self, services: frozenset[str]) -> None:
        """A lease on ``services`` just ended: their idle time counts from now (for a
        proxied request, from its answer's last byte), not from when it began."""
        now = self._engine.clock.monotonic()
        for name in services:
            slot = self._engine.slots.get(name)
            if slot is not None:
                slot.touch(now)

    def service_state(self, name: str) -> State:
        """The state ``name`` is in now (UnknownName if the config lacks it)."""
        return self._engine.slots[self._engine.config.service(name).name].state

    def note_proxied(self, data: dict[str, object]) -> None:
        """Record a proxied request that started, woke or stopped something (the audit's
        answer to "why did this start?" when no worker asked)."""
        with self._engine.cond:
            self._engine.note(ev.ProxiedRequest(data=data))

    def end_client(self, client: str, quiet: bool = False) -> None:
        """``client`` is gone for good (e.g. one proxied request): drop its lease, any
        note of its revocation and its request lock, so that a daemon serving millions
        of one-off clients keeps nothing of them. ``quiet``: no ``LeaseReleased``."""
        with self._engine.cond:
            self._end_client_locked(client, quiet)

    def try_end_client(self, client: str, quiet: bool = False) -> bool:
        """:meth:`end_client` if the engine's lock is free this instant (True), else
        nothing (False: call end_client). For an event loop."""
        if not self._engine.cond.acquire(blocking=False):
            return False
        try:
            self._end_client_locked(client, quiet)
        finally:
            self._engine.cond.release()
        return True

    def _end_client_locked(self, client: str, quiet: bool) -> None:
        lease = self._engine.leases.drop(client)
        if lease is not None:
            self._touch(lease.services)
            if not quiet:
                data = {"client": client, "phase": lease.phase}
                self._engine.note(ev.LeaseReleased(data=data))
        self._engine.cond.notify_all()
        self._engine.leases.take_revocation(client)
        lock = self._client_locks.get(client)
        if lock is not None and not lock.locked():
            del self._client_locks[client]

    def release_all(self, by: str = "release_all") -> list[StopNote]:
        """Drop every lease and stop every running service (the plan's CPU-phase release)."""
        engine = self._engine
        with engine.cond:
            for client in list(engine.leases):
                self.release(client)
            names = [
                s.name
                for s in engine.slots.values()
                if s.state in RUNNING_STATES or s.state in (State.PARKING, State.PARKED)
            ]
        deadline = engine.clock.monotonic() + self._admission.default_timeout([])
        return self._admission.stop_and_wait(
            names, f"release of every service by {by}", by, deadline, "release"
        )

    def start_service(self, name: str, by: str = "api", timeout: float | None = None) -> None:
        """Start one service without a lease (it is idle once healthy)."""
        slot = self._engine.slots[self._engine.config.service(name).name]
        budget = timeout or self._admission.default_timeout([name])
        deadline = self._engine.clock.monotonic() + budget
        requester = f"start requested by {by}"
        self._admission.ensure(Request([name], None, slot.config.priority, deadline, requester))

    def stop_service(self, name: str, by: str = "api") -> StopNote:
        """Stop one service now; the leases that hold it are revoked."""
        self._engine.config.service(name)
        with self._engine.cond:
            self._engine.revoke(name, f"{name} was stopped by {by}")
        deadline = self._engine.clock.monotonic() + self._admission.default_timeout([])
        return self._admission.stop_and_wait(
            [name], f"stop requested by {by}", by, deadline, "stop"
        )[0]

    def park_service(self, name: str, by: str = "api") -> StopNote:
        """Park one healthy service now (its leases are revoked) and wait until the GPU
        shows it holding only its residual; a park that fails ends in a verified stop
        (the note's ``action`` says which)."""
        slot = self._engine.slots[self._engine.config.service(name).name]
        deadline = self._engine.clock.monotonic() + self._admission.default_timeout([])
        return park_now(self._engine, slot, by, deadline)

    def reset_service(self, name: str, by: str = "api") -> None:
        """Clear a service that gave up (``failed``) so that it may start again."""
        slot = self._engine.slots[self._engine.config.service(name).name]
        with self._engine.cond:
            if slot.state is State.FAILED:
                slot.reset_budget()
                # FAILED -> STOPPED
                self._engine.record(slot, ev.Reset(data={"by": by}))

    def wait_settled(self, timeout: float = 60.0) -> bool:
        """Wait until no service is starting, draining, parking or waking (prefetches
        included); True if so."""
        engine = self._engine
        deadline = engine.clock.monotonic() + timeout
        with engine.cond:
            while self._admission.prefetching or any(
                s.state in SETTLING_STATES for s in engine.slots.values()
            ):
                left = deadline - engine.clock.monotonic()
                if left <= 0 or engine.closed:
                    return False
                engine.cond.wait(min(left, _POLL_S))
        return True

    # ------------------------------------------------------------ reading
    def plan_phase(
        self, name: str, client: str = "default", priority: int | None = None
    ) -> policy.Plan:
        """Dry run: what entering ``name`` would stop and start, or why it cannot fit."""
        needed = list(self._engine.config.phase(name).services)
        engine = self._engine
        with engine.decision():
            prio = policy.request_priority(needed, engine.views(), priority)
            missing = [n for n in needed if engine.slots[n].state not in RUNNING_STATES]
            if not missing:
                device = self._device_of(needed)
                gpu = engine.gpu_view(device)[0]
                return policy.plan_admission([], engine.views(device), {}, gpu, prio)
            requester = f"client {client}, phase {name}"
            return self._admission.plan(missing, client, prio, requester, name)

    def events(self, query: EventQuery | None = None) -> list[RecordedEvent]:
        """Events from the log (see :class:`gpusm.ports.EventQuery`); all when None."""
        return self._engine.store.read(query or EventQuery())

    def status(self) -> Status:
        """Devices, services and leases now."""
        engine = self._engine
        with engine.decision():
            usage: dict[str, int] = {}
            devices = tuple(_device_status(engine, d, usage) for d in engine.devices())
            now = engine.clock.monotonic()
            # What admission counts each as holding (a parked one: its residual).
            views = engine.views()
            services = tuple(
                ServiceStatus(
                    name=s.name,
                    state=s.state.value,
                    runtime=s.config.runtime,
                    gpu=s.device,
                    devices=s.placed,
                    priority=s.config.priority,
                    vram_mib=s.config.vram_mib,
                    reservation_mib=views[s.name].reservation,
                    used_mib=usage.get(s.name, 0),
                    pid=s.handle.pid if s.handle else None,
                    container_id=s.handle.container_id if s.handle else None,
                    leased_by=tuple(
                        sorted(c for c, lease in engine.leases.items() if s.name in lease.services)
                    ),
                    in_state_s=round(now - s.state_since, 3),
                    last_error=s.last_error,
                    residual_mib=s.residual_mib,
                )
                for s in engine.slots.values()
            )
            leases = {c: lease.phase for c, lease in engine.leases.items()}
            expiry = {c: engine.leases.expires_in(c) for c in leases}
            expires = {c: round(s, 3) for c, s in expiry.items() if s is not None}
            loaded = loaded_at_text(engine.loaded_at)
            config = engine.config_hash
        return Status(self.recovered, devices, services, leases, expires, config, loaded)

    def instances(self) -> dict[str, Handle]:
        """The running instance of each service that has one (pid and create time, or
        container), with the runtime that runs it."""
        with self._engine.cond:
            return {s.name: s.handle for s in self._engine.slots.values() if s.handle}

    def queued(self) -> int:
        """How many requests wait in the queue for room to be made."""
        with self._engine.cond:
            return len(self._admission.waiting)

    def oom_count(self) -> int | None:
        """Out-of-memory failures the GPU backend has seen (None if it cannot know)."""
        return self._engine.probe.oom_count()


def _device_status(engine: Engine, device: int, usage: dict[str, int]) -> DeviceStatus:
    """One device's numbers; adds each of our services' use of it to ``usage``."""
    try:
        gpu, snap, owners = engine.gpu_view(device)
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
        free_for_admission_mib=policy.free_for_admission(engine.views(device), gpu),
    )
