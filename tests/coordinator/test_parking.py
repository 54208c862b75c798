"""The parked tier on fakes: park instead of stop, verify on the GPU, wake, fall back.

Every service here lives in a :class:`~tests.coordinator.fakes_helpers.World`: fake
processes that hold fake VRAM, and :class:`FakeParking` answering their park and wake
steps by moving that VRAM, so each outcome (a park that leaks, a wake that fails, a
parked process that dies) is set up exactly.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gpusm.domain import events as ev
from gpusm.domain.states import State
from gpusm.engine.audit import explain_stops
from gpusm.engine.parking import begin_park, begin_wake, finish_park
from gpusm.errors import GpusmError, IllegalTransition, UnknownName
from tests.coordinator.fakes_helpers import World, fake_config, fake_service, open_world

VLLM = {"preset": "vllm", "residual_mib": 500, "settle_timeout_s": 5}


@pytest.fixture
def make(tmp_path: Path) -> Iterator[Any]:
    opened: list[World] = []

    def make_world(services: dict[str, Any], **kwargs: Any) -> World:
        world = open_world(fake_config(tmp_path, services, **kwargs))
        opened.append(world)
        return world

    yield make_world
    for world in opened:
        world.coordinator.close()


def since(world: World, name: str, first: str) -> list[str]:
    """``name``'s event types from its last ``first`` on (measurements left out)."""
    types = [t for t in world.types(name) if t != "VramObserved"]
    return types[len(types) - 1 - types[::-1].index(first) :]


def held(world: World, name: str) -> int:
    return world.gpu.holders().get(world.handle(name).pid or 0, 0)


def test_an_idle_parkable_service_is_parked_not_stopped(make: Any) -> None:
    world = make({"a": fake_service(8000, park=VLLM), "b": fake_service(9000)})
    world.coordinator.enter_phase("pa", client="w")
    pid = world.handle("a").pid
    result = world.coordinator.enter_phase("pb", client="w")
    world.settle()
    assert [(n.service, n.action) for n in result.stopped] == [("a", "park")]
    assert world.state("a") is State.PARKED
    assert world.handle("a").pid == pid  # the same process, still alive
    assert held(world, "a") == 500
    assert world.types("a")[-2:] == ["ParkRequested", "Parked"]
    parked = world.last("a", "Parked")
    assert (parked["held_mib"], parked["residual_mib"], parked["tolerance_mib"]) == (500, 500, 256)
    assert "parked (keeps 500 MiB)" in world.last("a", "ParkRequested")["reason"]
    assert world.gpu.ooms == []


def test_entering_its_phase_wakes_a_parked_service(make: Any) -> None:
    world = make({"a": fake_service(8000, park=VLLM), "b": fake_service(9000)})
    world.coordinator.enter_phase("pa", client="w")
    world.coordinator.enter_phase("pb", client="w")
    world.settle()
    result = world.coordinator.enter_phase("pa", client="w")
    world.settle()
    assert world.state("a") is State.HEALTHY
    assert held(world, "a") == 8000
    assert world.types("a")[-2:] == ["WakeRequested", "Woken"]
    assert "a" in result.started
    # Waking needed its full reservation less the residual it held: b had to go.
    assert [(n.service, n.action) for n in result.stopped] == [("b", "stop")]
    assert world.types("a").count("StartRequested") == 1  # one cold start, ever
    assert world.parking is not None
    assert world.parking.calls == [("a", "sleep"), ("a", "wake")]
    assert world.gpu.ooms == []


def test_a_park_that_keeps_its_memory_fails_and_becomes_a_verified_stop(make: Any) -> None:
    world = make({"a": fake_service(8000, park=VLLM), "b": fake_service(9000)})
    assert world.parking is not None
    world.parking.leak_mib["a"] = 4000
    world.coordinator.enter_phase("pa", client="w")
    world.coordinator.enter_phase("pb", client="w")
    world.settle()
    assert world.state("a") is State.STOPPED
    assert world.types("a")[-3:] == ["ParkRequested", "ParkFailed", "Stopped"]
    failed = world.last("a", "ParkFailed")
    assert failed["held_mib"] == 4500
    assert "still holding 4500 MiB" in failed["reason"]
    assert "residual 500 MiB + tolerance 256 MiB" in failed["reason"]
    assert world.last("a", "Stopped")["vram_reclaimed"] is True
    assert world.state("b") is State.HEALTHY
    assert world.gpu.ooms == []


def test_a_sleep_step_that_fails_stops_the_service(make: Any) -> None:
    world = make({"a": fake_service(8000, park=VLLM), "b": fake_service(9000)})
    assert world.parking is not None
    world.parking.failing["a"] = "sleep"
    world.coordinator.enter_phase("pa", client="w")
    world.coordinator.enter_phase("pb", client="w")
    world.settle()
    assert world.types("a")[-3:] == ["ParkRequested", "ParkFailed", "Stopped"]
    assert "sleep: status 500" in world.last("a", "ParkFailed")["reason"]
    assert world.state("b") is State.HEALTHY


def test_a_wake_that_fails_falls_back_to_a_fresh_start(make: Any) -> None:
    world = make({"a": fake_service(8000, park=VLLM), "b": fake_service(9000)})
    assert world.parking is not None
    world.coordinator.enter_phase("pa", client="w")
    world.coordinator.enter_phase("pb", client="w")
    world.settle()
    parked_pid = world.handle("a").pid
    world.parking.failing["a"] = "wake"
    world.coordinator.enter_phase("pa", client="w")
    world.settle()
    assert world.state("a") is State.HEALTHY
    assert since(world, "a", "WakeRequested") == [
        "WakeRequested",
        "WakeFailed",
        "Stopped",
        "StartRequested",
        "ProcessLaunched",
        "HealthPassed",
    ]
    assert "wake: status 500" in world.last("a", "WakeFailed")["reason"]
    assert "wake failed" in world.last("a", "StartRequested")["reason"]
    assert world.handle("a").pid != parked_pid
    assert held(world, "a") == 8000
    assert world.gpu.ooms == []


def park_a(world: World) -> None:
    """Run ``a``, then park it by entering ``b``'s phase."""
    world.coordinator.enter_phase("pa", client="w")
    world.coordinator.enter_phase("pb", client="w")
    world.settle()
    assert world.state("a") is State.PARKED


def test_idle_ttl_parks_first_then_stops_one_ttl_later(make: Any) -> None:
    world = make({"a": fake_service(4000, park=VLLM, idle_ttl_s=60)})
    world.coordinator.enter_phase("pa", client="w")
    world.coordinator.release("w")
    world.clock.advance(61)
    world.tick()
    assert world.state("a") is State.PARKED
    assert "idle for 60s" in world.last("a", "ParkRequested")["reason"]
    world.clock.advance(30)
    world.tick()
    assert world.state("a") is State.PARKED  # parked for less than a TTL
    world.clock.advance(31)
    world.tick()
    assert world.state("a") is State.STOPPED
    assert world.types("a")[-2:] == ["DrainRequested", "Stopped"]


def test_a_parked_process_that_dies_is_recorded_crashed(make: Any) -> None:
    world = make({"a": fake_service(8000, park=VLLM), "b": fake_service(9000)})
    park_a(world)
    world.runtime.kill("a")
    world.tick()
    assert world.state("a") is State.STOPPED
    assert world.last("a", "Crashed")["reason"] == "process exited while parked"


def test_a_preempted_parkable_service_is_drained_of_its_holder_then_parked(make: Any) -> None:
    # drain_timeout_s 0: the holder is given no time (the clock here only moves by hand).
    low = fake_service(8000, priority=1, park=VLLM, drain_timeout_s=0)
    world = make({"a": low, "b": fake_service(9000, priority=5)})
    world.coordinator.enter_phase("pa", client="low")
    result = world.coordinator.enter_phase("pb", client="high")
    world.settle()
    assert [(n.service, n.kind, n.action) for n in result.stopped] == [("a", "preempt", "park")]
    assert world.state("a") is State.PARKED
    revoked = world.store.read()
    assert any(e.type == "LeaseRevoked" and e.data["client"] == "low" for e in revoked)
    assert world.last("a", "ParkRequested")["kind"] == "preempt"


def test_a_parked_service_can_be_stopped(make: Any) -> None:
    world = make({"a": fake_service(8000, park=VLLM), "b": fake_service(9000)})
    park_a(world)
    note = world.coordinator.stop_service("a", by="ops")
    world.settle()
    assert note.service == "a"
    assert world.state("a") is State.STOPPED
    assert world.types("a")[-2:] == ["DrainRequested", "Stopped"]
    assert world.last("a", "Stopped")["vram_reclaimed"] is True


def test_release_all_stops_parked_services_too(make: Any) -> None:
    world = make({"a": fake_service(8000, park=VLLM), "b": fake_service(9000)})
    park_a(world)
    world.coordinator.release_all(by="ops")
    world.settle()
    assert (world.state("a"), world.state("b")) == (State.STOPPED, State.STOPPED)


def test_a_parked_residual_is_reserved_and_the_parked_service_stopped_for_room(
    make: Any,
) -> None:
    # 16384 MiB: a parks to 500; c needs 16000, which only fits once a is gone.
    world = make(
        {"a": fake_service(8000, park=VLLM), "b": fake_service(9000), "c": fake_service(16000)}
    )
    park_a(world)
    result = world.coordinator.enter_phase("pc", client="w")
    world.settle()
    assert {(n.service, n.action) for n in result.stopped} == {("a", "stop"), ("b", "stop")}
    assert world.state("a") is State.STOPPED
    assert world.state("c") is State.HEALTHY


def test_parks_become_stops_when_parking_alone_is_not_enough(make: Any) -> None:
    big_residual = {**VLLM, "residual_mib": 3000}
    world = make(
        {"a": fake_service(8000, park=big_residual), "c": fake_service(14000)},
        total_mib=16384,
    )
    world.coordinator.enter_phase("pa", client="w")
    result = world.coordinator.enter_phase("pc", client="w")
    world.settle()
    # Parked, a would keep 3000 MiB: 13384 free < 14000. So it is stopped.
    assert [(n.service, n.action) for n in result.stopped] == [("a", "stop")]
    assert world.types("a")[-2:] == ["Evicted", "Stopped"]


def test_signal_steps_park_and_wake(make: Any) -> None:
    steps = {"sleep": [{"signal": "SIGUSR1"}], "wake": [{"signal": "SIGUSR2"}], "residual_mib": 100}
    world = make({"a": fake_service(8000, park=steps), "b": fake_service(9000)})
    park_a(world)
    assert held(world, "a") == 100
    world.coordinator.enter_phase("pa", client="w")
    world.settle()
    assert world.state("a") is State.HEALTHY
    assert [name for _, name in world.runtime.signals] == ["SIGUSR1", "SIGUSR2"]
    assert held(world, "a") == 8000


def test_warmup_steps_run_after_the_wake_and_their_failure_fails_the_wake(make: Any) -> None:
    warm = {**VLLM, "warmup": [{"http": {"url": "http://127.0.0.1:19000/v1/completions"}}]}
    world = make({"a": fake_service(8000, park=warm), "b": fake_service(9000)})
    assert world.parking is not None
    park_a(world)
    world.parking.failing["a"] = "warmup"
    world.coordinator.enter_phase("pa", client="w")
    world.settle()
    assert world.parking.calls == [("a", "sleep"), ("a", "wake"), ("a", "warmup")]
    assert "warmup: status 500" in world.last("a", "WakeFailed")["reason"]
    assert world.state("a") is State.HEALTHY  # started afresh


def test_without_a_service_control_the_park_fails_and_stops(make: Any) -> None:
    world = make({"a": fake_service(8000, park=VLLM), "b": fake_service(9000)})
    world.engine.control = None
    world.coordinator.enter_phase("pa", client="w")
    world.coordinator.enter_phase("pb", client="w")
    world.settle()
    assert "no service control" in world.last("a", "ParkFailed")["reason"]
    assert world.state("a") is State.STOPPED


@pytest.mark.parametrize("stage", ["parking", "waking"])
def test_a_park_or_wake_whose_owner_gave_up_is_turned_into_a_stop(make: Any, stage: str) -> None:
    world = make({"a": fake_service(8000, park=VLLM), "b": fake_service(9000)})
    world.coordinator.enter_phase("pa", client="w")
    slot = world.slot("a")
    with world.engine.cond:
        if stage == "parking":
            assert begin_park(world.engine, slot, ev.ParkRequested(data={"reason": "t"}))
        else:
            world.coordinator.release("w")
            assert begin_park(world.engine, slot, ev.ParkRequested(data={"reason": "t"}))
    if stage == "waking":
        finish_park(world.engine, slot)
        with world.engine.cond:
            begin_wake(world.engine, slot, {"reason": "t"})
    with world.engine.cond:
        slot.release(error="its owner failed")  # the thread that owned it died
    world.tick()
    assert world.state("a") is State.STOPPED
    failed = "ParkFailed" if stage == "parking" else "WakeFailed"
    assert world.types("a")[-2:] == [failed, "Stopped"]
    assert world.last("a", failed)["reason"] == f"{stage} abandoned: its owner failed"
    assert world.last("a", "Stopped")["vram_reclaimed"] is True


def test_a_service_can_be_parked_by_hand_and_its_lease_ends(make: Any) -> None:
    world = make({"a": fake_service(8000, park=VLLM)})
    world.coordinator.enter_phase("pa", client="w")
    note = world.coordinator.park_service("a", by="ops")
    assert (note.service, note.action) == ("a", "park")
    assert world.state("a") is State.PARKED
    assert world.last("a", "ParkRequested")["by"] == "ops"
    assert world.coordinator.status().leases == {}
    again = world.coordinator.park_service("a", by="ops")
    assert (again.action, again.reason) == ("park", "already parked")


def test_a_park_by_hand_that_fails_says_it_stopped_the_service(make: Any) -> None:
    world = make({"a": fake_service(8000, park=VLLM)})
    assert world.parking is not None
    world.parking.leak_mib["a"] = 4000
    world.coordinator.enter_phase("pa", client="w")
    note = world.coordinator.park_service("a")
    world.settle()
    assert note.action == "stop"
    assert "still holding 4500 MiB" in note.reason
    assert world.state("a") is State.STOPPED


def test_parking_by_hand_refuses_what_cannot_park(make: Any) -> None:
    world = make({"a": fake_service(8000, park=VLLM), "plain": fake_service(100)})
    with pytest.raises(GpusmError, match="'plain' cannot park: its config has no park:"):
        world.coordinator.park_service("plain")
    with pytest.raises(IllegalTransition, match="cannot 'request_park' while stopped"):
        world.coordinator.park_service("a")
    with pytest.raises(UnknownName):
        world.coordinator.park_service("nope")


def test_status_shows_a_parked_service_reserving_its_residual(make: Any) -> None:
    world = make({"a": fake_service(8000, park=VLLM), "b": fake_service(9000)})
    park_a(world)
    status = {s.name: s for s in world.coordinator.status().services}
    assert (status["a"].state, status["a"].reservation_mib) == ("parked", 500)
    assert (status["a"].residual_mib, status["a"].used_mib) == (500, 500)
    assert (status["b"].residual_mib, status["b"].reservation_mib) == (None, 9000)


def test_a_release_phase_parks_what_can_park_and_stops_the_rest(make: Any) -> None:
    world = make(
        {"a": fake_service(8000, park=VLLM), "b": fake_service(4000)},
        phases={"both": ["a", "b"], "crawl": {"services": [], "release": True}},
    )
    world.coordinator.enter_phase("both", client="w")
    result = world.coordinator.enter_phase("crawl", client="w")
    world.settle()
    assert sorted((n.service, n.kind, n.action) for n in result.stopped) == [
        ("a", "release", "park"),
        ("b", "release", "stop"),
    ]
    assert (world.state("a"), world.state("b")) == (State.PARKED, State.STOPPED)
    assert "releases the GPU" in world.last("a", "ParkRequested")["reason"]


def test_the_audit_explains_parks_and_stops_after_a_failed_park(make: Any) -> None:
    world = make({"a": fake_service(8000, park=VLLM), "b": fake_service(9000)})
    park_a(world)
    assert world.parking is not None
    world.parking.leak_mib["a"] = 4000
    world.coordinator.enter_phase("pa", client="w")  # wakes a, stops b
    world.coordinator.enter_phase("pb", client="w")  # a's park keeps 4500: a stop
    world.settle()
    told = [e.summary() for e in explain_stops(world.store, "a")]
    assert len(told) == 2
    assert " parked after ParkRequested because idle, priority 0, parked (keeps 500" in told[0]
    assert " stopped after ParkFailed because still holding 4500 MiB" in told[1]
