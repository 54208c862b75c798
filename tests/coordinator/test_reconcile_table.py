"""Recovery, row by row of the table in ``gpusm/reconcile.py``, on fakes.

Each test runs a first coordinator into the believed state, drops it without closing
(a crash), changes reality, then recovers a second coordinator over the same event
store, the same fake machine (``MemoryRuntime.reopen``) and the same in-memory GPU.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gpusm.config import Config
from gpusm.domain import events as ev
from gpusm.domain.events import COORDINATOR_STREAM
from gpusm.domain.states import State
from gpusm.engine.lifecycle import begin_drain, begin_start, join_background
from gpusm.ports import EventQuery
from tests.coordinator.fakes_helpers import World, fake_config, fake_service, open_world

Make = Callable[..., World]
FOREIGN_PID = 4242


@pytest.fixture
def config(tmp_path: Path) -> Config:
    services = {"a": fake_service(4096), "b": fake_service(2048), "old": fake_service(1024)}
    return fake_config(tmp_path, services)


@pytest.fixture
def first(config: Config) -> Iterator[World]:
    """The coordinator that will 'crash'; it is never closed."""
    yield open_world(config)
    join_background(10.0)


@pytest.fixture
def worlds() -> Iterator[list[World]]:
    """Recovered coordinators, closed at the end."""
    opened: list[World] = []
    yield opened
    for world in opened:
        world.coordinator.close()


@pytest.fixture
def recover_(first: World, worlds: list[World]) -> Callable[..., World]:
    """Crash ``first`` and recover a new coordinator on the same world."""

    def reopen(config: Config | None = None) -> World:
        world = first.reopen(config)
        worlds.append(world)
        return world

    return reopen


Recover = Callable[..., World]


def service_events_since(world: World, seq: int) -> list[tuple[str, str]]:
    events = world.store.read(EventQuery(after_seq=seq))
    return [(e.stream, e.type) for e in events if e.stream != COORDINATOR_STREAM]


def corrections(world: World) -> list[str]:
    recovered = world.store.read(EventQuery(types=["Recovered"], newest_first=True, limit=1))
    assert recovered, "recovery records a Recovered event"
    return list(recovered[0].data["corrections"])


def launch_orphan(first: World, name: str, instance: str = "orphan-1") -> Any:
    """A live instance carrying our marker that the log knows nothing about."""
    return first.runtime.start(first.config.services[name], instance)


# ---------------------------------------------------------------- stopped
def test_stopped_and_nothing_running_needs_no_event(first: World, recover_: Recover) -> None:
    first.coordinator.enter_phase("pa", client="w")
    first.coordinator.stop_service("a")
    seq = first.last_seq()
    world = recover_()
    assert service_events_since(world, seq) == []
    assert corrections(world) == []
    assert world.state("a") is State.STOPPED
    assert world.slot("a").handle is None, "a stopped service has no instance"
    assert next(s for s in world.coordinator.status().services if s.name == "a").pid is None


def test_stopped_with_a_healthy_orphan_of_ours_adopts_it(first: World, recover_: Recover) -> None:
    orphan = launch_orphan(first, "a")
    world = recover_()
    assert world.state("a") is State.HEALTHY
    assert world.handle("a") == orphan
    adopted = world.last("a", "Adopted")
    assert adopted["pid"] == orphan.pid
    assert adopted["instance"] == "orphan-1"
    assert "a: adopted orphan orphan-1" in corrections(world)
    assert world.gpu.holders() == {orphan.pid: 4096}


def test_stopped_with_an_unhealthy_orphan_of_ours_reaps_it(first: World, recover_: Recover) -> None:
    orphan = launch_orphan(first, "a")
    first.health.failing["a"] = "status 500"
    world = recover_()
    assert world.state("a") is State.STOPPED
    assert not world.runtime.is_alive(orphan)
    assert world.types("a") == ["OrphanReaped"]
    assert world.last("a", "OrphanReaped")["pid"] == orphan.pid
    assert world.gpu.holders() == {}


def test_stopped_while_the_instance_it_last_launched_lives_adopts_that_instance(
    first: World, recover_: Recover
) -> None:
    first.coordinator.enter_phase("pa", client="w")
    handle = first.handle("a")
    # The log says the service is down (say the monitor misread it) while it still runs.
    with first.engine.cond:
        first.slot("a").handle = None
        first.engine.record(first.slot("a"), ev.Crashed(data={"reason": "misread as dead"}))
    world = recover_()
    assert world.state("a") is State.HEALTHY
    assert world.handle("a") == handle
    assert world.types("a")[-1] == "Adopted"
    assert [h.instance for h in world.runtime.live()] == [handle.instance]


# ---------------------------------------------------------------- starting
def test_starting_without_a_pid_records_start_failed(first: World, recover_: Recover) -> None:
    with first.engine.cond:  # crash right after StartRequested was committed
        begin_start(first.engine, first.slot("a"), {"reason": "test", "by": "w"})
    world = recover_()
    assert world.state("a") is State.STOPPED
    assert world.types("a") == ["StartRequested", "StartFailed"]
    assert "before the launch was recorded" in world.last("a", "StartFailed")["reason"]
    assert world.runtime.live() == []


def test_starting_without_a_pid_adopts_the_healthy_instance_it_launched(
    first: World, recover_: Recover
) -> None:
    with first.engine.cond:
        begin_start(first.engine, first.slot("a"), {"reason": "test", "by": "w"})
    orphan = launch_orphan(first, "a")  # crash after the spawn, before ProcessLaunched
    world = recover_()
    assert world.state("a") is State.HEALTHY
    assert world.handle("a") == orphan
    assert world.types("a") == ["StartRequested", "Adopted"]


def launched(first: World, name: str) -> Any:
    """Commit StartRequested, spawn, commit ProcessLaunched; then 'crash' before health."""
    slot = first.slot(name)
    with first.engine.cond:
        begin_start(first.engine, slot, {"reason": "test", "by": "w"})
    handle = first.runtime.start(slot.config, "launched-1")
    with first.engine.cond:
        slot.handle = handle
        first.engine.record(slot, ev.ProcessLaunched(data=handle.as_data()))
    return handle


def test_starting_with_a_live_pid_resumes_the_health_wait_until_healthy(
    first: World, recover_: Recover
) -> None:
    handle = launched(first, "a")
    first.health.ready_after["a"] = 3  # still loading when the new coordinator looks
    world = recover_()
    assert world.state("a") is State.HEALTHY
    assert world.handle("a") == handle
    assert world.types("a") == ["StartRequested", "ProcessLaunched", "HealthPassed"]
    assert world.last("a", "HealthPassed")["reason"] == "health wait resumed on recovery"
    assert world.health.probes["a"] == 4


def test_starting_with_a_live_pid_that_never_gets_healthy_fails_by_the_original_deadline(
    first: World, recover_: Recover
) -> None:
    handle = launched(first, "a")
    first.health.failing["a"] = "status 503"
    first.clock.advance(8)  # 8 of the 10 s start deadline passed before the crash
    began = first.clock.monotonic()
    world = recover_()
    assert world.state("a") is State.STOPPED
    assert world.clock.monotonic() - began == pytest.approx(2.0, abs=0.15)
    assert "status 503" in world.last("a", "StartFailed")["reason"]
    assert not world.runtime.is_alive(handle)


def test_starting_with_a_dead_pid_records_crashed(first: World, recover_: Recover) -> None:
    launched(first, "a")
    first.runtime.kill("a")
    world = recover_()
    assert world.state("a") is State.STOPPED
    assert world.last("a", "Crashed")["reason"] == "found dead on recovery while starting"


# ---------------------------------------------------------------- healthy
def test_healthy_alive_and_healthy_is_adopted(first: World, recover_: Recover) -> None:
    first.coordinator.enter_phase("pa", client="w")
    handle = first.handle("a")
    world = recover_()
    assert world.state("a") is State.HEALTHY
    assert world.handle("a") == handle
    adopted = world.last("a", "Adopted")
    assert (adopted["pid"], adopted["reason"]) == (handle.pid, "alive and healthy")
    status = next(s for s in world.coordinator.status().services if s.name == "a")
    assert (status.pid, status.used_mib) == (handle.pid, 4096)


def test_healthy_but_dead_is_recorded_crashed(first: World, recover_: Recover) -> None:
    first.coordinator.enter_phase("pa", client="w")
    first.runtime.kill("a")
    world = recover_()
    assert world.state("a") is State.STOPPED
    assert world.slot("a").handle is None
    crashed = world.last("a", "Crashed")
    assert crashed["reason"] == "found dead on recovery (or its pid was reused)"
    assert crashed["free_mib"] == 16384


def test_healthy_alive_but_failing_health_is_stopped_and_recorded_crashed(
    first: World, recover_: Recover
) -> None:
    first.coordinator.enter_phase("pa", client="w")
    handle = first.handle("a")
    first.health.failing["a"] = "status 500"
    world = recover_()
    assert world.state("a") is State.STOPPED
    assert not world.runtime.is_alive(handle)
    assert world.gpu.holders() == {}
    reason = world.last("a", "Crashed")["reason"]
    assert reason.startswith("alive but unhealthy on recovery")
    assert "status 500" in reason


def test_a_reused_pid_whose_create_time_differs_is_not_ours(
    first: World, recover_: Recover
) -> None:
    first.coordinator.enter_phase("pa", client="w")
    first.clock.advance(1)
    first.coordinator.enter_phase("pb", client="w2")
    a, b = first.handle("a"), first.handle("b")
    assert a.create_time != b.create_time
    first.runtime.kill("a")
    # a died and its pid now belongs to another process (here: b's), created later.
    reused = {**a.as_data(), "pid": b.pid, "reason": "test"}
    with first.engine.cond:
        first.engine.record(first.slot("a"), ev.Adopted(data=reused))
    world = recover_()
    assert world.state("a") is State.STOPPED
    assert "pid was reused" in world.last("a", "Crashed")["reason"]
    assert world.state("b") is State.HEALTHY
    assert world.runtime.is_alive(b), "the process that now has the pid is left alone"
    assert world.gpu.holders() == {b.pid: 2048}


# ---------------------------------------------------------------- draining
def drain(first: World, name: str) -> None:
    """Commit DrainRequested and 'crash' before the signal."""
    with first.engine.cond:
        assert begin_drain(first.engine, first.slot(name), ev.DrainRequested(data={"reason": "t"}))


def test_draining_and_alive_finishes_the_stop(first: World, recover_: Recover) -> None:
    first.coordinator.enter_phase("pa", client="w")
    handle = first.handle("a")
    drain(first, "a")
    world = recover_()
    assert world.state("a") is State.STOPPED
    assert not world.runtime.is_alive(handle)
    stopped = world.last("a", "Stopped")
    assert (stopped["already_dead"], stopped["vram_reclaimed"]) == (False, True)
    assert world.gpu.holders() == {}
    assert "a: finished the interrupted stop" in corrections(world)


def test_draining_and_dead_records_stopped(first: World, recover_: Recover) -> None:
    first.coordinator.enter_phase("pa", client="w")
    drain(first, "a")
    first.runtime.kill("a")  # crash after the signal, before Stopped was committed
    world = recover_()
    assert world.state("a") is State.STOPPED
    assert world.types("a")[-2:] == ["DrainRequested", "Stopped"]
    assert world.last("a", "Stopped")["already_dead"] is True


# ---------------------------------------------------------------- anything else
def test_an_orphan_of_a_service_no_longer_configured_is_reaped_on_the_coordinator_stream(
    first: World, recover_: Recover, tmp_path: Path
) -> None:
    first.coordinator.enter_phase("pold", client="w")
    old = first.handle("old")
    smaller = fake_config(tmp_path, {"a": fake_service(4096), "b": fake_service(2048)})
    world = recover_(smaller)
    assert not world.runtime.is_alive(old)
    reaped = world.store.read(EventQuery(stream=COORDINATOR_STREAM, types=["OrphanReaped"]))
    assert [(e.data["service"], e.data["pid"]) for e in reaped] == [("old", old.pid)]
    assert world.gpu.holders() == {}


def test_a_foreign_process_holding_memory_is_never_touched_and_counts_as_foreign(
    first: World, recover_: Recover
) -> None:
    first.coordinator.enter_phase("pa", client="w")
    first.gpu.hog(FOREIGN_PID, 3000)
    world = recover_()
    assert world.gpu.holders() == {FOREIGN_PID: 3000, world.handle("a").pid: 4096}
    device = world.coordinator.status().devices[0]
    assert (device.foreign_mib, device.used_mib) == (3000, 7096)
    assert device.free_for_admission_mib == 16384 - 4096 - 3000
    assert all(h.pid != FOREIGN_PID for h, _ in world.runtime.stopped)


def test_recovery_records_a_recovered_event_listing_every_correction(
    first: World, recover_: Recover
) -> None:
    first.coordinator.enter_phase("pa", client="w")
    first.coordinator.enter_phase("pb", client="w2")
    first.runtime.kill("a")
    world = recover_()
    found = corrections(world)
    assert found == ["a: found dead on recovery (or its pid was reused)", "b: adopted"]
    assert world.recovery["corrections"] == found
    recovered = world.last(COORDINATOR_STREAM, "Recovered")
    assert recovered["free_mib"] == 16384 - 2048
