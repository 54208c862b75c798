"""Recovery of the parked tier, row by row (the parked rows of ``engine/reconcile.py``).

A first coordinator is run into the believed state (parked, or an interrupted park or
wake), dropped without closing, reality is changed, and a second one recovers over the
same store, fake machine and fake GPU.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from gpusm.domain import events as ev
from gpusm.domain.states import State
from gpusm.engine.lifecycle import join_background
from gpusm.engine.parking import begin_park, begin_wake
from tests.coordinator.fakes_helpers import World, fake_config, fake_service, open_world

VLLM = {"preset": "vllm", "residual_mib": 500, "settle_timeout_s": 5}


@pytest.fixture
def first(tmp_path: Path) -> Iterator[World]:
    services = {"a": fake_service(8000, park=VLLM), "b": fake_service(9000)}
    world = open_world(fake_config(tmp_path, services))
    yield world
    join_background(10.0)


@pytest.fixture
def recovered(first: World) -> Iterator[list[World]]:
    opened: list[World] = []
    yield opened
    for world in opened:
        world.coordinator.close()


def reopen(first: World, opened: list[World]) -> World:
    world = first.reopen()
    opened.append(world)
    return world


def park(first: World, then_stop_b: bool = True) -> None:
    """Park ``a`` (by entering b's phase), then stop b: room for a to wake."""
    first.coordinator.enter_phase("pa", client="w")
    first.coordinator.enter_phase("pb", client="w")
    first.settle()
    assert first.state("a") is State.PARKED
    if then_stop_b:
        first.coordinator.stop_service("b")
        first.settle()


def held(world: World) -> int:
    return world.gpu.holders().get(world.handle("a").pid or 0, 0)


def test_parked_alive_and_holding_its_residual_is_adopted_parked(
    first: World, recovered: list[World]
) -> None:
    park(first)
    world = reopen(first, recovered)
    assert world.state("a") is State.PARKED
    adopted = world.last("a", "Adopted")
    assert (adopted["held_mib"], adopted["reason"]) == (500, "alive and parked")
    assert world.slot("a").residual_mib == 500
    # It wakes as if nothing happened.
    world.coordinator.enter_phase("pa", client="w")
    world.settle()
    assert world.state("a") is State.HEALTHY
    assert held(world) == 8000


def test_parked_alive_but_holding_its_full_memory_is_treated_as_awake(
    first: World, recovered: list[World]
) -> None:
    park(first)
    first.gpu.allocate(first.handle("a").pid or 0, 7500)  # woken behind gpusm's back
    world = reopen(first, recovered)
    assert world.state("a") is State.HEALTHY
    woken = world.last("a", "Woken")
    assert woken["held_mib"] == 8000
    assert "more than 756 MiB: awake" in woken["reason"]


def test_parked_holding_more_and_unhealthy_is_stopped_and_crashed(
    first: World, recovered: list[World]
) -> None:
    park(first)
    handle = first.handle("a")
    first.gpu.allocate(handle.pid or 0, 7500)
    first.health.failing["a"] = "wedged"
    world = reopen(first, recovered)
    assert world.state("a") is State.STOPPED
    assert "unhealthy: wedged" in world.last("a", "Crashed")["reason"]
    assert not world.runtime.is_alive(handle)


def test_parked_and_dead_is_crashed(first: World, recovered: list[World]) -> None:
    park(first)
    first.runtime.kill("a")
    world = reopen(first, recovered)
    assert world.state("a") is State.STOPPED
    assert world.last("a", "Crashed")["reason"] == "found dead on recovery while parked"


def test_an_interrupted_park_is_finished(first: World, recovered: list[World]) -> None:
    first.coordinator.enter_phase("pa", client="w")
    with first.engine.cond:
        event = ev.ParkRequested(data={"reason": "t"})
        assert begin_park(first.engine, first.slot("a"), event)
    # 'crash' after the intent: the sleep was never sent
    world = reopen(first, recovered)
    assert world.state("a") is State.PARKED
    assert world.types("a")[-2:] == ["ParkRequested", "Parked"]
    assert held(world) == 500
    assert "finished the interrupted park (parked)" in str(world.recovery["corrections"])


def test_an_interrupted_park_that_does_not_free_becomes_a_stop(
    first: World, recovered: list[World]
) -> None:
    assert first.parking is not None
    first.parking.leak_mib["a"] = 4000
    first.coordinator.enter_phase("pa", client="w")
    with first.engine.cond:
        assert begin_park(first.engine, first.slot("a"), ev.ParkRequested(data={"reason": "t"}))
    world = reopen(first, recovered)
    assert world.state("a") is State.STOPPED
    assert world.types("a")[-3:] == ["ParkRequested", "ParkFailed", "Stopped"]


def test_an_interrupted_wake_is_finished(first: World, recovered: list[World]) -> None:
    park(first)
    with first.engine.cond:
        begin_wake(first.engine, first.slot("a"), {"reason": "t"})
    world = reopen(first, recovered)
    assert world.state("a") is State.HEALTHY
    assert world.types("a")[-2:] == ["WakeRequested", "Woken"]
    assert held(world) == 8000


def test_an_interrupted_wake_that_fails_stops_and_starts_afresh(
    first: World, recovered: list[World]
) -> None:
    park(first)
    assert first.parking is not None
    first.parking.failing["a"] = "wake"
    with first.engine.cond:
        begin_wake(first.engine, first.slot("a"), {"reason": "t"})
    world = reopen(first, recovered)
    assert world.state("a") is State.HEALTHY
    types = [t for t in world.types("a") if t != "VramObserved"]
    assert types[-6:] == [
        "WakeRequested",
        "WakeFailed",
        "Stopped",
        "StartRequested",
        "ProcessLaunched",
        "HealthPassed",
    ]


def test_an_interrupted_wake_of_a_dead_process_is_crashed(
    first: World, recovered: list[World]
) -> None:
    park(first)
    with first.engine.cond:
        begin_wake(first.engine, first.slot("a"), {"reason": "t"})
    first.runtime.kill("a")
    world = reopen(first, recovered)
    assert world.state("a") is State.STOPPED
    assert world.last("a", "Crashed")["reason"] == "found dead on recovery while waking"


def test_a_parked_service_whose_config_lost_park_is_stopped(
    first: World, recovered: list[World], tmp_path: Path
) -> None:
    park(first)
    services = {"a": fake_service(8000), "b": fake_service(9000)}
    world = first.reopen(fake_config(tmp_path, services))
    recovered.append(world)
    assert world.state("a") is State.STOPPED
    assert world.types("a")[-2:] == ["DrainRequested", "Stopped"]
