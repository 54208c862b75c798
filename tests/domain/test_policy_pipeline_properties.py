"""The pipeline-aware victim order against a small simulator of a cyclic pipeline.

The model: a cyclic pipeline of phases over a few services, a GPU of fixed capacity,
items run through every phase in turn. Entering a phase asks the real
``plan_admission`` to make room for the phase's services that are not loaded; the
victims are unloaded, the services loaded (one cold start each). Each run is done
twice, once with pipeline information (``next_use`` from the cycle, ``load_cost_s``)
and once without (lowest priority, then least recently used), and both are compared
with the true optimum, found by dynamic programming over every set of loaded services.

What is asserted is what is provably true. With services of equal size, evicting the
service whose next use is farthest (Belady's rule) is optimal: the classic exchange
argument (swap the evictions of ``e``, needed last, and ``f``, needed earlier, and mirror
the other schedule until ``f`` is requested) does not care whether a phase needs one
service or several at once, as long as ``e`` and ``f`` are both outside the phase. The
cycle's ``next_use`` orders the services exactly as their real next request does:
those that the remaining items never request again tie-break among themselves, which
costs nothing. So, for equal sizes, the pipeline-aware run loads exactly the optimum,
and never more than the old order.

With unequal sizes no such rule exists (it is the knapsack-like "generalized caching"
problem): farthest-first may stop one big service where stopping a small one would have
done, or stop a small far one that frees too little on its own and then the big near
one as well. Hypothesis finds such cases within a few thousand examples: in runs of
3000 random unequal models (one or several services per phase), 0.2 to 1 in 100 made
more cold starts with the pipeline order than with the old one, 1 to 5 in 100 fewer.
``test_unequal_sizes_can_make_the_pipeline_order_worse`` pins one; for unequal sizes
only "never better than the optimum" is asserted.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from gpusm.domain.policy import (
    GpuView,
    PrefetchLimits,
    ServiceView,
    free_after_stopping,
    plan_admission,
    request_priority,
)
from gpusm.domain.states import State

NAMES = [f"s{i}" for i in range(5)]
UNIT = 1000  # MiB of one service in the equal-size models


@dataclass(frozen=True)
class Model:
    services: tuple[str, ...]
    phases: tuple[tuple[str, ...], ...]  # the cycle; each phase's services
    sizes: Mapping[str, int]
    capacity_mib: int
    priorities: Mapping[str, int]
    load_costs: Mapping[str, float]
    last_used: Mapping[str, float]  # before the first item; all negative
    warm: frozenset[str]  # loaded before the first item
    items: int

    def requests(self) -> list[tuple[str, ...]]:
        return [phase for _ in range(self.items) for phase in self.phases]


def cycle_next_use(phases: Sequence[Sequence[str]], at: int, name: str) -> int | None:
    """Phases from phase ``at`` until the cycle needs ``name`` again; None if never."""
    for step in range(1, len(phases) + 1):
        if name in phases[(at + step) % len(phases)]:
            return step
    return None


def simulate(model: Model, pipeline: bool) -> int:
    """Cold starts when every phase entry asks ``plan_admission`` for room."""
    loaded = set(model.warm)
    last_used = dict(model.last_used)
    loads = 0
    for t, needed in enumerate(model.requests()):
        at = t % len(model.phases)
        views = {
            name: ServiceView(
                name=name,
                state=State.HEALTHY if name in loaded else State.STOPPED,
                vram_mib=model.sizes[name],
                learned_peak_mib=0,
                priority=model.priorities[name],
                last_used=last_used[name],
                next_use=cycle_next_use(model.phases, at, name),
                load_cost_s=model.load_costs[name],
            )
            for name in model.services
        }
        held = sum(model.sizes[n] for n in loaded)
        gpu = GpuView(model.capacity_mib, model.capacity_mib - held, 0, 0)
        priority = request_priority(needed, views, None)
        plan = plan_admission(
            needed, views, {}, gpu, priority, f"item phase {t}", pipeline=pipeline
        )
        assert plan.fits, plan.reason
        assert all(v.kind == "evict" for v in plan.victims)
        loaded -= {v.name for v in plan.victims}
        loaded |= set(plan.to_start)
        assert sum(model.sizes[n] for n in loaded) <= model.capacity_mib
        loads += len(plan.to_start)
        for name in needed:
            last_used[name] = float(t)
    return loads


def optimum(model: Model) -> int:
    """The fewest cold starts any eviction order can give: dynamic programming over the
    set of loaded services after each phase (loading only what a phase needs loses
    nothing: a load can always be put off until its service is needed)."""
    best: dict[frozenset[str], int] = {model.warm: 0}
    for needed in model.requests():
        need = frozenset(needed)
        after: dict[frozenset[str], int] = {}
        for loaded, cost in best.items():
            spare = sorted(loaded - need)
            step = cost + len(need - loaded)
            for k in range(len(spare) + 1):
                for kept in combinations(spare, k):
                    state = need | frozenset(kept)
                    if sum(model.sizes[n] for n in state) > model.capacity_mib:
                        continue
                    if step < after.get(state, step + 1):
                        after[state] = step
        best = after
    return min(best.values())


@st.composite
def models(draw: st.DrawFn, *, multi: bool = False, equal: bool = True) -> Model:
    services = tuple(NAMES[: draw(st.integers(2, len(NAMES)))])
    sizes = {n: UNIT if equal else draw(st.integers(1, 4)) * UNIT for n in services}
    width = len(services) if multi else 1
    phase = st.lists(st.sampled_from(services), min_size=1, max_size=width, unique=True)
    phases = [tuple(p) for p in draw(st.lists(phase, min_size=1, max_size=7))]
    # Room for the largest phase, and mostly less than the pipeline's services need all
    # together: that is when the order matters.
    least = max(sum(sizes[n] for n in p) for p in phases)
    used = sum(sizes[n] for n in {n for p in phases for n in p})
    capacity = draw(st.integers(least // UNIT, max(least, used - UNIT) // UNIT)) * UNIT
    warm: list[str] = []
    for name in draw(st.permutations(services))[: draw(st.integers(0, len(services)))]:
        if sum(sizes[n] for n in warm) + sizes[name] <= capacity:
            warm.append(name)
    return Model(
        services=services,
        phases=tuple(phases),
        sizes=sizes,
        capacity_mib=capacity,
        # Small ranges: ties in priority, load cost and recency are common.
        priorities={n: draw(st.integers(-2, 2)) for n in services},
        load_costs={n: float(draw(st.integers(0, 3))) for n in services},
        last_used={n: -float(draw(st.integers(1, 4))) for n in services},
        warm=frozenset(warm),
        items=draw(st.integers(1, 6)),
    )


FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(models())
def test_pipeline_order_is_optimal_for_one_service_per_phase(model: Model) -> None:
    aware, old, best = simulate(model, True), simulate(model, False), optimum(model)
    event(f"old order {'optimal' if old == best else 'worse'}")
    assert aware == best <= old


@FAST
@given(models(multi=True))
def test_pipeline_order_is_optimal_for_several_services_per_phase(model: Model) -> None:
    aware, old, best = simulate(model, True), simulate(model, False), optimum(model)
    event(f"old order {'optimal' if old == best else 'worse'}")
    assert aware == best <= old


@FAST
@given(models(multi=True, equal=False))
def test_unequal_sizes_are_never_better_than_the_optimum(model: Model) -> None:
    # Only this is provable with unequal sizes; see the case below for the rest.
    aware, old, best = simulate(model, True), simulate(model, False), optimum(model)
    event(f"aware {'<' if aware < old else '=' if aware == old else '>'} old")
    assert best <= aware
    assert best <= old


def test_old_order_can_be_worse_with_equal_sizes() -> None:
    # s0, s1, s2 in a cycle on room for two: LRU always stops the one needed next.
    model = Model(
        services=("s0", "s1", "s2"),
        phases=(("s0",), ("s1",), ("s2",)),
        sizes=dict.fromkeys(("s0", "s1", "s2"), UNIT),
        capacity_mib=2 * UNIT,
        priorities=dict.fromkeys(("s0", "s1", "s2"), 0),
        load_costs=dict.fromkeys(("s0", "s1", "s2"), 1.0),
        last_used=dict.fromkeys(("s0", "s1", "s2"), -1.0),
        warm=frozenset(),
        items=4,
    )
    assert simulate(model, False) == 12  # every phase a cold start
    assert simulate(model, True) == optimum(model) == 7


def test_unequal_sizes_can_make_the_pipeline_order_worse() -> None:
    # Found by Hypothesis; pinned to document the limit of Belady's rule, not as a goal.
    # s0 (2000 MiB), s1 (3000), s3 (1000) in a cycle on 4000 MiB. Back at s0 with s1 and
    # s3 loaded, farthest-first stops s3 first (needed in 2 phases), which alone frees
    # too little, then s1 as well; the old order stops only s1 (lower priority) and keeps
    # s3 for later.
    sizes = {"s0": 2000, "s1": 3000, "s3": 1000}
    model = Model(
        services=("s0", "s1", "s3"),
        phases=(("s0",), ("s1",), ("s3",)),
        sizes=sizes,
        capacity_mib=4000,
        priorities={"s0": 0, "s1": 0, "s3": 1},
        load_costs=dict.fromkeys(sizes, 0.0),
        last_used=dict.fromkeys(sizes, -1.0),
        warm=frozenset(),
        items=2,
    )
    assert simulate(model, False) == optimum(model) == 5
    assert simulate(model, True) == 6


# --- the plan's rules over random services with pipeline hints -------------------------


@dataclass(frozen=True)
class Case:
    services: dict[str, ServiceView]
    leases: dict[str, frozenset[str]]
    gpu: GpuView
    priority: int
    prefetch: PrefetchLimits | None


@st.composite
def hinted_cases(draw: st.DrawFn) -> Case:
    mib = st.integers(0, 4).map(lambda n: n * 500)
    states = st.sampled_from([State.HEALTHY, State.HEALTHY, State.STARTING, State.DRAINING])
    services = {
        name: ServiceView(
            name=name,
            state=draw(states),
            vram_mib=draw(mib),
            learned_peak_mib=0,
            priority=draw(st.integers(-2, 2)),
            last_used=float(draw(st.integers(0, 3))),
            next_use=draw(st.one_of(st.none(), st.integers(1, 4))),
            load_cost_s=float(draw(st.integers(0, 3))),
        )
        for name in NAMES
    }
    services["new"] = ServiceView("new", State.STOPPED, draw(mib.map(lambda m: m + 500)), 0, 0, 0)
    leases = {"w2": frozenset(draw(st.lists(st.sampled_from(NAMES), max_size=3)))}
    held = sum(v.reservation for v in services.values() if v.state is not State.STOPPED)
    total = held + draw(mib)
    gpu = GpuView(total, draw(st.one_of(st.just(total - held), st.integers(0, total))), 0, 0)
    prefetch = draw(
        st.one_of(
            st.none(),
            st.builds(PrefetchLimits, st.integers(1, 3), st.integers(0, 3).map(float)),
        )
    )
    return Case(services, leases, gpu, draw(st.integers(-3, 3)), prefetch)


def belady(views: list[ServiceView]) -> list[str]:
    def key(v: ServiceView) -> tuple[bool, int, float, int, float, str]:
        return (
            v.next_use is not None,
            -(v.next_use or 0),
            v.load_cost_s,
            v.priority,
            v.last_used,
            v.name,
        )

    return [v.name for v in sorted(views, key=key)]


def lowest_then_lru(views: list[ServiceView]) -> list[str]:
    return [v.name for v in sorted(views, key=lambda v: (v.priority, v.last_used, v.name))]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hinted_cases())
def test_pipeline_plan_obeys_the_rules(case: Case) -> None:
    limits = case.prefetch
    plan = plan_admission(
        ["new"],
        case.services,
        case.leases,
        case.gpu,
        case.priority,
        "t",
        pipeline=True,
        prefetch=limits,
    )
    running = [
        v
        for v in case.services.values()
        if v.state in (State.HEALTHY, State.STARTING) and v.name != "new"
    ]
    leased = case.leases["w2"]
    idle = [v for v in running if v.name not in leased]
    if limits is None:
        protected: list[str] = []
        preemptable = [v for v in running if v.name in leased and v.priority < case.priority]
        blocked = sorted(
            v.name for v in running if v.name in leased and v.priority >= case.priority
        )
    else:
        protected = [
            v.name
            for v in idle
            if (v.next_use is not None and v.next_use <= limits.distance)
            or v.load_cost_s > limits.saving_s
        ]
        preemptable = []
        blocked = sorted(v.name for v in running if v.name in leased)
    candidates = belady([v for v in idle if v.name not in protected]) + lowest_then_lru(preemptable)
    need = case.services["new"].reservation
    victims = [v.name for v in plan.victims]
    event(f"prefetch={limits is not None} fits={plan.fits} victims={len(victims)}")

    if need <= plan.free_before_mib:
        assert plan.fits
        assert victims == []
        return
    assert set(plan.protected) == set(protected)
    if need > free_after_stopping(case.services, case.gpu, candidates):
        assert not plan.fits
        assert victims == []
        assert list(plan.blocked_by) == blocked
        for name in protected:
            assert name in plan.reason
        return
    assert plan.fits
    assert victims == candidates[: len(victims)]
    assert need <= free_after_stopping(case.services, case.gpu, victims)
    assert need > free_after_stopping(case.services, case.gpu, victims[:-1])
    if limits is not None:
        assert all(v.kind == "evict" for v in plan.victims)
