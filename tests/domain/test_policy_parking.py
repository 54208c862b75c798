"""The admission policy with parkable services: what a parked service reserves, what
waking one needs, and when a victim is parked rather than stopped."""

from __future__ import annotations

from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from gpusm.domain.policy import (
    GpuView,
    ServiceView,
    drains_suffice,
    free_for_admission,
    idle_expired,
    plan_admission,
    release_plan,
)
from gpusm.domain.states import State

S = State


def svc(
    name: str,
    state: State = S.HEALTHY,
    vram: int = 1000,
    *,
    residual: int | None = None,
    prio: int = 0,
    used: float = 0.0,
    ttl: float | None = None,
    since: float = 0.0,
) -> ServiceView:
    return ServiceView(
        name, state, vram, 0, prio, used, ttl, residual_mib=residual, state_since=since
    )


def by_name(*views: ServiceView) -> dict[str, ServiceView]:
    return {v.name: v for v in views}


def gpu(total: int = 24_000) -> GpuView:
    return GpuView(total, total, 0, 0)


def test_a_parked_service_reserves_its_residual_only() -> None:
    services = by_name(svc("comfy", S.PARKED, 20_000, residual=1000), svc("tts", vram=4000))
    assert free_for_admission(services, gpu()) == 24_000 - 1000 - 4000
    assert services["comfy"].reservation == 1000
    assert services["comfy"].full_mib == 20_000


def test_a_residual_larger_than_the_service_counts_as_the_whole_service() -> None:
    view = svc("x", S.PARKED, 500, residual=2000)
    assert view.reservation == 500


def test_waking_a_parked_service_needs_its_full_size_less_the_residual() -> None:
    services = by_name(svc("comfy", S.PARKED, 20_000, residual=1000), svc("tts", vram=4000))
    plan = plan_admission(["comfy"], services, {}, gpu(), 0)
    assert plan.to_start == ("comfy",)
    assert plan.need_mib == 19_000
    assert plan.fits
    assert plan.victims == ()  # 24000 - 5000 = 19000: exactly enough


def test_an_idle_victim_that_can_park_is_parked_when_that_is_enough() -> None:
    services = by_name(
        svc("vidi", vram=4000, residual=1000),
        svc("comfy", S.STOPPED, 21_000),
    )
    plan = plan_admission(["comfy"], services, {}, gpu(), 0, "phase video")
    assert [(v.name, v.action, v.frees_mib) for v in plan.victims] == [("vidi", "park", 3000)]
    assert plan.free_after_mib == 23_000
    assert "parked (keeps 1000 MiB)" in plan.victims[0].reason
    assert plan.reason.startswith("fits after parking vidi:")


def test_a_victim_whose_residual_leaves_too_little_is_stopped() -> None:
    services = by_name(
        svc("vidi", vram=4000, residual=1000),
        svc("comfy", S.STOPPED, 23_500),
    )
    plan = plan_admission(["comfy"], services, {}, gpu(), 0)
    assert [(v.name, v.action, v.frees_mib) for v in plan.victims] == [("vidi", "stop", 4000)]


def test_parking_never_adds_a_victim_that_stopping_would_spare() -> None:
    # Stopping vidi alone makes room for tts; parking it (keeping 1000) would not, and
    # parking comfy as well would: the policy stops vidi and leaves comfy running.
    services = by_name(
        svc("vidi", vram=4000, residual=1000, used=1),
        svc("comfy", vram=20_000, residual=1000, used=2),
        svc("tts", S.STOPPED, 4000),
    )
    plan = plan_admission(["tts"], services, {}, gpu(), 0)
    assert [(v.name, v.action) for v in plan.victims] == [("vidi", "stop")]


def test_the_victims_needed_soonest_are_the_ones_parked() -> None:
    # Both must go; only one can park and still leave room: the later in the order
    # (needed sooner under Belady) keeps its process.
    services = by_name(
        svc("far", vram=6000, residual=1000, used=1),
        svc("near", vram=6000, residual=1000, used=2),
        svc("big", S.STOPPED, 22_500),
    )
    # One stop frees 6000 (18000 free), two parks 10000 (22000): neither is enough.
    plan = plan_admission(["big"], services, {}, gpu(24_000), 0)
    assert [(v.name, v.action) for v in plan.victims] == [("far", "stop"), ("near", "park")]


def test_a_parked_service_may_be_stopped_for_room_and_frees_its_residual() -> None:
    services = by_name(
        svc("parked", S.PARKED, 8000, residual=2000),
        svc("new", S.STOPPED, 23_000),
    )
    plan = plan_admission(["new"], services, {}, gpu(), 0)
    assert [(v.name, v.action, v.frees_mib) for v in plan.victims] == [("parked", "stop", 2000)]
    assert "idle, parked, " in plan.victims[0].reason


def test_a_preempted_victim_that_can_park_is_parked() -> None:
    services = by_name(
        svc("low", vram=8000, residual=500, prio=1),
        svc("high", S.STOPPED, 20_000, prio=5),
    )
    plan = plan_admission(["high"], services, {"w": frozenset({"low"})}, gpu(), 5)
    assert [(v.name, v.kind, v.action) for v in plan.victims] == [("low", "preempt", "park")]


def test_parking_services_count_as_freeing_for_drains_suffice() -> None:
    services = by_name(
        svc("going", S.PARKING, 8000, residual=500),
        svc("comfy", S.STOPPED, 20_000),
    )
    assert drains_suffice(["comfy"], services, gpu())
    tight = by_name(
        svc("going", S.PARKING, 8000, residual=5000),
        svc("comfy", S.STOPPED, 20_000),
    )
    assert not drains_suffice(["comfy"], tight, gpu())


def test_a_parked_service_expires_one_ttl_after_it_parked() -> None:
    services = by_name(svc("p", S.PARKED, 8000, residual=500, used=0, ttl=60, since=100))
    assert idle_expired(services, {}, 159) == []
    assert idle_expired(services, {}, 160) == ["p"]


def test_a_release_leaves_parked_services_parked() -> None:
    services = by_name(
        svc("p", S.PARKED, 8000, residual=500),
        svc("awake", vram=2000, residual=500),
        svc("keep", vram=1000),
    )
    assert release_plan(["keep"], services, {}) == ["awake"]


NAMES = [f"s{i}" for i in range(6)]


@st.composite
def parkable_cases(draw: st.DrawFn) -> tuple[dict[str, ServiceView], str, GpuView]:
    views = {}
    for i, name in enumerate(NAMES):
        vram = draw(st.integers(1, 10)) * 1000
        views[name] = ServiceView(
            name,
            draw(st.sampled_from([S.HEALTHY, S.HEALTHY, S.PARKED, S.STARTING, S.STOPPED])),
            vram,
            0,
            draw(st.integers(0, 2)),
            float(i),
            residual_mib=draw(st.one_of(st.none(), st.integers(0, 4).map(lambda n: n * 500))),
        )
    needed = draw(st.sampled_from(NAMES))
    views[needed] = replace(views[needed], state=draw(st.sampled_from([S.STOPPED, S.PARKED])))
    return views, needed, gpu(draw(st.integers(10, 40)) * 1000)


@settings(max_examples=300, deadline=None)
@given(parkable_cases())
def test_parking_spares_processes_but_never_changes_which_victims_go(
    case: tuple[dict[str, ServiceView], str, GpuView],
) -> None:
    views, needed, device = case
    plan = plan_admission([needed], views, {}, device, 0)
    # The same request where nothing can park (parked ones keep what they hold).
    plain = {
        n: replace(v, residual_mib=None) if v.state is not S.PARKED else v for n, v in views.items()
    }
    stops_only = plan_admission([needed], plain, {}, device, 0)
    assert plan.fits == stops_only.fits
    assert [v.name for v in plan.victims] == [v.name for v in stops_only.victims]
    if plan.fits:
        assert plan.need_mib <= plan.free_after_mib
    for victim in plan.victims:
        if victim.action == "park":
            assert views[victim.name].can_park
            view = views[victim.name]
            assert victim.frees_mib == view.reservation - view.parked_mib
