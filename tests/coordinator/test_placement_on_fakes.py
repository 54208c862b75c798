"""Placement on several (in-memory) GPUs: binpack, spread, pinning, spanning, recovery."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gpusm.domain.states import State
from gpusm.errors import InsufficientVram
from gpusm.ports import Placement
from tests.coordinator.fakes_helpers import World, fake_config, fake_service, open_world

FOREIGN_PID = 4242


@pytest.fixture
def make(tmp_path: Path) -> Iterator[Any]:
    opened: list[World] = []

    def make_world(services: dict[str, Any], **kwargs: Any) -> World:
        kwargs.setdefault("total_mib", [16384, 16384])
        world = open_world(fake_config(tmp_path, services, **kwargs))
        opened.append(world)
        return world

    yield make_world
    for world in opened:
        world.coordinator.close()


def devices_of(world: World, name: str) -> tuple[int, ...]:
    return world.slot(name).devices


def held_on(world: World, device: int, name: str) -> int:
    return world.gpus[device].holders().get(world.handle(name).pid or 0, 0)


def test_binpack_fills_the_device_that_already_holds_a_service(make: Any) -> None:
    world = make({"a": fake_service(4000, gpu=0), "b": fake_service(4000)})
    world.coordinator.enter_phase("pa", client="w")
    world.coordinator.enter_phase("pb", client="v")
    assert devices_of(world, "b") == (0,)
    assert held_on(world, 0, "b") == 4000
    started = world.last("b", "StartRequested")
    assert started["devices"] == [0]


def test_spread_takes_the_device_with_the_most_room(make: Any) -> None:
    world = make({"a": fake_service(4000, gpu=0), "b": fake_service(4000)}, placement="spread")
    world.coordinator.enter_phase("pa", client="w")
    world.coordinator.enter_phase("pb", client="v")
    assert devices_of(world, "b") == (1,)
    assert held_on(world, 1, "b") == 4000
    # The runtime was told where: CUDA_VISIBLE_DEVICES names device 1's UUID.
    placement = world.runtime.placements[world.handle("b").instance]
    assert (placement.indices, placement.visible_devices()) == ((1,), "MEM-GPU-1")


def test_a_foreign_hog_steers_a_new_service_to_the_other_device(make: Any) -> None:
    world = make({"b": fake_service(4000)})
    world.gpus[0].hog(FOREIGN_PID, 14000)
    world.coordinator.enter_phase("pb", client="w")
    assert devices_of(world, "b") == (1,)


def test_binpack_prefers_a_device_where_nothing_must_stop(make: Any) -> None:
    world = make({"idle": fake_service(14000, gpu=0), "b": fake_service(4000)})
    world.coordinator.enter_phase("pidle", client="w")
    world.coordinator.release("w")
    result = world.coordinator.enter_phase("pb", client="v")
    assert devices_of(world, "b") == (1,)
    assert result.stopped == ()
    assert world.state("idle") is State.HEALTHY


def test_evictions_happen_only_on_the_chosen_device(make: Any) -> None:
    world = make(
        {
            "x": fake_service(12000, gpu=0),
            "y": fake_service(14000, gpu=1),
            "z": fake_service(10000),
        },
        total_mib=[16384, 20000],
    )
    world.coordinator.enter_phase("px", client="w")
    world.coordinator.enter_phase("py", client="w")  # x stays warm, idle
    world.coordinator.release("w")
    result = world.coordinator.enter_phase("pz", client="v")
    world.settle()
    # Both devices need one stop; binpack takes the one left fuller: device 0.
    assert devices_of(world, "z") == (0,)
    assert [n.service for n in result.stopped] == ["x"]
    assert world.state("y") is State.HEALTHY


def test_a_pinned_service_waits_for_its_device_rather_than_spilling(make: Any) -> None:
    world = make({"pinned": fake_service(4000, gpu=0)})
    world.gpus[0].hog(FOREIGN_PID, 14000)
    plan = world.coordinator.plan_phase("ppinned", client="w")
    assert not plan.fits
    assert plan.devices == {"pinned": (0,)}
    assert plan.placement == ()  # nothing to choose: it may use device 0 only
    assert "2384 MiB free for admission" in plan.reason


def test_a_service_spanning_two_devices_holds_memory_on_both(make: Any) -> None:
    world = make({"tp": fake_service(6000, gpu_count=2), "c": fake_service(4000)})
    world.coordinator.enter_phase("ptp", client="w")
    assert devices_of(world, "tp") == (0, 1)
    assert (held_on(world, 0, "tp"), held_on(world, 1, "tp")) == (6000, 6000)
    assert world.runtime.placements[world.handle("tp").instance].visible_devices() == (
        "MEM-GPU-0,MEM-GPU-1"
    )
    world.coordinator.stop_service("tp")
    world.settle()
    stopped = world.last("tp", "Stopped")
    assert stopped["vram_reclaimed"] is True
    assert stopped["devices"] == [0, 1]
    assert world.gpus[0].holders() == world.gpus[1].holders() == {}


def test_a_spanning_service_is_placed_all_or_nothing(make: Any) -> None:
    world = make(
        {"tp": fake_service(6000, gpu_count=2), "busy": fake_service(14000, gpu=1)},
        total_mib=[16384, 16384, 16384],
    )
    world.coordinator.enter_phase("pbusy", client="holder")  # leased at equal priority
    plan = world.coordinator.plan_phase("ptp", client="w")
    # Devices 0 and 2 fit; 1 is held: it spans the two that fit.
    assert (plan.fits, plan.devices) == (True, {"tp": (0, 2)})
    world.gpus[2].hog(FOREIGN_PID, 14000)
    blocked = world.coordinator.plan_phase("ptp", client="w")
    assert not blocked.fits
    assert blocked.placement[-1] == (
        "tp needs 2 devices at once and only 1 fit: placed on none (all or nothing)"
    )
    with pytest.raises(InsufficientVram):
        world.coordinator.enter_phase("ptp", client="w", timeout=0)
    assert world.gpus[0].holders() == {}  # nothing started on device 0 alone
    assert world.types("tp") == []


def test_the_plan_names_the_chosen_device_and_why_not_the_others(make: Any) -> None:
    world = make({"a": fake_service(4000, gpu=0), "b": fake_service(4000)})
    world.gpus[1].hog(FOREIGN_PID, 14000)
    world.coordinator.enter_phase("pa", client="w")
    plan = world.coordinator.plan_phase("pb", client="v")
    assert plan.devices == {"b": (0,)}
    assert plan.placement[0].startswith("b on device 0: chosen (binpack): fits without")
    assert plan.placement[1].startswith("b on device 1: does not fit: cannot fit: need 4000")


def test_recovery_keeps_each_service_on_its_own_device(make: Any) -> None:
    world = make({"a": fake_service(4000, gpu=0), "b": fake_service(4000)}, placement="spread")
    world.coordinator.enter_phase("pa", client="w")
    world.coordinator.enter_phase("pb", client="v")
    assert devices_of(world, "b") == (1,)
    again = world.reopen()
    try:
        assert (again.state("a"), again.state("b")) == (State.HEALTHY, State.HEALTHY)
        assert (devices_of(again, "a"), devices_of(again, "b")) == ((0,), (1,))
        status = {s.name: s for s in again.coordinator.status().services}
        assert (status["b"].gpu, status["b"].devices, status["b"].used_mib) == (1, (1,), 4000)
        devices = {d.index: d for d in again.coordinator.status().devices}
        assert (devices[0].used_mib, devices[1].used_mib) == (4000, 4000)
    finally:
        again.coordinator.close()


def test_an_adopted_orphan_stays_on_the_device_where_it_holds_memory(make: Any) -> None:
    world = make({"b": fake_service(4000, gpu=[0, 1])}, placement="spread")
    world.runtime.start(world.config.services["b"], "orphan-1", Placement((1,)))
    assert world.gpus[0].holders() == {}
    again = world.reopen()
    try:
        assert again.state("b") is State.HEALTHY
        assert devices_of(again, "b") == (1,)
        assert again.last("b", "Adopted")["devices"] == [1]
    finally:
        again.coordinator.close()
