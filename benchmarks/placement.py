"""Figure 10: what a placement decision costs on 8 devices against one pinned plan.

Pure policy, in process: no engine, no GPU, no clock but the timer. The inputs are
plain views built once (:func:`scenario`): 8 simulated 24 GiB devices with 4 services
each (32 in all; HEALTHY, STOPPED, PARKED with residuals, one DRAINING; learned peaks
above the declared size, priorities 1-9, pipeline hints, two devices with foreign
memory, three other clients' leases), and a STOPPED 8 GiB service ``auto`` that may use
any device, to be placed. On that input some devices fit it without stopping anything,
some only after evictions, parks or a preemption, and some not at all (blocked by a
lease at a higher priority).

gpusm (:func:`place`) is exactly the sequence ``Admission.plan`` runs for a service to
place: one ``plan_admission`` per allowed device (the services already placed there
plus it, with pipeline hints), ``placement.choose`` (binpack), then one final
``plan_admission`` per chosen device, merged with ``merge_plans`` and stamped with the
devices and notes. Baseline (:func:`pinned`): the same service pinned to one device,
as ``Admission.plan`` handles it: one ``plan_admission`` on that device with its 4
services (device 5, where it fits only after stopping one and parking one), the merge
of that one plan, the stamp. The two alternate in blocks (4 x 100 each with
``--quick``, 10 x 300 otherwise, after 50 of each to warm up). Goal: placement median
≤ 1 ms. Each call's CPU time (``time.thread_time``) is kept too: on a shared box the
wall-time tail is mostly the thread waiting for a core. Not included: what the engine
spends gathering those inputs (building the views and reading the devices for each of
the 9 plans).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from benchmarks.common import Ctx, Row, median, ms, percentile
from gpusm.domain import placement, policy
from gpusm.domain.policy import GpuView, Plan, ServiceView
from gpusm.domain.states import ACTIVE_STATES, State

__all__ = [
    "DEVICES",
    "GOAL_MEDIAN_S",
    "PINNED_DEVICE",
    "Scenario",
    "pinned",
    "place",
    "run",
    "scenario",
]

GOAL_MEDIAN_S = 0.001
DEVICES = 8
TOTAL_MIB = 24576
RESERVE_MIB = 256
GIB = 1024
SERVICE = "auto"
SERVICE_MIB = 8 * GIB
SERVICE_PRIORITY = 5
REQUESTER = "client w1, phase generate"
# The baseline's device: auto fits there only after stopping one service and parking one.
PINNED_DEVICE = 5

# Per device: (state, declared GiB, learned peak GiB, priority, residual GiB or None,
# lessee or None), and the foreign GiB on that device. Letters a-d name them: g1b is
# device 1's second service.
_Spec = tuple[State, float, float, int, float | None, str | None]
H, S, P, D = State.HEALTHY, State.STOPPED, State.PARKED, State.DRAINING
_LAYOUT: tuple[tuple[tuple[_Spec, ...], float], ...] = (
    # 0: fits as is, 1 GiB left (binpack's pick among those that stop nothing).
    (((H, 8, 0, 3, None, None), (H, 6, 0, 5, None, "w2"), (S, 4, 0, 4, None, None),
      (P, 10, 0, 2, 1, None)), 0),
    # 1: 3 GiB free; fits after parking an idle service.
    (((H, 12, 0, 2, 1, None), (H, 6, 0, 4, 1, None), (S, 6, 0, 3, None, None),
      (P, 8, 0, 2, 1, None)), 0),
    # 2: the idle one is not enough: a lease at priority 1 < 5 is preempted (the one at
    # 6 is not); 1 GiB foreign.
    (((H, 10, 0, 1, None, "w2"), (H, 6, 0, 6, None, "w4"), (P, 6, 0, 3, 2, None),
      (S, 8, 0, 2, None, None)), 1),
    # 3: blocked: an 18 GiB service leased at priority 9; the rest is not enough.
    (((H, 18, 0, 9, None, "w3"), (H, 2, 0, 1, None, None), (S, 4, 0, 2, None, None),
      (P, 4, 0, 2, 1, None)), 0),
    # 4: fits as is, 6 GiB left.
    (((H, 4, 0, 2, None, None), (S, 12, 0, 3, None, None), (P, 6, 0, 4, 2, None),
      (H, 4, 0, 7, None, "w4")), 0),
    # 5: learned peak above the declared size; a preemptable lease, a parkable idle one.
    (((H, 6, 9, 3, None, "w2"), (H, 8, 0, 2, 1.5, None), (H, 4, 0, 8, None, None),
      (S, 10, 0, 2, None, None)), 0),
    # 6: 6 GiB foreign; a blocked lease; fits after stopping the idle ones.
    (((H, 8, 0, 7, None, "w3"), (P, 12, 0, 2, 3, None), (S, 4, 0, 3, None, None),
      (H, 4, 0, 1, None, None)), 6),
    # 7: a draining service still holds its 12 GiB.
    (((D, 12, 0, 3, None, None), (H, 8, 0, 4, None, None), (P, 4, 0, 2, 1, None),
      (S, 2, 0, 3, None, None)), 0),
)  # fmt: skip


@dataclass(frozen=True)
class Scenario:
    """The inputs the engine would gather: per-device views and readings, the other
    clients' leases, the request."""

    views: dict[int, dict[str, ServiceView]]
    gpus: dict[int, GpuView]
    leases: dict[str, frozenset[str]]
    allowed: dict[str, tuple[int, ...]]
    every: dict[str, ServiceView]
    service: str = SERVICE
    priority: int = SERVICE_PRIORITY
    requester: str = REQUESTER
    strategy: placement.Strategy = "binpack"


def _mib(gib: float | None) -> int | None:
    return None if gib is None else int(gib * GIB)


def scenario() -> Scenario:
    """8 devices x 4 services, the leases, and ``auto`` (STOPPED, any device)."""
    views: dict[int, dict[str, ServiceView]] = {}
    gpus: dict[int, GpuView] = {}
    leases: dict[str, set[str]] = {}
    allowed: dict[str, tuple[int, ...]] = {SERVICE: tuple(range(DEVICES))}
    auto = ServiceView(
        name=SERVICE,
        state=State.STOPPED,
        vram_mib=SERVICE_MIB,
        learned_peak_mib=0,
        priority=SERVICE_PRIORITY,
        last_used=0.0,
        next_use=0,
        load_cost_s=4.0,
    )
    for device, (specs, foreign_gib) in enumerate(_LAYOUT):
        on: dict[str, ServiceView] = {}
        for i, (state, vram, peak, prio, residual, lessee) in enumerate(specs):
            name = f"g{device}{'abcd'[i]}"
            k = device * 4 + i
            on[name] = ServiceView(
                name=name,
                state=state,
                vram_mib=int(vram * GIB),
                learned_peak_mib=int(peak * GIB),
                priority=prio,
                last_used=1000.0 + (k * 37) % 101,
                idle_ttl_s=600.0,
                next_use=None if k % 5 == 0 else 1 + k % 4,
                load_cost_s=1.0 + vram / 4,
                residual_mib=_mib(residual),
                state_since=900.0,
            )
            allowed[name] = (device,)
            if lessee is not None:
                leases.setdefault(lessee, set()).add(name)
        on[SERVICE] = auto  # STOPPED and allowed here: the engine's views include it
        views[device] = on
        foreign = int(foreign_gib * GIB)
        held = sum(v.reservation for v in on.values() if v.state in ACTIVE_STATES)
        gpus[device] = GpuView(
            total_mib=TOTAL_MIB,
            driver_free_mib=max(0, TOTAL_MIB - held - foreign),
            foreign_mib=foreign,
            reserve_mib=RESERVE_MIB,
        )
    return Scenario(
        views=views,
        gpus=gpus,
        leases={c: frozenset(names) for c, names in leases.items()},
        allowed=allowed,
        every={n: v for on in views.values() for n, v in on.items()},
    )


def _plan_on(sc: Scenario, device: int, names: Sequence[str]) -> Plan:
    return policy.plan_admission(
        names,
        sc.views[device],
        sc.leases,
        sc.gpus[device],
        sc.priority,
        sc.requester,
        pipeline=True,
    )


def _on(placed: Mapping[str, tuple[int, ...]], device: int) -> list[str]:
    return [n for n, devices in placed.items() if device in devices]


def place(sc: Scenario, names: Sequence[str] | None = None) -> Plan:
    """``Admission.plan`` for ``names`` (default: the service to place), on pure views."""
    names = [sc.service] if names is None else list(names)
    every = sc.every
    placed: dict[str, tuple[int, ...]] = {
        n: sc.allowed[n] for n in names if every[n].state in ACTIVE_STATES
    }
    notes: list[str] = []
    size_first = sorted(
        (n for n in names if n not in placed), key=lambda n: (-every[n].reservation, n)
    )
    for n in size_first:
        allowed = sc.allowed[n]
        if len(allowed) == 1:
            placed[n] = allowed  # nothing to choose
            continue
        plans = {d: _plan_on(sc, d, [*_on(placed, d), n]) for d in allowed}
        choice = placement.choose(n, 1, plans, sc.strategy)
        notes += choice.notes
        closest = sorted(plans, key=lambda d: (-plans[d].free_after_mib, d))[:1]
        placed[n] = choice.devices or tuple(sorted(closest))
    devices = sorted({d for ds in placed.values() for d in ds})
    merged = policy.merge_plans([_plan_on(sc, d, _on(placed, d)) for d in devices])
    return replace(merged, devices=placed, placement=tuple(notes))


def pinned(sc: Scenario, device: int = PINNED_DEVICE) -> Plan:
    """The service pinned to ``device``: ``Admission.plan``'s path with nothing to choose."""
    placed: dict[str, tuple[int, ...]] = {sc.service: (device,)}
    merged = policy.merge_plans([_plan_on(sc, device, [sc.service])])
    return replace(merged, devices=placed, placement=())


def _blocks(ctx: Ctx) -> tuple[int, int]:
    return (4, 100) if ctx.quick else (10, 300)


def _time(call: Callable[[], object], count: int, into: list[float], cpu: list[float]) -> None:
    """Wall time of each call into ``into``, this thread's CPU time into ``cpu`` (on a
    shared box a wall-time tail is mostly the thread waiting for a core)."""
    for _ in range(count):
        cpu_began = time.thread_time()
        began = time.perf_counter()
        call()
        into.append(time.perf_counter() - began)
        cpu.append(time.thread_time() - cpu_began)


def _stats(samples: list[float]) -> dict[str, float]:
    return {
        "median_s": median(samples),
        "p95_s": percentile(samples, 95),
        "p99_s": percentile(samples, 99),
        "max_s": max(samples),
    }


def run(ctx: Ctx) -> list[Row]:
    """Time placement decisions and pinned plans in alternating blocks."""
    sc = scenario()
    decision = place(sc)
    single = pinned(sc)
    if not decision.fits or not single.fits or not single.victims:
        raise RuntimeError(f"unexpected scenario: {decision.reason} / {single.reason}")
    blocks, per_block = _blocks(ctx)
    placements: list[float] = []
    singles: list[float] = []
    cpu_placements: list[float] = []
    cpu_singles: list[float] = []
    _time(lambda: place(sc), 50, [], [])  # warm-up
    _time(lambda: pinned(sc), 50, [], [])
    for _ in range(blocks):
        _time(lambda: place(sc), per_block, placements, cpu_placements)
        _time(lambda: pinned(sc), per_block, singles, cpu_singles)
    med, p95 = median(placements), percentile(placements, 95)
    base, base95 = median(singles), percentile(singles, 95)
    calls = len(sc.allowed[sc.service]) + 1
    chosen = decision.devices[sc.service]
    ctx.log(
        f"figure 10: {sc.service} on device {chosen}; "
        + "; ".join(n.split(": ", 1)[1] for n in decision.placement)
    )
    details: dict[str, Any] = {
        "devices": DEVICES,
        "services": sum(len(v) - 1 for v in sc.views.values()),
        "plan_admission_calls": calls,
        "samples": len(placements),
        "placement": _stats(placements),
        "placement_cpu": _stats(cpu_placements),
        "pinned": {**_stats(singles), "device": PINNED_DEVICE},
        "pinned_cpu": _stats(cpu_singles),
        "chosen": list(chosen),
        "notes": list(decision.placement),
        "final_reason": decision.reason,
        "pinned_reason": single.reason,
    }
    return [
        Row(
            figure=(
                f"10. Placement decision, {DEVICES} devices x {details['services']} services "
                f"({calls} plan_admission + choose + merge), pure policy, in process"
            ),
            gpusm=(
                f"median {ms(med, 3)}, p95 {ms(p95, 3)} "
                f"(CPU time p95 {ms(percentile(cpu_placements, 95), 3)})"
            ),
            baseline=(
                f"single-device plan (pinned, 4 services, 1 stop + 1 park): "
                f"median {ms(base, 3)}, p95 {ms(base95, 3)}"
            ),
            ratio=med / base,
            goal=f"median ≤ {ms(GOAL_MEDIAN_S, 0)}",
            met=med <= GOAL_MEDIAN_S,
            details=details,
        )
    ]
