"""The pipeline-aware victim order and a prefetch's limits, rule by rule.

Each ordering case fills the GPU with idle (or leased) 1000 MiB services and asks for
room for all of them, so that the victims are the whole order.
"""

from __future__ import annotations

import math

import pytest

from gpusm.domain.pipeline import (
    PrefetchLimits,
    belady_key,
    describe_next_use,
    next_uses,
    prefetch_protection,
    typical_load_s,
)
from gpusm.domain.policy import (
    GpuView,
    Plan,
    ServiceView,
    merge_plans,
    plan_admission,
)
from gpusm.domain.states import State

S = State
NO_LEASES: dict[str, frozenset[str]] = {}


def svc(
    name: str,
    nxt: int | None = None,
    cost: float = 0.0,
    *,
    prio: int = 0,
    used: float = 0.0,
    state: State = S.HEALTHY,
    vram: int = 1000,
) -> ServiceView:
    return ServiceView(name, state, vram, 0, prio, used, next_use=nxt, load_cost_s=cost)


def by_name(*views: ServiceView) -> dict[str, ServiceView]:
    return {v.name: v for v in views}


def names(plan: Plan) -> list[str]:
    return [v.name for v in plan.victims]


def evict_all(
    others: list[ServiceView],
    leases: dict[str, frozenset[str]] | None = None,
    *,
    pipeline: bool = True,
    priority: int = 100,
) -> list[str]:
    """The victims when `new` needs every MiB the running `others` hold: the full order."""
    running = sum(v.reservation for v in others if v.state in (S.HEALTHY, S.STARTING))
    total = sum(v.reservation for v in others if v.state is not S.STOPPED)
    services = by_name(svc("new", state=S.STOPPED, vram=running, prio=priority), *others)
    reading = GpuView(total, total, 0, 0)
    plan = plan_admission(
        ["new"], services, leases or NO_LEASES, reading, priority, pipeline=pipeline
    )
    assert plan.fits, plan.reason
    return names(plan)


# --- the order with pipeline information -----------------------------------------------

PIPELINE_ORDER = [
    pytest.param(
        [svc("a", 1, prio=-5), svc("b", 3, prio=9, used=99), svc("c", 2)],
        ["b", "c", "a"],
        id="farthest-next-use-first-whatever-the-priority-or-recency",
    ),
    pytest.param(
        [svc("far", 100, prio=-5), svc("never", None, 50.0, prio=9, used=99)],
        ["never", "far"],
        id="never-needed-before-any-number-even-if-expensive",
    ),
    pytest.param(
        [svc("dear", None, 9.0, prio=-5), svc("cheap", None, 1.0, prio=9, used=99)],
        ["cheap", "dear"],
        id="never-needed-ties-broken-by-lower-load-cost",
    ),
    pytest.param(
        [svc("near", 1, 0.0), svc("far", 2, 60.0)],
        ["far", "near"],
        id="next-use-before-load-cost",
    ),
    pytest.param(
        [svc("dear", 2, 9.0, prio=-5, used=0), svc("cheap", 2, 1.0, prio=9, used=99)],
        ["cheap", "dear"],
        id="equal-next-use-lower-load-cost-first",
    ),
    pytest.param(
        [svc("hi", 2, 1.0, prio=9, used=0), svc("lo", 2, 1.0, prio=1, used=99)],
        ["lo", "hi"],
        id="equal-next-use-and-load-lowest-priority-first",
    ),
    pytest.param(
        [svc("recent", 2, 1.0, prio=3, used=20), svc("old", 2, 1.0, prio=3, used=10)],
        ["old", "recent"],
        id="then-least-recently-used-first",
    ),
    pytest.param(
        [svc("b", 2, 1.0, prio=3, used=10), svc("a", 2, 1.0, prio=3, used=10)],
        ["a", "b"],
        id="full-tie-broken-by-name",
    ),
    pytest.param(
        [svc("s", 4, state=S.STARTING), svc("h", 1), svc("d", None, state=S.DRAINING)],
        ["s", "h"],
        id="starting-services-are-candidates-draining-ones-are-not",
    ),
]


@pytest.mark.parametrize(("others", "expected"), PIPELINE_ORDER)
def test_pipeline_order_of_idle_victims(others: list[ServiceView], expected: list[str]) -> None:
    assert evict_all(others) == expected


def test_pipeline_order_stops_only_as_many_as_needed() -> None:
    services = by_name(
        svc("new", state=S.STOPPED, vram=2000),
        svc("a", 1),
        svc("b", 5),
        svc("c", None),
        svc("d", 3),
    )
    plan = plan_admission(["new"], services, NO_LEASES, GpuView(4000, 4000, 0, 0), 0, pipeline=True)
    assert plan.fits
    assert names(plan) == ["c", "b"]
    assert plan.free_after_mib == 2000
    assert plan.protected == ()


def test_preemptable_services_come_after_idle_ones_in_their_old_order() -> None:
    others = [
        svc("idle-near", 1, 99.0, prio=9, used=99),  # the worst idle one, still first
        svc("idle-far", 7),
        svc("lease-never-lo", None, prio=1, used=5),
        svc("lease-near-lower", 1, 99.0, prio=0, used=9),  # pipeline hints ignored here
        svc("lease-old", None, prio=1, used=1),
    ]
    leases = {
        "w2": frozenset({"lease-never-lo", "lease-old"}),
        "w3": frozenset({"lease-near-lower"}),
    }
    assert evict_all(others, leases) == [
        "idle-far",
        "idle-near",
        "lease-near-lower",
        "lease-old",
        "lease-never-lo",
    ]


# --- without pipeline information nothing changes --------------------------------------

OLD_ORDER = [
    pytest.param(
        [svc("a", 1, prio=-5), svc("b", 3, prio=9, used=99), svc("c", 2)],
        ["a", "c", "b"],
        id="next-use-ignored",
    ),
    pytest.param(
        [svc("never", None, 0.0, prio=2), svc("far", 100, 50.0, prio=1)],
        ["far", "never"],
        id="never-needed-ignored",
    ),
    pytest.param(
        [svc("cheap", 2, 1.0, prio=0, used=9), svc("dear", 2, 9.0, prio=0, used=1)],
        ["dear", "cheap"],
        id="load-cost-ignored-least-recently-used-decides",
    ),
]


@pytest.mark.parametrize(("others", "expected"), OLD_ORDER)
def test_without_pipeline_information_the_order_is_priority_then_lru(
    others: list[ServiceView], expected: list[str]
) -> None:
    assert evict_all(others, pipeline=False) == expected


def test_without_pipeline_information_the_plan_is_the_same_as_before() -> None:
    hinted = [svc("a", 1, 3.0, prio=2, used=1), svc("b", None, 0.5, prio=1, used=2)]
    bare = [ServiceView(v.name, v.state, v.vram_mib, 0, v.priority, v.last_used) for v in hinted]
    for views in (hinted, bare):
        services = by_name(svc("new", state=S.STOPPED, vram=1000, prio=5), *views)
        plan = plan_admission(["new"], services, NO_LEASES, GpuView(2000, 2000, 0, 0), 5, "x")
        assert names(plan) == ["b"]
        assert plan.victims[0].reason == "idle, priority 1, to make room for new (x)"


def test_service_view_pipeline_fields_default_to_unknown() -> None:
    view = ServiceView("a", S.HEALTHY, 1000, 0, 0, 0.0, None)
    assert view.next_use is None
    assert view.load_cost_s == 0.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        pytest.param({"next_use": -1}, "next_use must be >= 0", id="negative-next-use"),
        pytest.param({"load_cost_s": -0.1}, "load_cost_s must be >= 0", id="negative-cost"),
        pytest.param({"load_cost_s": math.nan}, "load_cost_s must be >= 0", id="nan-cost"),
    ],
)
def test_service_view_refuses_bad_pipeline_hints(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ServiceView("a", S.HEALTHY, 1000, 0, 0, 0.0, **kwargs)  # type: ignore[arg-type]


# --- reasons ---------------------------------------------------------------------------


def test_victim_reasons_say_why_the_pipeline_rule_chose_them() -> None:
    services = by_name(
        svc("new", state=S.STOPPED, vram=3000, prio=5),
        svc("never", None, 12.0, prio=2),
        svc("far", 3, 2.08, prio=1),
        svc("once", 1, 0.5),
    )
    plan = plan_admission(
        ["new"], services, NO_LEASES, GpuView(3000, 3000, 0, 0), 5, "phase tts", pipeline=True
    )
    assert [v.reason for v in plan.victims] == [
        "idle, never needed in the pipeline, load ~12.0 s, priority 2, "
        "to make room for new (phase tts)",
        "idle, next needed in 3 phases, load ~2.1 s, priority 1, to make room for new (phase tts)",
        "idle, next needed in 1 phase, load ~0.5 s, priority 0, to make room for new (phase tts)",
    ]


def test_preempted_victims_keep_their_reason() -> None:
    services = by_name(svc("new", state=S.STOPPED, vram=1000, prio=5), svc("a", 4, 1.0, prio=1))
    plan = plan_admission(
        ["new"],
        services,
        {"w2": frozenset({"a"})},
        GpuView(1000, 1000, 0, 0),
        5,
        "x",
        pipeline=True,
    )
    assert plan.victims[0].kind == "preempt"
    assert plan.victims[0].reason == (
        "in use by w2 at priority 1 < 5, preempted to make room for new (x)"
    )


# --- a prefetch's limits ---------------------------------------------------------------

PREFETCH = -(2**62)  # what the engine gives a prefetch: below every configured priority


def prefetch_plan(
    others: list[ServiceView],
    need: int,
    limits: PrefetchLimits,
    leases: dict[str, frozenset[str]] | None = None,
    priority: int = PREFETCH,
) -> Plan:
    """A prefetch of `new` (`need` MiB) on a GPU that the running `others` fill."""
    held = sum(v.reservation for v in others if v.state in (S.HEALTHY, S.STARTING))
    services = by_name(svc("new", state=S.STOPPED, vram=need), *others)
    reading = GpuView(held, held, 0, 0)
    return plan_admission(
        ["new"], services, leases or NO_LEASES, reading, priority, "phase b", prefetch=limits
    )


PREFETCH_CASES = [
    pytest.param(
        [svc("at", 2), svc("before", 1), svc("after", 3), svc("never", None)],
        PrefetchLimits(distance=2, saving_s=10.0),
        ["never", "after"],
        ["at", "before"],
        id="next-use-at-or-before-the-prefetched-phase-is-protected",
    ),
    pytest.param(
        [svc("dear", None, 5.0), svc("even", None, 4.0), svc("cheap", 9, 1.0)],
        PrefetchLimits(distance=1, saving_s=4.0),
        ["even", "cheap"],
        ["dear"],
        id="load-cost-above-the-saving-is-protected-equal-is-not",
    ),
    pytest.param(
        [svc("a", 5, 0.0), svc("b", 6, 0.0)],
        PrefetchLimits(distance=4, saving_s=0.0),
        ["b", "a"],
        [],
        id="nothing-protected-pipeline-order",
    ),
]


@pytest.mark.parametrize(("others", "limits", "evictable", "protected"), PREFETCH_CASES)
def test_prefetch_evicts_only_what_its_limits_allow(
    others: list[ServiceView],
    limits: PrefetchLimits,
    evictable: list[str],
    protected: list[str],
) -> None:
    # Room for exactly the evictable ones: they are all stopped, in pipeline order.
    plan = prefetch_plan(others, 1000 * len(evictable), limits)
    assert plan.fits, plan.reason
    assert names(plan) == evictable
    assert all(v.kind == "evict" for v in plan.victims)
    assert sorted(plan.protected) == sorted(protected)
    # One MiB more and the protected ones would have to go: the prefetch does not fit.
    refused = prefetch_plan(others, 1000 * len(evictable) + 1, limits)
    assert not refused.fits
    assert refused.victims == ()
    assert refused.free_after_mib == refused.free_before_mib == 0
    assert sorted(refused.protected) == sorted(protected)


def test_a_prefetch_that_does_not_fit_names_the_protected_services() -> None:
    others = [svc("asr", 1, 3.0), svc("llm", 4, 40.0), svc("tts", 5, 1.0)]
    plan = prefetch_plan(others, 2000, PrefetchLimits(distance=2, saving_s=8.0))
    assert not plan.fits
    assert plan.victims == ()
    assert plan.protected == ("llm", "asr")  # in the pipeline order
    assert plan.reason == (
        "cannot fit: need 2000 MiB, 0 MiB free for admission, 1000 MiB even after stopping "
        "every service the policy allows; a prefetch may not evict "
        "llm (load ~40.0 s > prefetch saving ~8.0 s), "
        "asr (next needed in 1 phase <= prefetch distance 2)"
    )


def test_a_prefetch_never_preempts_whatever_its_priority() -> None:
    others = [svc("leased", None, prio=-9), svc("idle", 3)]
    leases = {"w2": frozenset({"leased"})}
    limits = PrefetchLimits(distance=1, saving_s=10.0)
    fits = prefetch_plan(others, 1000, limits, leases, priority=100)
    assert names(fits) == ["idle"]
    refused = prefetch_plan(others, 2000, limits, leases, priority=100)
    assert not refused.fits
    assert refused.victims == ()
    assert refused.blocked_by == ("leased",)
    assert refused.reason.endswith("blocked by leased (in use; a prefetch never preempts)")


def test_a_prefetch_orders_by_the_pipeline_without_the_flag() -> None:
    others = [svc("near", 2, prio=-9, used=0), svc("far", 8, prio=9, used=9)]
    plan = prefetch_plan(others, 1000, PrefetchLimits(distance=1, saving_s=1.0))
    assert names(plan) == ["far"]
    assert plan.victims[0].reason.startswith("idle, next needed in 8 phases, load ~0.0 s")


def test_a_prefetch_that_fits_already_evicts_and_protects_nothing() -> None:
    services = by_name(svc("new", state=S.STOPPED, vram=1000), svc("a", 1))
    plan = plan_admission(
        ["new"],
        services,
        NO_LEASES,
        GpuView(2000, 2000, 0, 0),
        PREFETCH,
        prefetch=PrefetchLimits(1, 0.0),
    )
    assert plan.fits
    assert plan.victims == ()
    assert plan.protected == ()


def test_merging_keeps_the_protected_services_of_the_failing_plan() -> None:
    failing = prefetch_plan([svc("a", 1)], 1000, PrefetchLimits(1, 0.0))
    fine = prefetch_plan([svc("b", None)], 1000, PrefetchLimits(1, 0.0))
    assert merge_plans([fine, failing]).protected == ("a",)


@pytest.mark.parametrize(
    ("distance", "saving", "message"),
    [
        pytest.param(0, 1.0, "distance must be >= 1", id="zero-distance"),
        pytest.param(1, -1.0, "saving_s must be >= 0", id="negative-saving"),
        pytest.param(1, math.nan, "saving_s must be >= 0", id="nan-saving"),
    ],
)
def test_prefetch_limits_refuse_nonsense(distance: int, saving: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PrefetchLimits(distance, saving)


# --- the pure helpers ------------------------------------------------------------------


def test_belady_key_sorts_never_then_farthest_then_cheapest() -> None:
    keys = {
        "never-dear": belady_key(None, 9.0),
        "never-cheap": belady_key(None, 1.0),
        "far": belady_key(10, 0.0),
        "near-cheap": belady_key(1, 0.0),
        "near-dear": belady_key(1, 5.0),
    }
    assert sorted(keys, key=keys.__getitem__) == [
        "never-cheap",
        "never-dear",
        "far",
        "near-cheap",
        "near-dear",
    ]


@pytest.mark.parametrize(
    ("next_use", "cost", "expected"),
    [
        pytest.param(2, 0.0, "next needed in 2 phases <= prefetch distance 2", id="at"),
        pytest.param(3, 0.0, None, id="after"),
        pytest.param(None, 5.0, "load ~5.0 s > prefetch saving ~4.0 s", id="dear"),
        pytest.param(None, 4.0, None, id="as-dear-as-the-saving"),
        pytest.param(1, 9.0, "next needed in 1 phase <= prefetch distance 2", id="both"),
    ],
)
def test_prefetch_protection(next_use: int | None, cost: float, expected: str | None) -> None:
    assert prefetch_protection(next_use, cost, PrefetchLimits(2, 4.0)) == expected


def test_describe_next_use() -> None:
    assert describe_next_use(None) == "never needed in the pipeline"
    assert describe_next_use(1) == "next needed in 1 phase"
    assert describe_next_use(4) == "next needed in 4 phases"


PHASES = {"asr": ["whisper"], "think": ["llm"], "speak": ["tts", "llm"], "idle": []}
CYCLE = ["asr", "think", "idle", "speak"]


@pytest.mark.parametrize(
    ("phase", "expected"),
    [
        pytest.param("asr", {"llm": 1, "tts": 3, "whisper": 4}, id="own-service-next-round"),
        pytest.param("think", {"tts": 2, "llm": 2, "whisper": 3}, id="nearest-of-two-uses"),
        pytest.param("idle", {"tts": 1, "llm": 1, "whisper": 2}, id="from-a-phase-without-gpu"),
        pytest.param("nowhere", {}, id="unknown-phase-unknown-future"),
    ],
)
def test_next_uses_walk_the_cycle(phase: str, expected: dict[str, int]) -> None:
    assert next_uses(CYCLE, PHASES, phase) == expected


def test_typical_load_is_the_median_else_the_hint_else_zero() -> None:
    assert typical_load_s([3.0, 1.0, 20.0]) == 3.0
    assert typical_load_s([4.0, 1.0, 2.0, 30.0]) == 3.0
    assert typical_load_s([], 7.5) == 7.5
    assert typical_load_s([2.0], 7.5) == 2.0
    assert typical_load_s([]) == 0.0
