"""Making room and starting: the loop every request (phase, ensure, start, prefetch) runs.

A :class:`Request` names the services it needs, who asks, at what priority and until
when. :meth:`Admission.ensure` loops under the engine's lock: plan with the pure policy,
drain the plan's victims, start what fits, and wait (in a priority queue of tickets)
until every needed service is healthy, the request fails, or its deadline passes.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import partial

from gpusm.crashpoints import crash_point
from gpusm.domain import events as ev
from gpusm.domain import placement, policy
from gpusm.domain.pipeline import PrefetchLimits, next_uses
from gpusm.domain.states import ACTIVE_STATES, RUNNING_STATES, State
from gpusm.engine.lifecycle import begin_drain, begin_start, finish_stop, in_background, run_start
from gpusm.engine.parking import begin_park, begin_wake, finish_park, run_wake
from gpusm.engine.state import Engine
from gpusm.errors import (
    GpusmError,
    InsufficientVram,
    RequestCancelled,
    RequestTimeout,
    ServiceStartFailed,
    UnknownName,
)
from gpusm.results import StopNote

__all__ = ["PREFETCH_PRIORITY", "Admission", "Request"]

# Below every configured priority: a prefetch may only evict idle services.
PREFETCH_PRIORITY = -(2**62)
_POLL_S = 0.2


@dataclass
class Request:
    """One request for services; ``client`` None means nobody holds them afterwards."""

    needed: Sequence[str]
    client: str | None
    priority: int
    deadline: float
    requester: str
    prefetch: bool = False
    # The phase the request is for (entered, or prefetched after): the pipeline's now.
    phase: str | None = None
    limits: PrefetchLimits | None = None
    started: list[str] = field(default_factory=list)
    stops: list[StopNote] = field(default_factory=list)
    # The start generation of each service this request started, to know its failures.
    mine: dict[str, int] = field(default_factory=dict)
    last_plan: policy.Plan | None = None
    # A prefetch that evicted and then gave up has said so in the log.
    abandoned: bool = False
    # Set when the requester stops waiting (a proxied client hung up): the request
    # ends with RequestCancelled, and what it alone started is drained.
    cancelled: threading.Event | None = None


class Admission:
    """The request queue of one engine; see the module docstring."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._tickets = itertools.count(1)
        # ticket -> priority of every request holding its place for room being freed.
        self.waiting: dict[int, int] = {}
        self.closing = False
        # ticket -> the services each waiting request needs.
        self._wanted: dict[int, frozenset[str]] = {}
        # upcoming phase -> the engine version at which its prefetch last found no room.
        self._prefetch_checked: dict[str, int] = {}
        # Prefetches handed to a thread and not finished: wait_settled waits for them.
        self.prefetching = 0

    def check_open(self) -> None:
        """GpusmError once the coordinator is closing: nothing new starts."""
        if self.engine.closed or self.closing:
            raise GpusmError("the coordinator is closed")

    # ------------------------------------------------------------ the loop
    def ensure(self, req: Request) -> tuple[list[str], list[StopNote]]:
        """Stop what the policy says, start what is missing, wait until all are healthy.

        Returns (started, stopped). A prefetch returns as soon as it started what it
        could (it never waits for health), or when its plan does not fit.
        """
        engine = self.engine
        ticket = next(self._tickets)
        try:
            while True:
                with engine.cond:
                    self.check_open()
                    if req.cancelled is not None and req.cancelled.is_set():
                        raise self._cancel(req)
                    with engine.decision():
                        done = self._step(req, ticket)
                    if done:
                        return req.started, req.stops
                    left = req.deadline - engine.clock.monotonic()
                    if left <= 0:
                        raise self._timed_out(req)
                    engine.cond.wait(min(left, _POLL_S))
        except Exception as exc:
            if req.prefetch and req.stops:
                self._abandon(req, f"{type(exc).__name__}: {exc}")
            elif isinstance(exc, InsufficientVram) and not req.prefetch:
                self._refused(req, exc)
            raise
        finally:
            with engine.cond:
                self.waiting.pop(ticket, None)
                self._wanted.pop(ticket, None)
                engine.cond.notify_all()

    def _step(self, req: Request, ticket: int) -> bool:
        """One pass under the lock; True when the request is done."""
        slots = self.engine.slots
        for n in req.needed:
            slot = slots.get(n)
            if slot is None or slot.removed:
                # A reload removed it while this request waited.
                raise UnknownName("service", n, list(self.engine.config.services))
        pending = [n for n in req.needed if slots[n].state is not State.HEALTHY]
        if not pending:
            return True
        self._raise_failures(pending, req.mine)
        # A parked service is woken rather than started.
        startable = [
            n
            for n in pending
            if slots[n].state in (State.STOPPED, State.PARKED) and not slots[n].busy
        ]
        if not startable:
            return req.prefetch and bool(req.started)  # a prefetch never waits for health
        if req.prefetch and self.waiting:
            # A request waits for room: a prefetch yields to it. One that already
            # evicted hands over to a request for the same services (which starts them),
            # or gives up (the room is the waiting request's); else it waits its turn.
            if not req.stops:
                return False
            if any(set(pending) <= wanted for wanted in self._wanted.values()):
                return True
            return self._abandon(req, "a request is waiting for room")
        if not policy.is_my_turn(ticket, req.priority, self.waiting):
            return False
        plan = self.plan(startable, req.client, req.priority, req.requester, req.phase, req.limits)
        if plan.fits and not plan.victims:
            self.waiting.pop(ticket, None)
            self._wanted.pop(ticket, None)
            if req.stops:
                crash_point("mid_preemption")
            self._start_all(plan.to_start, req, plan.devices)
            req.started += plan.to_start
            return req.prefetch  # a prefetch never waits for health
        return self._make_room(req, ticket, plan, startable)

    def _make_room(
        self, req: Request, ticket: int, plan: policy.Plan, startable: Sequence[str]
    ) -> bool:
        """The plan needs stops first, or does not fit yet; True when the request is done."""
        if req.prefetch and not plan.fits:
            # What this prefetch evicted is still draining: wait for it, then start.
            if req.stops and self._drains_suffice(plan):
                return False
            return self._abandon(req, plan.reason or "it no longer fits")
        if plan.fits:
            # Stops already under way may make the room: stop nothing more.
            if not self._drains_suffice(plan):
                self._drain_victims(plan, req)
        else:
            req.last_plan = plan
            if self._never_fits(startable):
                raise plan.insufficient()  # no amount of waiting helps
        if not req.prefetch:
            # Hold our place until we start: the room being freed is ours.
            self.waiting[ticket] = req.priority
            self._wanted[ticket] = frozenset(req.needed)
        return False

    def _abandon(self, req: Request, why: str) -> bool:
        """A prefetch gives up; if it evicted anything, the log says why nothing followed.

        Returns True (the prefetch is done).
        """
        if req.stops and not req.abandoned:
            req.abandoned = True
            evicted = [s.service for s in req.stops]
            data = {"for": list(req.needed), "evicted": evicted, "reason": why}
            with self.engine.cond:
                self.engine.note(ev.PrefetchAbandoned(data={**data, "by": req.requester}))
        return True

    def _cancel(self, req: Request) -> RequestCancelled:
        """The requester is gone: drain what this request started that no other lease
        holds and no other request waits for (caller holds the lock)."""
        engine = self.engine
        held = set().union(*engine.other_leases(req.client).values())
        wanted = set().union(*self._wanted.values())
        orphans = [n for n in req.started if n not in held and n not in wanted]
        reason = f"{req.requester} stopped waiting before it was ready"
        with engine.decision():
            for n in orphans:
                slot = engine.slots[n]
                if slot.generation != req.mine.get(n):
                    continue  # started again since, for someone else
                data = {"reason": reason, "by": req.client or req.requester}
                # STARTING | WAKING | HEALTHY -> DRAINING; a starting one is stopped by
                # its starting thread, which sees the drain.
                if begin_drain(engine, slot, ev.DrainRequested(data=data)):
                    in_background(f"stop-{n}", partial(finish_stop, engine, slot))
        return RequestCancelled(f"{req.requester}: cancelled, the requester stopped waiting")

    def _refused(self, req: Request, exc: InsufficientVram) -> None:
        """Say in the log that ``req`` was refused for lack of VRAM (the timeline's
        out-of-memory marker; the audit's "why did my request fail?")."""
        data: dict[str, object] = {
            "for": list(req.needed),
            "by": req.client or req.requester,
            "reason": f"{req.requester} refused: {exc}",
            "need_mib": exc.need_mib,
            "free_mib": exc.free_mib,
            "foreign_mib": exc.foreign_mib,
            "blocked_by": list(exc.blocked_by),
        }
        with self.engine.cond:
            self.engine.note(ev.AdmissionRefused(data=data))

    def _timed_out(self, req: Request) -> GpusmError:
        if req.last_plan is not None and not req.last_plan.fits:
            return req.last_plan.insufficient()
        pending = [n for n in req.needed if self.engine.slots[n].state is not State.HEALTHY]
        return RequestTimeout(f"{req.requester}: {', '.join(pending)} not healthy in time")

    def _raise_failures(self, pending: Sequence[str], mine: dict[str, int]) -> None:
        for n in pending:
            slot = self.engine.slots[n]
            if slot.state is State.FAILED:
                raise ServiceStartFailed(
                    n, f"failed after its restart budget ({slot.last_error}); reset it first"
                )
            own_failure = mine.get(n) == slot.generation and slot.last_error
            if slot.state is State.STOPPED and not slot.busy and own_failure:
                raise ServiceStartFailed(n, str(slot.last_error))

    # ------------------------------------------------------------ planning
    def plan(
        self,
        names: Sequence[str],
        client: str | None,
        prio: int,
        requester: str = "",
        phase: str | None = None,
        limits: PrefetchLimits | None = None,
    ) -> policy.Plan:
        """The policy's plan for starting ``names``, one device at a time, merged.

        A service already on a device (running, parked, draining) stays there; one to
        start is placed first (:func:`gpusm.domain.placement.choose`, biggest first,
        each planned beside those placed before it). With ``phase`` in the pipeline,
        idle victims go by their next use (farthest first) and load cost; ``limits`` are
        a prefetch's (see ``PrefetchLimits``).
        """
        engine = self.engine
        planner = partial(
            self._plan_on, client=client, prio=prio, requester=requester,
            uses=self.next_uses(phase), limits=limits,
        )  # fmt: skip
        # The final plan of a device is often one already made while placing: made once.
        made: dict[tuple[int, tuple[str, ...]], policy.Plan] = {}

        def plan_on(device: int, on_device: Sequence[str]) -> policy.Plan:
            key = (device, tuple(on_device))
            if key not in made:
                made[key] = planner(device, on_device)
            return made[key]

        placed: dict[str, tuple[int, ...]] = {
            n: engine.slots[n].placed for n in names if engine.slots[n].state in ACTIVE_STATES
        }
        notes: list[str] = []
        for n in sorted((n for n in names if n not in placed), key=self._size_first):
            slot = engine.slots[n]
            allowed = engine.allowed(slot)
            count = slot.config.gpu_count
            if len(allowed) == count:
                placed[n] = tuple(allowed)  # nothing to choose
                continue
            plans = {d: plan_on(d, [*_on(placed, d), n]) for d in allowed}
            choice = placement.choose(n, count, plans, engine.config.gpu.placement)
            notes += choice.notes
            # None fits: plan where it comes closest, so the refusal names that device.
            closest = sorted(plans, key=lambda d: (-plans[d].free_after_mib, d))[:count]
            placed[n] = choice.devices or tuple(sorted(closest))
        devices = sorted({d for ds in placed.values() for d in ds})
        merged = policy.merge_plans([plan_on(d, _on(placed, d)) for d in devices])
        return replace(merged, devices=placed, placement=tuple(notes))

    def _plan_on(
        self,
        device: int,
        names: Sequence[str],
        *,
        client: str | None,
        prio: int,
        requester: str,
        uses: dict[str, int],
        limits: PrefetchLimits | None,
    ) -> policy.Plan:
        engine = self.engine
        gpu, _, _ = engine.gpu_view(device)
        return policy.plan_admission(
            names,
            engine.views(device, uses),
            engine.other_leases(client),
            gpu,
            prio,
            requester,
            pipeline=bool(uses),
            prefetch=limits,
        )

    def _size_first(self, name: str) -> tuple[int, str]:
        slot = self.engine.slots[name]
        return -slot.reservation * slot.config.gpu_count, name

    def next_uses(self, phase: str | None) -> dict[str, int]:
        """Service -> phases until the pipeline needs it after ``phase`` ({} if unknown)."""
        cfg = self.engine.config
        if phase is None or phase not in cfg.pipeline:
            return {}
        services = {name: p.services for name, p in cfg.phases.items()}
        return next_uses(cfg.pipeline, services, phase)

    def _drains_suffice(self, plan: policy.Plan) -> bool:
        """Whether the services already draining free enough for ``plan`` on their own."""
        engine = self.engine
        for device in sorted({d for n in plan.to_start for d in plan.devices.get(n, ())}):
            gpu, _, _ = engine.gpu_view(device)
            on_device = [n for n in plan.to_start if device in plan.devices.get(n, ())]
            if not policy.drains_suffice(on_device, engine.views(device), gpu):
                return False
        return True

    def _never_fits(self, names: Sequence[str]) -> bool:
        """Whether a service is bigger than every device it may use can ever offer."""
        # Only the devices' sizes matter here: no need to attribute their processes.
        engine = self.engine
        reserve = engine.config.gpu.reserve_mib
        for n in names:
            slot = engine.slots[n]
            sizes = sorted(engine.snapshot(d).total_mib for d in engine.allowed(slot))
            enough = [t for t in sizes if policy.admission_ceiling(t, reserve) >= slot.reservation]
            if len(enough) < slot.config.gpu_count:
                return True
        return False

    # ------------------------------------------------------------ side effects
    def _drain_victims(self, plan: policy.Plan, req: Request) -> None:
        """Commit each victim's drain (or park) and start it at once (caller holds the lock)."""
        by = req.client or req.requester
        for victim in plan.victims:
            slot = self.engine.slots[victim.name]
            data: dict[str, object] = {"reason": victim.reason, "by": by}
            data["for"] = list(plan.to_start)
            if req.prefetch:
                data["prefetch"] = True
            wait = victim.kind == "preempt"
            if victim.action == "park":
                # HEALTHY -> PARKING; a preempted one is drained of its holders first
                park = ev.ParkRequested(data={**data, "kind": victim.kind})
                if begin_park(self.engine, slot, park):
                    in_background(
                        f"park-{slot.name}", partial(finish_park, self.engine, slot, wait)
                    )
                    req.stops.append(StopNote(victim.name, victim.kind, victim.reason, "park"))
                    continue
            cls = ev.Preempted if victim.kind == "preempt" else ev.Evicted
            # HEALTHY | PARKED -> DRAINING
            if begin_drain(self.engine, slot, cls(data=data)):
                in_background(f"stop-{slot.name}", partial(finish_stop, self.engine, slot, wait))
            elif victim.kind == "preempt":
                # Still starting: its starting thread stops it without waiting for the
                # holders, so their leases end now.
                self.engine.revoke(victim.name, f"{victim.name} was preempted while starting")
            req.stops.append(StopNote(victim.name, victim.kind, victim.reason))

    def _start_all(
        self, names: Sequence[str], req: Request, devices: dict[str, tuple[int, ...]]
    ) -> None:
        verb = "prefetch for" if req.prefetch else "needed by"
        for n in names:
            slot = self.engine.slots[n]
            data = {"reason": f"{verb} {req.requester}", "by": req.client, "prefetch": req.prefetch}
            if slot.state is State.PARKED:
                # PARKED -> WAKING: its full reservation is admitted
                begin_wake(self.engine, slot, data)
                req.mine[n] = slot.generation
                in_background(f"wake-{n}", partial(run_wake, self.engine, slot))
                continue
            # STOPPED -> STARTING, on the devices the plan chose
            begin_start(self.engine, slot, data, devices=devices.get(n))
            req.mine[n] = slot.generation
            in_background(f"start-{n}", partial(run_start, self.engine, slot))

    def stop_and_wait(
        self,
        names: Sequence[str],
        reason: str,
        by: str | None,
        deadline: float,
        kind: str,
        park: bool = False,
    ) -> list[StopNote]:
        """Drain ``names`` and wait until none is draining; RequestTimeout past ``deadline``.

        A service that is parking is drained once parked. With ``park``, a healthy
        service that can park is parked instead (the others are stopped).
        """
        engine = self.engine
        notes: dict[str, StopNote] = {n: StopNote(n, kind, reason) for n in names}
        pending = list(names)
        with engine.cond:
            while True:
                with engine.decision():
                    for n in list(pending):
                        slot = engine.slots[n]
                        if slot.state is State.PARKING:
                            continue  # its parking thread owns it: drain it once parked
                        pending.remove(n)
                        data = {"reason": reason, "by": by}
                        if park and begin_park(engine, slot, ev.ParkRequested(data=data)):
                            in_background(f"park-{n}", partial(finish_park, engine, slot))
                            notes[n] = StopNote(n, kind, reason, "park")
                        elif begin_drain(engine, slot, ev.DrainRequested(data=data)):
                            in_background(f"stop-{n}", partial(finish_stop, engine, slot))
                moving = (State.DRAINING, State.PARKING) if park else (State.DRAINING,)
                if not pending and not any(engine.slots[n].state in moving for n in names):
                    return list(notes.values())
                left = deadline - engine.clock.monotonic()
                if left <= 0:
                    raise RequestTimeout(f"stopping {', '.join(names)} took too long")
                engine.cond.wait(min(left, _POLL_S))

    # ------------------------------------------------------------ prefetch
    def prefetch(self, upcoming: str, after: str, client: str) -> tuple[str, ...]:
        """Start ``upcoming``'s services in the background if they fit beside what runs."""
        try:
            return self._try_prefetch(upcoming, after, client)
        except GpusmError:
            return ()  # an optional head start; the phase itself already succeeded

    def _try_prefetch(self, upcoming: str, after: str, client: str) -> tuple[str, ...]:
        engine = self.engine
        needed = list(engine.config.phases[upcoming].services)
        with engine.decision():
            missing = [n for n in needed if engine.slots[n].state not in RUNNING_STATES]
            if not missing or self.waiting:
                return ()
            # Nothing changed since this prefetch last found no room: it still finds none.
            if self._prefetch_checked.get(upcoming) == engine.version:
                return ()
            limits = self._limits(upcoming, after, missing)
            plan = self.plan(missing, None, PREFETCH_PRIORITY, f"phase {upcoming}", after, limits)
            if not plan.fits:
                self._prefetch_checked[upcoming] = engine.version
                return ()
        req = Request(
            needed=needed,
            client=None,
            priority=PREFETCH_PRIORITY,
            deadline=engine.clock.monotonic() + self.default_timeout(needed),
            requester=f"phase {upcoming} (next after {after}, client {client})",
            prefetch=True,
            phase=after,
            limits=limits,
        )
        with engine.cond:
            self.prefetching += 1
        in_background(f"prefetch-{upcoming}", partial(self._prefetch_in_background, req))
        return tuple(missing)

    def _prefetch_in_background(self, req: Request) -> None:
        try:
            self.ensure(req)
        finally:
            with self.engine.cond:
                self.prefetching -= 1
                self.engine.cond.notify_all()

    def _limits(self, upcoming: str, after: str, missing: Sequence[str]) -> PrefetchLimits:
        """What a prefetch of ``upcoming`` (after ``after``) may evict: nothing needed
        sooner, nothing dearer to start again than the load it hides (they start in
        parallel: the slowest one's)."""
        pipeline = self.engine.config.pipeline
        distance = 1
        if after in pipeline and upcoming in pipeline:
            distance = (pipeline.index(upcoming) - pipeline.index(after)) % len(pipeline) or 1
        saving = max((self.engine.slots[n].load_cost_s for n in missing), default=0.0)
        return PrefetchLimits(distance, saving)

    def default_timeout(self, needed: Sequence[str]) -> float:
        """Room may have to be made first: one full stop and settle per service, then the
        slowest start."""
        cfg = self.engine.config
        return policy.request_timeout(
            (cfg.services[n].health.timeout_s for n in needed),
            (s.stop_timeout_s + cfg.gpu.settle_timeout_s for s in cfg.services.values()),
        )


def _on(placed: dict[str, tuple[int, ...]], device: int) -> list[str]:
    """The services of ``placed`` on ``device``, in order."""
    return [n for n, devices in placed.items() if device in devices]
