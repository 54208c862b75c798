"""Properties of the admission policy over random services, leases and GPU readings.

Each property is checked against an oracle written here from the rules in
ARCHITECTURE.md, not against the policy's own helpers.
"""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from gpusm.domain.policy import (
    GpuView,
    ServiceView,
    free_after_stopping,
    free_for_admission,
    plan_admission,
    request_priority,
)
from gpusm.domain.states import ACTIVE_STATES, RUNNING_STATES, State

NAMES = [f"s{i}" for i in range(7)]
CLIENTS = ["w1", "w2", "w3"]


@dataclass(frozen=True)
class Case:
    services: dict[str, ServiceView]
    leases: dict[str, frozenset[str]]
    needed: list[str]
    gpu: GpuView
    explicit: int | None


MIB = st.integers(0, 8).map(lambda n: n * 500)  # coarse steps make exact ties common


@st.composite
def cases(draw: st.DrawFn) -> Case:
    chosen = draw(st.lists(st.sampled_from(NAMES), unique=True, min_size=1))
    needed = draw(st.lists(st.sampled_from(chosen), min_size=1, max_size=3))
    # Needed services are mostly stopped (so there is something to start), the others
    # mostly running (so there is something to stop); every state still turns up.
    to_start = st.sampled_from([State.STOPPED, State.STOPPED, State.HEALTHY])
    to_stop = st.sampled_from([State.HEALTHY, State.HEALTHY, State.STARTING, State.STOPPED])
    services = {
        name: ServiceView(
            name=name,
            state=draw(
                st.one_of(to_start if name in needed else to_stop, st.sampled_from(list(State)))
            ),
            vram_mib=draw(MIB),
            learned_peak_mib=draw(st.one_of(st.just(0), MIB)),
            # Small ranges so that ties in priority and last_used are common.
            priority=draw(st.integers(-2, 2)),
            last_used=float(draw(st.integers(0, 3))),
        )
        for name in chosen
    }
    leases = {
        client: frozenset(draw(st.lists(st.sampled_from(chosen), max_size=5)))
        for client in draw(st.lists(st.sampled_from(CLIENTS), unique=True, min_size=1))
    }
    # A GPU about as full as the services make it, usually short of the request's need by
    # some part of what the running services hold, so that plans often need victims.
    active = sum(v.reservation for v in services.values() if v.state in ACTIVE_STATES)
    need = sum(
        services[n].reservation for n in set(needed) if services[n].state not in RUNNING_STATES
    )
    foreign = draw(st.one_of(st.just(0), MIB))
    short = draw(st.integers(1, active // 500 + 1).map(lambda n: n * 500))
    slack = draw(st.one_of(st.just(max(0, need - short)), st.integers(0, 8).map(lambda n: n * 500)))
    total = active + foreign + slack
    accounted = max(0, total - active - foreign)
    driver_free = draw(st.one_of(st.just(accounted), st.integers(0, total)))
    gpu = GpuView(total, driver_free, foreign, draw(st.sampled_from([0, 500, 512])))
    explicit = draw(st.one_of(st.none(), st.integers(-3, 3)))
    return Case(services, leases, needed, gpu, explicit)


def oracle_free(case: Case, stopped: set[str]) -> int:
    active = [v for v in case.services.values() if v.state in ACTIVE_STATES]
    reserved = sum(v.reservation for v in active if v.name not in stopped)
    returned = sum(v.reservation for v in active if v.name in stopped)
    g = case.gpu
    driver = min(g.total_mib, g.driver_free_mib + returned)  # the cap the spec asks for
    return max(0, min(driver, g.total_mib - reserved - g.foreign_mib) - g.reserve_mib)


def order(views: list[ServiceView]) -> list[str]:
    return [v.name for v in sorted(views, key=lambda v: (v.priority, v.last_used, v.name))]


# No deadline and no speed health check: a loaded 2-core box must not make this flaky.
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_plan_obeys_the_admission_rules(case: Case) -> None:
    priority = request_priority(case.needed, case.services, case.explicit)
    if case.explicit is None:
        expected_priority = max((case.services[n].priority for n in case.needed), default=0)
        assert priority == expected_priority
    else:
        assert priority == case.explicit
    plan = plan_admission(case.needed, case.services, case.leases, case.gpu, priority, "t")

    needed = set(case.needed)
    leased = set().union(*case.leases.values())
    # A parked service (residual 0 here: no view can park) is an idle candidate too.
    others = [
        v
        for v in case.services.values()
        if v.state in RUNNING_STATES | {State.PARKED} and v.name not in needed
    ]
    idle = order([v for v in others if v.name not in leased])
    preemptable = order([v for v in others if v.name in leased and v.priority < priority])
    blockers = sorted(v.name for v in others if v.name in leased and v.priority >= priority)
    candidates = idle + preemptable

    # A parked service already holds its residual (0 here): it needs the rest.
    need = sum(
        max(case.services[n].vram_mib, case.services[n].learned_peak_mib)
        - (case.services[n].reservation if case.services[n].state is State.PARKED else 0)
        for n in needed
        if case.services[n].state not in RUNNING_STATES
    )
    assert plan.need_mib == need
    in_order = list(dict.fromkeys(case.needed))
    running = [n for n in in_order if case.services[n].state in RUNNING_STATES]
    assert plan.already_running == tuple(running)
    assert plan.to_start == tuple(n for n in in_order if n not in running)
    assert (
        plan.free_before_mib
        == oracle_free(case, set())
        == free_for_admission(case.services, case.gpu)
    )
    victims = [v.name for v in plan.victims]
    kinds = sorted({v.kind for v in plan.victims})
    event(f"fits={plan.fits} victims={'+'.join(kinds) or 'none'} blocked={bool(plan.blocked_by)}")

    if not plan.fits:
        # Never stop anything for nothing.
        assert victims == []
        assert need > oracle_free(case, set(candidates))
        assert list(plan.blocked_by) == blockers
        assert plan.free_after_mib == plan.free_before_mib
        return

    assert plan.blocked_by == ()
    assert need <= plan.free_after_mib
    assert plan.free_after_mib == oracle_free(case, set(victims))
    assert plan.free_after_mib == free_after_stopping(case.services, case.gpu, victims)
    # Victims are the shortest prefix of the eviction order that fits.
    assert victims == candidates[: len(victims)]
    if victims:
        assert need > oracle_free(case, set(victims[:-1]))
    else:
        assert need <= plan.free_before_mib
    for victim in plan.victims:
        view = case.services[victim.name]
        assert victim.name not in needed
        assert victim.frees_mib == view.reservation
        if victim.kind == "preempt":
            assert victim.name in leased
            assert view.priority < priority
        else:
            assert victim.name not in leased
