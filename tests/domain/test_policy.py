"""The admission arithmetic and the eviction/preemption policy, case by case."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from gpusm.domain.policy import (
    GpuView,
    Plan,
    ServiceView,
    Victim,
    free_after_stopping,
    free_for_admission,
    plan_admission,
    release_plan,
    request_priority,
)
from gpusm.domain.states import State
from gpusm.errors import InsufficientVram, UnknownName

S = State
NO_LEASES: dict[str, frozenset[str]] = {}


def svc(
    name: str,
    state: State = S.HEALTHY,
    vram: int = 1000,
    *,
    peak: int = 0,
    prio: int = 0,
    used: float = 0.0,
    ttl: float | None = None,
) -> ServiceView:
    return ServiceView(name, state, vram, peak, prio, used, ttl)


def by_name(*views: ServiceView) -> dict[str, ServiceView]:
    return {v.name: v for v in views}


def gpu(
    total: int = 10_000, free: int | None = None, foreign: int = 0, reserve: int = 0
) -> GpuView:
    # By default the driver reports everything free, so the accounting side of min() binds.
    return GpuView(total, total if free is None else free, foreign, reserve)


def names(plan: Plan) -> list[str]:
    return [v.name for v in plan.victims]


# --- reservations and free for admission ---------------------------------------------


def test_reservation_is_the_larger_of_declared_and_learned_peak() -> None:
    assert svc("a", vram=4000, peak=0).reservation == 4000
    assert svc("a", vram=4000, peak=5500).reservation == 5500
    assert svc("a", vram=4000, peak=3000).reservation == 4000


@pytest.mark.parametrize(
    ("views", "reading", "expected"),
    [
        pytest.param([svc("a", vram=3000), svc("b", vram=2000)], gpu(), 5000, id="sum-of-running"),
        pytest.param([svc("a", vram=3000, peak=4500)], gpu(), 5500, id="learned-peak-counts"),
        pytest.param([svc("a", S.STARTING, 3000)], gpu(), 7000, id="starting-counts"),
        pytest.param([svc("a", S.DRAINING, 3000)], gpu(), 7000, id="draining-still-counts"),
        pytest.param([svc("a", S.STOPPED, 3000)], gpu(), 10_000, id="stopped-is-free"),
        pytest.param([svc("a", S.FAILED, 3000)], gpu(), 10_000, id="failed-is-free"),
        pytest.param([svc("a", vram=3000)], gpu(foreign=2500), 4500, id="foreign-reduces"),
        pytest.param([svc("a", vram=3000)], gpu(reserve=512), 6488, id="reserve-subtracted"),
        pytest.param([svc("a", vram=3000)], gpu(free=4000), 4000, id="driver-free-binds"),
        pytest.param(
            [svc("a", vram=3000)], gpu(free=4000, reserve=500), 3500, id="reserve-after-driver"
        ),
        pytest.param([svc("a", vram=9000)], gpu(foreign=2000), 0, id="overcommitted-is-zero"),
        pytest.param([], gpu(free=0, reserve=100), 0, id="never-negative"),
    ],
)
def test_free_for_admission_is_min_of_driver_and_accounting_minus_reserve(
    views: list[ServiceView], reading: GpuView, expected: int
) -> None:
    assert free_for_admission(by_name(*views), reading) == expected


def test_stopping_returns_the_reservation_on_both_sides_never_past_total() -> None:
    services = by_name(svc("a", vram=6000), svc("b", vram=3000))
    # Driver says 500 free (a holds more than declared, say); accounting says 1000.
    reading = gpu(free=500)
    assert free_for_admission(services, reading) == 500
    assert free_after_stopping(services, reading, ["b"]) == 3500  # min(500+3000, 4000)
    assert free_after_stopping(services, reading, ["a", "b"]) == 9500  # min(9500, 10000)
    # A driver reading that grows past the total is bounded by the accounting side.
    assert free_after_stopping(services, gpu(free=10_000), ["a", "b"]) == 10_000


def test_stopping_an_inactive_service_frees_nothing() -> None:
    services = by_name(svc("a", S.STOPPED, 6000), svc("b", vram=3000))
    assert free_after_stopping(services, gpu(free=7000), ["a"]) == 7000


@pytest.mark.parametrize(
    ("factory", "field"),
    [
        pytest.param(lambda: svc("a", vram=-1), "vram_mib", id="vram"),
        pytest.param(lambda: svc("a", peak=-5), "learned_peak_mib", id="peak"),
        pytest.param(lambda: GpuView(-1, 0, 0, 0), "total_mib", id="total"),
        pytest.param(lambda: GpuView(10, -1, 0, 0), "driver_free_mib", id="driver-free"),
        pytest.param(lambda: GpuView(10, 0, -1, 0), "foreign_mib", id="foreign"),
        pytest.param(lambda: GpuView(10, 0, 0, -1), "reserve_mib", id="reserve"),
    ],
)
def test_negative_sizes_are_rejected_naming_the_field(
    factory: Callable[[], object], field: str
) -> None:
    with pytest.raises(ValueError, match=field):
        factory()


# --- request priority ----------------------------------------------------------------


def test_request_priority_is_the_highest_needed_unless_explicit() -> None:
    services = by_name(svc("a", prio=5), svc("b", prio=50), svc("c", prio=99))
    assert request_priority(["a", "b"], services, None) == 50
    assert request_priority(["a", "b"], services, 7) == 7
    assert request_priority(["a"], services, 80) == 80
    assert request_priority([], services, None) == 0


def test_request_priority_names_an_unknown_service() -> None:
    with pytest.raises(UnknownName, match=r"'nope'.*known: a"):
        request_priority(["nope"], by_name(svc("a")), None)


# --- plans that fit without stopping anything -----------------------------------------


def test_fits_without_victims_when_free_suffices() -> None:
    services = by_name(svc("tts", S.STOPPED, 4000), svc("vlm", vram=5000))
    plan = plan_admission(["tts"], services, NO_LEASES, gpu(), 0)
    assert plan.fits
    assert plan.victims == ()
    assert plan.need_mib == 4000
    assert plan.free_before_mib == plan.free_after_mib == 5000
    assert plan.to_start == ("tts",)
    assert plan.already_running == ()
    assert plan.reason == "fits: need 4000 MiB, 5000 MiB free"


def test_already_running_services_are_not_counted_in_need() -> None:
    services = by_name(
        svc("a", S.HEALTHY, 4000), svc("b", S.STARTING, 3000), svc("c", S.STOPPED, 2000)
    )
    plan = plan_admission(["a", "b", "c", "a"], services, NO_LEASES, gpu(), 0)
    assert plan.fits
    assert plan.need_mib == 2000
    assert plan.already_running == ("a", "b")
    assert plan.to_start == ("c",)


def test_nothing_to_start_fits_even_on_an_overcommitted_gpu() -> None:
    services = by_name(svc("a", vram=8000), svc("idle", vram=2000))
    plan = plan_admission(["a"], services, NO_LEASES, gpu(foreign=3000), 0)
    assert plan.fits
    assert plan.need_mib == 0
    assert plan.victims == ()


def test_learned_peak_raises_the_need() -> None:
    services = by_name(svc("big", S.STOPPED, 4000, peak=6500), svc("x", vram=4000))
    plan = plan_admission(["big"], services, NO_LEASES, gpu(), 0)
    assert plan.need_mib == 6500
    assert names(plan) == ["x"]


def test_unknown_needed_service_is_named() -> None:
    with pytest.raises(UnknownName, match="'ghost'"):
        plan_admission(["ghost"], by_name(svc("a")), NO_LEASES, gpu(), 0)


# --- eviction order --------------------------------------------------------------------

EVICTION_CASES = [
    pytest.param(
        [svc("hi", prio=10, used=1), svc("lo", prio=1, used=9)],
        3000,
        ["lo"],
        id="lowest-priority-first-even-if-recently-used",
    ),
    pytest.param(
        [svc("recent", prio=5, used=20), svc("old", prio=5, used=10)],
        3000,
        ["old"],
        id="same-priority-least-recently-used-first",
    ),
    pytest.param(
        [svc("b", prio=5, used=10), svc("a", prio=5, used=10)],
        3000,
        ["a"],
        id="full-tie-broken-by-name",
    ),
    pytest.param(
        [svc("a", prio=1, used=1), svc("b", prio=2, used=1), svc("c", prio=3, used=1)],
        4000,
        ["a", "b"],
        id="stops-only-as-many-as-needed",
    ),
    pytest.param(
        [svc("small", vram=500, prio=0), svc("large", vram=5000, prio=1)],
        4000,
        ["small", "large"],
        id="walks-the-order-not-a-best-fit",
    ),
    pytest.param(
        [svc("s", S.STARTING, prio=0, used=1), svc("h", prio=0, used=0)],
        3000,
        ["h"],
        id="starting-services-are-candidates-too",
    ),
]


@pytest.mark.parametrize(("others", "need", "expected"), EVICTION_CASES)
def test_idle_services_are_evicted_lowest_priority_then_least_recently_used(
    others: list[ServiceView], need: int, expected: list[str]
) -> None:
    # The GPU is full of `others`, each 1000 MiB unless said; `new` needs `need`.
    used = sum(v.reservation for v in others)
    services = by_name(svc("new", S.STOPPED, need, prio=100), *others)
    reading = gpu(total=used + 2000)
    plan = plan_admission(["new"], services, NO_LEASES, reading, 100)
    assert plan.fits
    assert names(plan) == expected
    assert all(v.kind == "evict" for v in plan.victims)
    assert plan.free_after_mib >= need
    assert plan.free_after_mib == free_after_stopping(services, reading, expected)


def test_draining_and_stopped_services_are_never_victims() -> None:
    services = by_name(
        svc("new", S.STOPPED, 3000),
        svc("d", S.DRAINING, 2000),
        svc("s", S.STOPPED, 2000),
        svc("f", S.FAILED, 2000),
        svc("h", S.HEALTHY, 2000, prio=9),
    )
    plan = plan_admission(["new"], services, NO_LEASES, gpu(total=5000), 0)
    assert plan.fits
    assert names(plan) == ["h"]


def test_service_needed_by_the_request_is_never_a_victim() -> None:
    services = by_name(
        svc("keep", vram=4000, prio=-10, used=0),  # lowest and oldest: first if it were idle
        svc("other", vram=4000, prio=5, used=50),
        svc("new", S.STOPPED, 4000, prio=5),
    )
    plan = plan_admission(["keep", "new"], services, NO_LEASES, gpu(), 5)
    assert plan.fits
    assert names(plan) == ["other"]
    assert plan.already_running == ("keep",)


def test_draining_service_needed_again_counts_twice_until_stopped() -> None:
    services = by_name(svc("a", S.DRAINING, 6000))
    plan = plan_admission(["a"], services, NO_LEASES, gpu(), 0)
    assert not plan.fits
    assert plan.need_mib == 6000
    assert plan.to_start == ("a",)
    assert "6000 MiB still held by draining a" in plan.reason


# --- preemption ------------------------------------------------------------------------

LEASED = {"w2": frozenset({"lo", "eq"}), "w3": frozenset({"hi", "lo"})}


@pytest.mark.parametrize(
    ("need", "priority", "fits", "victims", "blocked"),
    [
        pytest.param(5000, 50, True, [("idle", "evict")], [], id="idle-first-despite-priority"),
        pytest.param(
            7000, 50, True, [("idle", "evict"), ("lo", "preempt")], [], id="then-lower-priority"
        ),
        pytest.param(9000, 50, False, [], ["eq", "hi"], id="equal-priority-never-preempted"),
        pytest.param(
            9000,
            51,
            True,
            [("idle", "evict"), ("lo", "preempt"), ("eq", "preempt")],
            [],
            id="explicit-higher-priority-preempts-more",
        ),
        pytest.param(7000, 10, False, [], ["eq", "hi", "lo"], id="explicit-low-priority-cannot"),
    ],
)
def test_leased_services_are_preempted_only_below_the_request_priority(
    need: int, priority: int, fits: bool, victims: list[tuple[str, str]], blocked: list[str]
) -> None:
    services = by_name(
        svc("idle", vram=2000, prio=90, used=5),
        svc("lo", vram=2000, prio=10, used=1),
        svc("eq", vram=2000, prio=50, used=0),
        svc("hi", vram=2000, prio=70, used=0),
        svc("new", S.STOPPED, need, prio=50),
    )
    plan = plan_admission(["new"], services, LEASED, gpu(total=11_000), priority)
    assert plan.fits is fits
    assert [(v.name, v.kind) for v in plan.victims] == victims
    assert list(plan.blocked_by) == blocked


def test_preemptable_services_are_ordered_lowest_priority_then_lru() -> None:
    services = by_name(
        svc("p5new", vram=1000, prio=5, used=9),
        svc("p5old", vram=1000, prio=5, used=1),
        svc("p1", vram=1000, prio=1, used=99),
        svc("new", S.STOPPED, 3000, prio=10),
    )
    leases = {"w": frozenset({"p5new", "p5old", "p1"})}
    plan = plan_admission(["new"], services, leases, gpu(total=3000), 10)
    assert names(plan) == ["p1", "p5old", "p5new"]


def test_a_service_leased_by_another_client_and_needed_is_shared_not_stopped() -> None:
    services = by_name(svc("shared", vram=5000, prio=0), svc("new", S.STOPPED, 5000, prio=9))
    plan = plan_admission(["shared", "new"], services, {"w2": frozenset({"shared"})}, gpu(), 9)
    assert plan.fits
    assert plan.victims == ()


def test_victim_reasons_name_priority_clients_and_beneficiary() -> None:
    services = by_name(
        svc("idle", vram=3000, prio=1),
        svc("busy", vram=3000, prio=2),
        svc("comfyui", S.STOPPED, 9000, prio=9),
    )
    leases = {"w3": frozenset({"busy"}), "w2": frozenset({"busy"})}
    plan = plan_admission(["comfyui"], services, leases, gpu(total=10_000), 9, "phase video")
    assert plan.victims == (
        Victim("idle", "evict", 3000, "idle, priority 1, to make room for comfyui (phase video)"),
        Victim(
            "busy",
            "preempt",
            3000,
            "in use by w2, w3 at priority 2 < 9, preempted to make room for comfyui (phase video)",
        ),
    )
    assert plan.reason == (
        "fits after stopping idle, busy: need 9000 MiB, 4000 MiB free before, 10000 MiB after"
    )


def test_reason_without_requester_names_only_the_services() -> None:
    services = by_name(svc("idle", vram=3000), svc("a", S.STOPPED, 4000), svc("b", S.STOPPED, 1))
    plan = plan_admission(["a", "b"], services, NO_LEASES, gpu(total=5000), 0)
    assert plan.victims[0].reason == "idle, priority 0, to make room for a, b"


# --- cannot fit: nothing is stopped for nothing ---------------------------------------


def test_nothing_is_stopped_when_even_every_allowed_stop_would_not_fit() -> None:
    services = by_name(
        svc("idle", vram=2000, prio=0),
        svc("lo", vram=2000, prio=1),
        svc("z-block", vram=3000, prio=9),
        svc("a-block", vram=2000, prio=7),
        svc("new", S.STOPPED, 6000, prio=5),
    )
    leases = {"w2": frozenset({"lo", "z-block"}), "w3": frozenset({"a-block"})}
    plan = plan_admission(["new"], services, leases, gpu(total=10_000), 5)
    assert not plan.fits
    assert plan.victims == ()
    assert plan.blocked_by == ("a-block", "z-block")
    assert plan.free_before_mib == plan.free_after_mib == 1000
    assert plan.reason == (
        "cannot fit: need 6000 MiB, 1000 MiB free for admission, 5000 MiB even after stopping"
        " every service the policy allows; blocked by a-block, z-block (in use at priority >= 5)"
    )


def test_foreign_usage_and_an_impossible_need_are_named_in_the_reason() -> None:
    services = by_name(svc("idle", vram=1000), svc("new", S.STOPPED, 8000))
    plan = plan_admission(["new"], services, NO_LEASES, gpu(foreign=2500, reserve=512), 0)
    assert not plan.fits
    assert plan.victims == ()
    assert plan.blocked_by == ()
    assert "more than this GPU can ever offer (10000 MiB total - 2500 MiB foreign - " in plan.reason
    assert "512 MiB reserve = 6988 MiB)" in plan.reason
    assert "2500 MiB held by processes gpusm does not own" in plan.reason


def test_reserve_mib_turns_a_tight_fit_into_an_eviction_or_a_refusal() -> None:
    services = by_name(svc("idle", vram=1000), svc("new", S.STOPPED, 9000))
    assert plan_admission(["new"], services, NO_LEASES, gpu(), 0).victims == ()
    evicting = plan_admission(["new"], services, NO_LEASES, gpu(reserve=1), 0)
    assert evicting.fits
    assert names(evicting) == ["idle"]
    refused = plan_admission(["new"], services, NO_LEASES, gpu(reserve=1001), 0)
    assert not refused.fits
    assert names(refused) == []


def test_plan_turns_into_insufficient_vram_with_need_free_foreign_and_blockers() -> None:
    services = by_name(svc("b", vram=4000, prio=9), svc("new", S.STOPPED, 7000, prio=1))
    plan = plan_admission(["new"], services, {"w": frozenset({"b"})}, gpu(foreign=1000), 1)
    err = plan.insufficient()
    assert isinstance(err, InsufficientVram)
    assert (err.need_mib, err.free_mib, err.foreign_mib, err.blocked_by) == (
        7000,
        5000,
        1000,
        ["b"],
    )
    assert "blocked by: b" in str(err)


# --- release: true phases --------------------------------------------------------------


def test_release_plan_stops_every_idle_running_service_in_eviction_order() -> None:
    services = by_name(
        svc("needed", prio=0),
        svc("leased", prio=0),
        svc("b", S.STARTING, prio=3, used=1),
        svc("a", prio=3, used=2),
        svc("c", prio=1, used=9),
        svc("d", S.DRAINING),
        svc("s", S.STOPPED),
    )
    assert release_plan(["needed"], services, {"w2": frozenset({"leased"})}) == ["c", "b", "a"]
    with pytest.raises(UnknownName):
        release_plan(["ghost"], services, NO_LEASES)
