"""Who may be stopped, and does a request fit: the pure admission and eviction policy.

Everything here is arithmetic over plain values that the coordinator gathers (service
views, other clients' leases, a GPU reading); nothing reads a clock, a GPU or a database.

Admission arithmetic::

    reservation(service)  = max(declared vram_mib, learned peak); a PARKED service's
                            is its residual (what its process keeps, e.g. a CUDA context)
    free for admission    = max(0, min(driver free, total - sum(reservations of ACTIVE
                                       services) - foreign) - reserve_mib)
    need                  = sum(reservations of needed services not STARTING/HEALTHY/
                            WAKING); a needed PARKED service needs its full reservation
                            less the residual it already holds

A DRAINING service still holds its reservation until it is stopped: it is counted in the
sum, and if the request needs it again it is counted in ``need`` too (conservative; the
request fits once the drain has finished and the coordinator plans again).

Victims are chosen in this order and only as a prefix of it: idle services (running, not
needed by the request nor leased by another client), then services leased by another
client at a priority strictly below the request's. Nothing is stopped unless stopping the
allowed candidates makes the request fit. Within each group:

- without pipeline information (the default): lowest priority first, then least
  recently used;
- with it (``plan_admission(..., pipeline=True)``), idle services by Belady's rule: the
  farthest ``next_use`` first (never needed, None, before any number), then the lower
  ``load_cost_s``, then lowest priority, then least recently used. Services leased at a
  lower priority keep the order above (lowest priority, then least recently used).

The name breaks any remaining tie, so the same inputs always give the same plan.

Parking changes how a victim goes, never which victims go: the prefix is chosen as if
every victim were stopped. Then, from the end of the prefix back (the victims needed
soonest first), each HEALTHY victim that can park (``residual_mib`` set) is parked
instead if the request still fits with its residual left behind: its process stays, for
a wake in seconds instead of a cold start. A PARKED service is an idle candidate too;
stopping it frees its residual.

A prefetch (``plan_admission(..., prefetch=PrefetchLimits(distance, saving_s))``) is
planned with pipeline information, stops only idle services, and never one needed at or
before the phase it prefetches (``next_use <= distance``) nor one that costs more to
start again than the prefetch saves (``load_cost_s > saving_s``); if the rest does not
make room it stops nothing and its reason names the protected services.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

from gpusm.domain.pipeline import (
    PrefetchLimits,
    belady_key,
    describe_next_use,
    prefetch_protection,
)
from gpusm.domain.states import ACTIVE_STATES, RUNNING_STATES, State
from gpusm.errors import InsufficientVram, UnknownName

# States whose service may be chosen as a victim (stopped, or parked when HEALTHY).
_CANDIDATE_STATES = RUNNING_STATES | {State.PARKED}

__all__ = [
    "GpuView",
    "Plan",
    "PrefetchLimits",
    "ServiceView",
    "Victim",
    "admission_ceiling",
    "drains_suffice",
    "free_after_stopping",
    "free_for_admission",
    "idle_expired",
    "is_my_turn",
    "merge_plans",
    "next_gpu_phase",
    "plan_admission",
    "release_plan",
    "request_priority",
    "request_timeout",
    "restart_delay",
    "start_budget_left",
]


def _require_non_negative(owner: str, **values: float) -> None:
    for key, value in values.items():
        if value < 0:
            raise ValueError(f"{owner}.{key} must be >= 0, got {value}")


@dataclass(frozen=True)
class ServiceView:
    """What the policy knows about one service; ``last_used`` is a monotonic timestamp.

    Mappings of views passed to this module are keyed by ``name``. The pipeline hints are
    read only by ``plan_admission(..., pipeline=True)`` (or ``prefetch=``):
    ``next_use`` is how many phases after the requester's phase the pipeline next needs
    this service (1 = the very next phase; None = never, or unknown), and
    ``load_cost_s`` what starting it again costs (typically its median time to healthy).
    """

    name: str
    state: State
    vram_mib: int
    learned_peak_mib: int
    priority: int
    last_used: float
    idle_ttl_s: float | None = None
    next_use: int | None = None
    load_cost_s: float = 0.0
    # What the service keeps while parked; None: it cannot park.
    residual_mib: int | None = None
    # Monotonic time of its last state change (a parked service's idle TTL counts from it).
    state_since: float = 0.0

    def __post_init__(self) -> None:
        _require_non_negative(
            f"service {self.name!r}", vram_mib=self.vram_mib, learned_peak_mib=self.learned_peak_mib
        )
        if self.residual_mib is not None:
            _require_non_negative(f"service {self.name!r}", residual_mib=self.residual_mib)
        if self.next_use is not None and self.next_use < 0:
            raise ValueError(f"service {self.name!r}.next_use must be >= 0, got {self.next_use}")
        if not self.load_cost_s >= 0:  # also refuses NaN
            raise ValueError(
                f"service {self.name!r}.load_cost_s must be >= 0, got {self.load_cost_s}"
            )

    @property
    def full_mib(self) -> int:
        """What it holds while it runs: max(declared, learned peak)."""
        return max(self.vram_mib, self.learned_peak_mib)

    @property
    def parked_mib(self) -> int:
        """What it holds once parked: its residual, never more than its full reservation."""
        return min(self.residual_mib or 0, self.full_mib)

    @property
    def reservation(self) -> int:
        """The MiB this service is assumed to hold while active: its residual when
        PARKED, else max(declared, learned peak)."""
        return self.parked_mib if self.state is State.PARKED else self.full_mib

    @property
    def can_park(self) -> bool:
        """Whether it is HEALTHY and has a way to park."""
        return self.residual_mib is not None and self.state is State.HEALTHY

    @property
    def need_mib(self) -> int:
        """What starting (or waking) it needs beyond what it holds now."""
        return self.full_mib - (self.reservation if self.state is State.PARKED else 0)


@dataclass(frozen=True)
class GpuView:
    """One GPU reading: ``foreign_mib`` is memory held by processes gpusm does not own."""

    total_mib: int
    driver_free_mib: int
    foreign_mib: int
    reserve_mib: int

    def __post_init__(self) -> None:
        _require_non_negative(
            "gpu",
            total_mib=self.total_mib,
            driver_free_mib=self.driver_free_mib,
            foreign_mib=self.foreign_mib,
            reserve_mib=self.reserve_mib,
        )


@dataclass(frozen=True)
class Victim:
    """A service to make room with: ``evict`` (idle) or ``preempt`` (drain another
    client's use first); ``action`` says whether it is stopped or parked."""

    name: str
    kind: Literal["evict", "preempt"]
    frees_mib: int
    reason: str
    action: Literal["stop", "park"] = "stop"


@dataclass(frozen=True)
class Plan:
    """The policy's answer to one request.

    When ``fits`` is true, stopping ``victims`` in order and then starting ``to_start``
    keeps ``need_mib <= free_after_mib``. When it is false, ``victims`` is empty (nothing
    is stopped for nothing) and ``blocked_by`` names the running services the policy may
    not stop because a client at an equal or higher priority uses them (for a prefetch:
    any client). ``protected`` names the idle services that a prefetch's limits kept
    from being victims when it had to make room. ``devices`` says where each service of
    the request runs (or would run), and ``placement`` why each device was or was not
    chosen (filled in by the caller, which plans per device).
    """

    fits: bool
    need_mib: int
    free_before_mib: int
    free_after_mib: int
    to_start: tuple[str, ...]
    already_running: tuple[str, ...]
    victims: tuple[Victim, ...]
    blocked_by: tuple[str, ...]
    reason: str
    foreign_mib: int = 0
    protected: tuple[str, ...] = ()
    devices: dict[str, tuple[int, ...]] = field(default_factory=dict)
    placement: tuple[str, ...] = ()

    def insufficient(self) -> InsufficientVram:
        """The error to raise when a request that does not fit runs out of time."""
        return InsufficientVram(
            self.need_mib, self.free_before_mib, self.foreign_mib, list(self.blocked_by)
        )


def free_after_stopping(
    services: Mapping[str, ServiceView],
    gpu: GpuView,
    stopped: Iterable[str] = (),
    parked: Iterable[str] = (),
) -> int:
    """Free MiB for admission, assuming the ACTIVE services named in ``stopped`` are gone
    and those named in ``parked`` hold only their residual.

    Each stopped service gives back its reservation on both sides of the ``min``: it
    leaves the sum of reservations, and driver free grows by it (no explicit cap at the
    total is needed: the accounting side never exceeds it). The driver side may thus be
    optimistic when a service held less than its reservation; the coordinator waits for
    the VRAM to settle and plans again before it starts anything, so an optimistic
    estimate costs a re-plan, never an OOM. The result is never negative: an
    over-committed GPU has 0 MiB free.
    """
    gone = set(stopped)
    asleep = set(parked) - gone
    reserved = 0
    returned = 0
    for view in services.values():
        if view.state not in ACTIVE_STATES:
            continue
        if view.name in gone:
            returned += view.reservation
        elif view.name in asleep:
            returned += view.reservation - view.parked_mib
            reserved += view.parked_mib
        else:
            reserved += view.reservation
    driver_free = gpu.driver_free_mib + returned
    accounted = gpu.total_mib - reserved - gpu.foreign_mib
    return max(0, min(driver_free, accounted) - gpu.reserve_mib)


def free_for_admission(services: Mapping[str, ServiceView], gpu: GpuView) -> int:
    """Free MiB for admission now: min(driver free, total - reservations - foreign) - reserve."""
    return free_after_stopping(services, gpu)


def _known(needed: Sequence[str], services: Mapping[str, ServiceView]) -> list[str]:
    """``needed`` without duplicates, in order; an unknown name raises UnknownName."""
    for name in needed:
        if name not in services:
            raise UnknownName("service", name, list(services))
    return list(dict.fromkeys(needed))


def request_priority(
    needed: Sequence[str], services: Mapping[str, ServiceView], explicit: int | None
) -> int:
    """``explicit`` when given, else the highest priority among the needed services.

    A request that needs no service gets priority 0; it has nothing to start, so its
    priority never makes anything stop.
    """
    names = _known(needed, services)
    if explicit is not None:
        return explicit
    return max((services[n].priority for n in names), default=0)


def _leased_by(leases: Mapping[str, frozenset[str]]) -> dict[str, list[str]]:
    """Service name -> the sorted clients whose current phase holds it."""
    holders: dict[str, list[str]] = {}
    for client in sorted(leases):
        for name in leases[client]:
            holders.setdefault(name, []).append(client)
    return holders


def _eviction_order(views: Iterable[ServiceView]) -> list[ServiceView]:
    # Lowest priority first, then least recently used; the name breaks ties so that the
    # same inputs always give the same plan.
    return sorted(views, key=lambda v: (v.priority, v.last_used, v.name))


def _pipeline_order(views: Iterable[ServiceView]) -> list[ServiceView]:
    # Belady: never needed, then farthest next use; then cheaper to reload; then as above.
    return sorted(
        views,
        key=lambda v: (*belady_key(v.next_use, v.load_cost_s), v.priority, v.last_used, v.name),
    )


def release_plan(
    needed: Sequence[str],
    services: Mapping[str, ServiceView],
    leases: Mapping[str, frozenset[str]],
) -> list[str]:
    """Running services that a ``release: true`` phase stops (or parks), in eviction order.

    That is every STARTING/HEALTHY/WAKING service that this phase does not need and no
    other client's current phase (``leases``) holds. Parked services stay parked.
    """
    keep = set(_known(needed, services)) | set(_leased_by(leases))
    idle = (v for v in services.values() if v.state in RUNNING_STATES and v.name not in keep)
    return [v.name for v in _eviction_order(idle)]


def idle_expired(
    services: Mapping[str, ServiceView],
    leases: Mapping[str, frozenset[str]],
    now_mono: float,
) -> list[str]:
    """HEALTHY and PARKED services whose idle TTL has run out, soonest-expired first.

    A service qualifies when it has ``idle_ttl_s``, no client's phase holds it, and
    ``idle_since + idle_ttl_s <= now_mono``, where ``idle_since`` is ``last_used``, or for
    a PARKED service the later of that and when it parked (a HEALTHY service that can
    park is parked first, then stopped one TTL later). STARTING services are left alone:
    they have not had a chance to be used yet.
    """
    leased = _leased_by(leases)

    def idle_since(v: ServiceView) -> float:
        return max(v.last_used, v.state_since) if v.state is State.PARKED else v.last_used

    expired = [
        v
        for v in services.values()
        if v.state in (State.HEALTHY, State.PARKED)
        and v.idle_ttl_s is not None
        and v.name not in leased
        and idle_since(v) + v.idle_ttl_s <= now_mono
    ]
    expired.sort(key=lambda v: (idle_since(v) + (v.idle_ttl_s or 0.0), v.name))
    return [v.name for v in expired]


def plan_admission(
    needed: Sequence[str],
    services: Mapping[str, ServiceView],
    leases: Mapping[str, frozenset[str]],
    gpu: GpuView,
    request_priority: int,
    requester: str = "",
    *,
    pipeline: bool = False,
    prefetch: PrefetchLimits | None = None,
) -> Plan:
    """Decide what to stop so that the needed services can start, or why they cannot.

    ``leases`` maps each OTHER client to the services its current phase holds; the
    requesting client's previous phase is released by the new one, so the caller leaves
    it out. ``requester`` (e.g. ``"client w1, phase video"``) is quoted in victims'
    reasons. A needed service is never a victim; an unknown name raises UnknownName.
    A needed service that is STOPPED, DRAINING or FAILED is in ``to_start``; refusing a
    FAILED one (it needs a reset first) is the caller's decision, not the policy's.

    ``pipeline=True`` says that the views' ``next_use`` and ``load_cost_s`` are filled
    in: idle victims are then chosen by Belady's rule (see the module docstring).
    ``prefetch`` plans a prefetch under those limits; it implies ``pipeline=True``, and
    a prefetch never preempts, whatever ``request_priority`` says.
    """
    names = _known(needed, services)
    running = tuple(n for n in names if services[n].state in RUNNING_STATES)
    to_start = tuple(n for n in names if n not in running)
    need = sum(services[n].need_mib for n in to_start)
    free_before = free_for_admission(services, gpu)
    protected: dict[str, str] = {}  # idle service -> why a prefetch may not evict it

    def plan(
        fits: bool, free_after: int, victims: Sequence[Victim], blocked: Sequence[str], why: str
    ) -> Plan:
        return Plan(
            fits=fits,
            need_mib=need,
            free_before_mib=free_before,
            free_after_mib=free_after,
            to_start=to_start,
            already_running=running,
            victims=tuple(victims),
            blocked_by=tuple(blocked),
            reason=why,
            foreign_mib=gpu.foreign_mib,
            protected=tuple(protected),
        )

    if need <= free_before:
        return plan(True, free_before, (), (), f"fits: need {need} MiB, {free_before} MiB free")

    hinted = pipeline or prefetch is not None
    holders = _leased_by(leases)
    others = [v for v in services.values() if v.state in _CANDIDATE_STATES and v.name not in names]
    idle = (_pipeline_order if hinted else _eviction_order)(
        v for v in others if v.name not in holders
    )
    leased = [v for v in others if v.name in holders]
    may_preempt = prefetch is None
    preemptable = _eviction_order(
        v for v in leased if may_preempt and v.priority < request_priority
    )
    blocked = sorted(v.name for v in leased if not may_preempt or v.priority >= request_priority)
    if prefetch is not None:
        for view in idle:
            why_kept = prefetch_protection(view.next_use, view.load_cost_s, prefetch)
            if why_kept is not None:
                protected[view.name] = why_kept
        idle = [v for v in idle if v.name not in protected]
    candidates = idle + preemptable

    best = free_after_stopping(services, gpu, (v.name for v in candidates))
    if need > best:
        in_use = (
            f" at priority >= {request_priority}" if may_preempt else "; a prefetch never preempts"
        )
        why = _cannot_fit(need, free_before, best, services, gpu, blocked, in_use)
        if protected:
            kept = ", ".join(f"{name} ({why_kept})" for name, why_kept in protected.items())
            why += f"; a prefetch may not evict {kept}"
        return plan(False, free_before, (), blocked, why)

    beneficiary = ", ".join(to_start) + (f" ({requester})" if requester else "")
    chosen = _walk(candidates, need, services, gpu)
    victims = [
        _victim(view, holders, request_priority, beneficiary, hinted, action)
        for view, action in chosen
    ]
    free_after = _free_after(services, gpu, chosen)
    parts = [
        f"{verb} {', '.join(v.name for v in victims if v.action == action)}"
        for action, verb in (("park", "parking"), ("stop", "stopping"))
        if any(v.action == action for v in victims)
    ]
    why = (
        f"fits after {' and '.join(parts)}: need {need} MiB, {free_before} MiB free before, "
        f"{free_after} MiB after"
    )
    return plan(True, free_after, victims, (), why)


_Choice = tuple[ServiceView, Literal["stop", "park"]]


def _free_after(
    services: Mapping[str, ServiceView], gpu: GpuView, chosen: Sequence[_Choice]
) -> int:
    stopped = (v.name for v, action in chosen if action == "stop")
    parked = (v.name for v, action in chosen if action == "park")
    return free_after_stopping(services, gpu, stopped, parked)


def _walk(
    candidates: Sequence[ServiceView],
    need: int,
    services: Mapping[str, ServiceView],
    gpu: GpuView,
) -> list[_Choice]:
    """The shortest prefix of ``candidates`` that makes ``need`` fit if stopped (stopping
    every candidate fits: checked by the caller); then, from the end of the prefix back
    (the victims needed soonest first), each one that can park is parked instead if the
    request still fits. Parking never adds a victim: it only spares a process."""
    chosen: list[_Choice] = []
    for view in candidates:
        if need <= _free_after(services, gpu, chosen):
            break
        chosen.append((view, "stop"))
    for i in reversed(range(len(chosen))):
        view = chosen[i][0]
        if not view.can_park:
            continue
        trial = [*chosen[:i], (view, "park"), *chosen[i + 1 :]]
        if need <= _free_after(services, gpu, trial):
            chosen = trial
    return chosen


def _victim(
    view: ServiceView,
    holders: Mapping[str, list[str]],
    priority: int,
    beneficiary: str,
    hinted: bool,
    action: Literal["stop", "park"] = "stop",
) -> Victim:
    frees = view.reservation - (view.parked_mib if action == "park" else 0)
    parks = f"parked (keeps {view.parked_mib} MiB), " if action == "park" else ""
    if view.name in holders:
        clients = ", ".join(holders[view.name])
        return Victim(
            view.name,
            "preempt",
            frees,
            f"in use by {clients} at priority {view.priority} < {priority}, "
            f"{parks}preempted to make room for {beneficiary}",
            action,
        )
    hints = (
        f"{describe_next_use(view.next_use)}, load ~{view.load_cost_s:.1f} s, " if hinted else ""
    )
    state = "parked, " if view.state is State.PARKED else ""
    return Victim(
        view.name,
        "evict",
        frees,
        f"idle, {state}{hints}priority {view.priority}, {parks}to make room for {beneficiary}",
        action,
    )


def _cannot_fit(
    need: int,
    free_before: int,
    best: int,
    services: Mapping[str, ServiceView],
    gpu: GpuView,
    blocked: Sequence[str],
    in_use: str,
) -> str:
    parts = [
        f"cannot fit: need {need} MiB, {free_before} MiB free for admission, "
        f"{best} MiB even after stopping every service the policy allows"
    ]
    ceiling = gpu.total_mib - gpu.foreign_mib - gpu.reserve_mib
    if need > ceiling:
        parts.append(
            f"more than this GPU can ever offer ({gpu.total_mib} MiB total - "
            f"{gpu.foreign_mib} MiB foreign - {gpu.reserve_mib} MiB reserve = {ceiling} MiB)"
        )
    if gpu.foreign_mib:
        parts.append(f"{gpu.foreign_mib} MiB held by processes gpusm does not own")
    draining = sorted(v.name for v in services.values() if v.state is State.DRAINING)
    if draining:
        held = sum(services[n].reservation for n in draining)
        parts.append(f"{held} MiB still held by draining {', '.join(draining)}")
    if blocked:
        parts.append(f"blocked by {', '.join(blocked)} (in use{in_use})")
    return "; ".join(parts)


def restart_delay(attempt: int, initial_s: float, max_s: float) -> float:
    """Seconds to wait before restart number ``attempt`` (1-based): initial * 2**(n-1), capped.

    With ``initial_s=1`` the delays are 1, 2, 4, 8… up to ``max_s``.
    """
    if attempt < 1:
        raise ValueError(f"restart attempt must be >= 1, got {attempt}")
    _require_non_negative("restart", initial_s=initial_s, max_s=max_s)
    # The exponent is capped so that 2.0**n cannot overflow; the product may reach inf,
    # which the cap turns back into max_s.
    return min(initial_s * 2.0 ** min(attempt - 1, 1000), max_s)


def start_budget_left(
    start_times: list[float], now: float, max_starts: int, window_s: float
) -> bool:
    """Whether one more start is allowed: fewer than ``max_starts`` starts in the window.

    A start counts while ``now - started < window_s``; starts stamped after ``now`` count
    too (conservative against clock skew between callers).
    """
    recent = sum(1 for t in start_times if now - t < window_s)
    return recent < max_starts


# ---------------------------------------------------------------- requests and plans
def merge_plans(plans: Sequence[Plan]) -> Plan:
    """One plan from per-device plans: it fits only if every device fits.

    A failing merge is the first failing device's plan (it names what blocks it).
    """
    if not plans:
        raise ValueError("merge_plans needs at least one plan")
    if len(plans) == 1:
        return plans[0]
    failing = [p for p in plans if not p.fits]
    if failing:
        return failing[0]
    first = plans[0]
    # A service spanning several devices is in several plans: name it once.
    return replace(
        first,
        need_mib=sum(p.need_mib for p in plans),
        to_start=tuple(dict.fromkeys(n for p in plans for n in p.to_start)),
        already_running=tuple(dict.fromkeys(n for p in plans for n in p.already_running)),
        victims=_first_of_each(v for p in plans for v in p.victims),
        reason="; ".join(p.reason for p in plans),
    )


def _first_of_each(victims: Iterable[Victim]) -> tuple[Victim, ...]:
    seen: dict[str, Victim] = {}
    for victim in victims:
        seen.setdefault(victim.name, victim)
    return tuple(seen.values())


def drains_suffice(
    to_start: Sequence[str], services: Mapping[str, ServiceView], gpu: GpuView
) -> bool:
    """Whether the services already draining (or parking) on this GPU free enough for
    ``to_start``.

    Then the request stops nothing more and waits for those drains.
    """
    draining = [n for n, v in services.items() if v.state is State.DRAINING]
    parking = [n for n, v in services.items() if v.state is State.PARKING]
    if not draining and not parking:
        return False
    need = sum(services[n].need_mib for n in to_start if n in services)
    return need <= free_after_stopping(services, gpu, draining, parking)


def admission_ceiling(total_mib: int, reserve_mib: int) -> int:
    """The most any request could ever get on a GPU: its size less the reserve.

    Foreign usage is left out on purpose: it comes and goes (a crashed service's
    memory counts as foreign until the driver frees it), so it is waited out.
    """
    return total_mib - reserve_mib


def is_my_turn(ticket: int, priority: int, waiting: Mapping[int, int]) -> bool:
    """Whether request ``ticket`` goes next among ``waiting`` (ticket -> priority).

    Requests waiting for room are served highest priority first, then oldest ticket.
    """
    return all(
        p < priority or (p == priority and t >= ticket) for t, p in waiting.items() if t != ticket
    )


def next_gpu_phase(
    pipeline: Sequence[str], phase_services: Mapping[str, Sequence[str]], phase: str
) -> str | None:
    """The next phase after ``phase`` in the pipeline (wrapping around) that needs a service.

    None when ``phase`` is not in the pipeline or no other phase needs a GPU service.
    """
    if phase not in pipeline:
        return None
    start = pipeline.index(phase)
    for step in range(1, len(pipeline) + 1):
        candidate = pipeline[(start + step) % len(pipeline)]
        if phase_services.get(candidate):
            return candidate if candidate != phase else None
    return None


def request_timeout(start_timeouts_s: Iterable[float], stop_costs_s: Iterable[float]) -> float:
    """How long a request may wait by default: the slowest start, plus one full stop
    (stop timeout and settle time) per service that may have to make room, plus 10 s."""
    return max(start_timeouts_s, default=0.0) + sum(stop_costs_s) + 10.0
