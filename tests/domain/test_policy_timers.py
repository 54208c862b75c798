"""Idle TTL, restart backoff and the restart budget: pure functions of the times given."""

from __future__ import annotations

import pytest

from gpusm.domain.policy import ServiceView, idle_expired, restart_delay, start_budget_left
from gpusm.domain.states import State

S = State


def svc(
    name: str, state: State = S.HEALTHY, *, used: float = 0.0, ttl: float | None = 60.0
) -> ServiceView:
    return ServiceView(name, state, 1000, 0, 0, used, ttl)


@pytest.mark.parametrize(
    ("view", "leased", "now", "expired"),
    [
        pytest.param(svc("a", used=100.0), False, 160.0, True, id="exactly-at-ttl-expires"),
        pytest.param(svc("a", used=100.0), False, 159.9, False, id="just-before-ttl-stays"),
        pytest.param(svc("a", used=100.0), False, 1e6, True, id="long-after-expires"),
        pytest.param(svc("a", used=0.0, ttl=None), False, 1e9, False, id="no-ttl-never-expires"),
        pytest.param(svc("a", used=0.0), True, 1e9, False, id="leased-never-expires"),
        pytest.param(svc("a", S.STARTING), False, 1e9, False, id="starting-is-left-alone"),
        pytest.param(svc("a", S.DRAINING), False, 1e9, False, id="draining-already-stopping"),
        pytest.param(svc("a", S.STOPPED), False, 1e9, False, id="stopped-has-nothing-to-stop"),
    ],
)
def test_idle_ttl_expires_only_unleased_healthy_services_past_their_ttl(
    view: ServiceView, leased: bool, now: float, expired: bool
) -> None:
    leases = {"w1": frozenset({view.name})} if leased else {}
    assert idle_expired({view.name: view}, leases, now) == ([view.name] if expired else [])


def test_idle_ttl_lists_soonest_expired_first_then_by_name() -> None:
    services = {
        "late": svc("late", used=50.0, ttl=10.0),  # expired at 60
        "early": svc("early", used=0.0, ttl=30.0),  # expired at 30
        "b-tie": svc("b-tie", used=20.0, ttl=10.0),  # expired at 30
        "fresh": svc("fresh", used=90.0, ttl=30.0),  # expires at 120
        "leased": svc("leased", used=0.0, ttl=1.0),
    }
    leases = {"w2": frozenset({"leased"})}
    assert idle_expired(services, leases, 100.0) == ["b-tie", "early", "late"]


@pytest.mark.parametrize(
    ("attempt", "initial", "cap", "expected"),
    [
        pytest.param(1, 1.0, 60.0, 1.0, id="first-restart-waits-initial"),
        pytest.param(2, 1.0, 60.0, 2.0, id="doubles"),
        pytest.param(3, 1.0, 60.0, 4.0, id="doubles-again"),
        pytest.param(6, 1.0, 60.0, 32.0, id="below-cap"),
        pytest.param(7, 1.0, 60.0, 60.0, id="capped"),
        pytest.param(10**9, 1.0, 60.0, 60.0, id="huge-attempt-does-not-overflow"),
        pytest.param(3, 0.5, 60.0, 2.0, id="scales-with-initial"),
        pytest.param(1, 5.0, 2.0, 2.0, id="cap-below-initial-wins"),
        pytest.param(4, 0.0, 60.0, 0.0, id="zero-initial-means-no-wait"),
    ],
)
def test_restart_delay_doubles_from_initial_up_to_the_cap(
    attempt: int, initial: float, cap: float, expected: float
) -> None:
    assert restart_delay(attempt, initial, cap) == expected


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param((0, 1.0, 60.0), "attempt must be >= 1, got 0", id="attempt-zero"),
        pytest.param((1, -1.0, 60.0), "initial_s must be >= 0", id="negative-initial"),
        pytest.param((1, 1.0, -2.0), "max_s must be >= 0", id="negative-cap"),
    ],
)
def test_restart_delay_rejects_nonsense_with_a_clear_message(
    args: tuple[int, float, float], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        restart_delay(*args)


@pytest.mark.parametrize(
    ("starts", "now", "allowed"),
    [
        pytest.param([], 1000.0, True, id="never-started"),
        pytest.param([900.0, 950.0], 1000.0, True, id="below-max"),
        pytest.param([900.0, 950.0, 990.0], 1000.0, False, id="max-reached-in-window"),
        pytest.param([400.0, 950.0, 990.0], 1000.0, True, id="old-start-left-the-window"),
        pytest.param([500.0, 950.0, 990.0], 1000.0, True, id="exactly-window-old-is-out"),
        pytest.param([500.1, 950.0, 990.0], 1000.0, False, id="just-inside-window-counts"),
        pytest.param([1001.0, 1002.0, 1003.0], 1000.0, False, id="future-starts-count"),
    ],
)
def test_start_budget_allows_fewer_than_max_starts_per_window(
    starts: list[float], now: float, allowed: bool
) -> None:
    assert start_budget_left(starts, now, max_starts=3, window_s=500.0) is allowed
