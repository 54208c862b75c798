"""The liveness monitor on fakes: crashes, restarts with backoff, give-up, health, TTL, growth.

Every test drives a manual clock and calls ``Monitor.tick`` itself; nothing sleeps.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from gpusm.clock import ManualClock
from gpusm.domain.events import NewEvent, RecordedEvent
from gpusm.domain.states import State
from gpusm.engine.lifecycle import begin_start, run_start
from gpusm.engine.monitor import Monitor
from gpusm.errors import ServiceStartFailed, ServiceStopFailed, StoreError
from gpusm.gpu.memory import MemoryProbe
from gpusm.ports import EventQuery, Handle, StopResult
from gpusm.runtimes.memory import MemoryRuntime
from gpusm.store.memory import MemoryEventStore
from tests.coordinator.fakes_helpers import World, fake_config, fake_service, open_world
from tests.support import eventually

Make = Callable[..., World]


@pytest.fixture
def make(tmp_path: Path) -> Iterator[Make]:
    """Builds worlds over fakes from service entries; closes the last one at the end."""
    opened: list[World] = []

    def factory(
        services: dict[str, dict[str, Any]],
        runtime: MemoryRuntime | None = None,
        **kwargs: Any,
    ) -> World:
        clock = runtime.clock if runtime is not None else None
        assert clock is None or isinstance(clock, ManualClock)
        world = open_world(fake_config(tmp_path, services, **kwargs), runtime=runtime, clock=clock)
        opened.append(world)
        return world

    yield factory
    for world in opened:
        world.coordinator.close()


def restart(**knobs: Any) -> dict[str, Any]:
    return {"backoff_initial_s": 1, "backoff_max_s": 60, "max_starts": 10, **knobs}


def crash(world: World, name: str) -> None:
    world.runtime.kill(name)
    world.tick()
    assert world.state(name) is State.STOPPED


# ---------------------------------------------------------------- crashes and restarts
def test_a_healthy_service_whose_process_dies_is_recorded_crashed_with_its_reason(
    make: Make,
) -> None:
    world = make({"a": fake_service(4096, restart={"policy": "no"})})
    world.coordinator.enter_phase("pa", client="w")
    pid = world.handle("a").pid
    world.runtime.kill("a", exit_code=-9)
    world.tick()
    assert world.state("a") is State.STOPPED
    assert world.slot("a").handle is None
    crashed = world.last("a", "Crashed")
    assert crashed["reason"] == "process exited"
    assert crashed["exit_code"] == -9
    assert crashed["free_mib"] == 16384
    assert pid not in world.gpu.holders()
    assert world.coordinator.status().services[0].last_error == "process exited"
    # policy "no": it stays down even though the client still holds the phase.
    world.clock.advance(120)
    world.tick()
    assert world.types("a").count("StartRequested") == 1


def test_a_crashed_service_a_client_needs_is_restarted_after_1_2_then_4_seconds(
    make: Make,
) -> None:
    world = make({"a": fake_service(4096, restart=restart())})
    world.coordinator.enter_phase("pa", client="w")
    for delay in (1.0, 2.0, 4.0):
        crash(world, "a")
        world.clock.advance(delay - 0.05)
        world.tick()
        assert world.state("a") is State.STOPPED, f"restarted before {delay}s"
        world.clock.advance(0.05)
        world.tick()
        assert world.state("a") is State.HEALTHY, f"not restarted after {delay}s"
        started = world.last("a", "StartRequested")
        assert started["by"] == "monitor"
        assert started["reason"] == "restart after crash (process exited)"
    assert world.types("a").count("Crashed") == 3
    assert len(world.gpu.holders()) == 1, "one live instance holds VRAM, the dead ones none"


def test_a_crashed_service_no_client_needs_is_not_restarted(make: Make) -> None:
    world = make({"a": fake_service(4096, restart=restart())})
    world.coordinator.start_service("a")
    crash(world, "a")
    assert world.slot("a").restart_at is None
    world.clock.advance(120)
    world.tick()
    assert world.state("a") is State.STOPPED


def test_a_restart_is_dropped_when_the_client_releases_before_it_is_due(make: Make) -> None:
    world = make({"a": fake_service(4096, restart=restart())})
    world.coordinator.enter_phase("pa", client="w")
    crash(world, "a")
    assert world.slot("a").restart_at is not None
    world.coordinator.release("w")
    world.clock.advance(5)
    world.tick()
    assert world.state("a") is State.STOPPED
    assert world.slot("a").restart_at is None


def test_a_restart_waits_for_room_and_never_evicts_for_it(make: Make) -> None:
    world = make({"a": fake_service(4096, restart=restart())}, total_mib=8192)
    world.coordinator.enter_phase("pa", client="w")
    crash(world, "a")
    world.gpu.hog(4242, 6000)  # someone else takes the room meanwhile
    world.clock.advance(1)
    world.tick()
    assert world.state("a") is State.STOPPED
    assert world.gpu.holders() == {4242: 6000}, "the foreign process is never touched"
    world.gpu.release(4242)
    world.clock.advance(1)
    world.tick()
    assert world.state("a") is State.HEALTHY
    assert world.gpu.ooms == []


def test_a_restart_that_fails_to_start_is_retried_with_backoff_until_the_budget_is_spent(
    make: Make,
) -> None:
    world = make({"a": fake_service(4096, restart=restart(max_starts=3))})
    world.coordinator.enter_phase("pa", client="w")
    world.health.failing["a"] = "status 503"  # every new instance now fails its start
    crash(world, "a")
    world.clock.advance(1)
    world.tick()
    assert world.types("a")[-1] == "StartFailed"
    assert world.state("a") is State.STOPPED
    # Second restart: 2 s after the first one failed (its health wait used clock time).
    assert world.slot("a").restart_at == pytest.approx(world.clock.monotonic() + 2.0)
    world.clock.advance(2)
    world.tick()
    assert world.state("a") is State.FAILED
    assert world.types("a").count("StartRequested") == 3
    assert world.last("a", "GaveUp")["reason"] == "3 starts within 600s; giving up"


def test_spending_the_start_budget_gives_up_and_a_reset_makes_it_startable_again(
    make: Make,
) -> None:
    world = make({"a": fake_service(4096, restart=restart(max_starts=2))})
    world.coordinator.enter_phase("pa", client="w")
    crash(world, "a")
    world.clock.advance(1)
    world.tick()
    assert world.state("a") is State.HEALTHY
    world.runtime.kill("a")
    world.tick()
    assert world.state("a") is State.FAILED
    assert world.types("a")[-2:] == ["Crashed", "GaveUp"]
    assert world.last("a", "GaveUp")["reason"] == "2 starts within 600s; giving up"
    with pytest.raises(ServiceStartFailed, match="restart budget"):
        world.coordinator.enter_phase("pa", client="w")
    world.coordinator.reset_service("a", by="operator")
    assert world.state("a") is State.STOPPED
    assert world.last("a", "Reset") == {"by": "operator"}
    world.coordinator.enter_phase("pa", client="w")
    assert world.state("a") is State.HEALTHY


def test_a_service_stopped_on_purpose_is_not_resurrected_by_a_stale_restart(
    make: Make,
) -> None:
    world = make({"a": fake_service(4096, restart=restart())})
    world.coordinator.enter_phase("pa", client="w")
    crash(world, "a")  # a restart is scheduled 1 s from now...
    world.coordinator.enter_phase("pa", client="w")  # ...but the client starts it first
    world.coordinator.stop_service("a", by="operator")
    world.clock.advance(5)
    world.tick()
    assert world.state("a") is State.STOPPED
    assert world.types("a")[-1] == "Stopped"


# ---------------------------------------------------------------- health
def fail_probes(world: World, name: str, times: int, interval_s: float = 1.0) -> None:
    world.health.failing[name] = "status 503"
    for _ in range(times):
        world.clock.advance(interval_s)
        world.tick()


def test_failing_health_n_times_in_a_row_stops_the_service_and_records_crashed(
    make: Make,
) -> None:
    health = {"interval_s": 1, "failures_before_crash": 3}
    world = make({"a": fake_service(4096, health=health, restart={"policy": "no"})})
    world.coordinator.enter_phase("pa", client="w")
    handle = world.handle("a")
    fail_probes(world, "a", 2)
    assert world.state("a") is State.HEALTHY
    world.tick()  # no time passed: not probed again before its interval
    assert world.slot("a").health_failures == 2
    fail_probes(world, "a", 1)
    assert world.state("a") is State.STOPPED
    crashed = world.last("a", "Crashed")
    assert crashed["reason"] == "health failed 3 times: status 503"
    assert not world.runtime.is_alive(handle), "an unhealthy service is stopped, not left behind"
    assert world.gpu.holders() == {}


def test_a_flapping_health_check_that_recovers_before_n_resets_the_count(make: Make) -> None:
    health = {"interval_s": 1, "failures_before_crash": 3}
    world = make({"a": fake_service(4096, health=health)})
    world.coordinator.enter_phase("pa", client="w")
    for _ in range(3):
        fail_probes(world, "a", 2)
        del world.health.failing["a"]
        world.clock.advance(1)
        world.tick()
        assert world.slot("a").health_failures == 0
    assert world.state("a") is State.HEALTHY
    assert "Crashed" not in world.types("a")


# ---------------------------------------------------------------- idle TTL
def test_idle_services_are_stopped_after_their_ttl_but_leased_ones_are_not(make: Make) -> None:
    world = make({"a": fake_service(4096, idle_ttl_s=30), "b": fake_service(4096, idle_ttl_s=30)})
    world.coordinator.enter_phase("pa", client="w1")
    world.coordinator.release("w1")
    world.coordinator.enter_phase("pb", client="w2")
    world.clock.advance(29.5)
    world.tick()
    assert (world.state("a"), world.state("b")) == (State.HEALTHY, State.HEALTHY)
    world.clock.advance(0.5)
    world.tick()
    assert world.state("a") is State.STOPPED
    assert world.state("b") is State.HEALTHY
    drain = world.last("a", "DrainRequested")
    assert drain["reason"] == "idle for 30s (idle_ttl_s)"
    assert drain["by"] == "monitor"
    assert world.last("a", "Stopped")["vram_reclaimed"] is True
    assert world.types("b")[-1] != "DrainRequested"


# ---------------------------------------------------------------- VRAM growth
def test_growth_beyond_the_learned_peak_is_recorded_and_raises_the_admission_reservation(
    make: Make,
) -> None:
    world = make(
        {"a": fake_service(4096, priority=10), "b": fake_service(7168, priority=10)},
        total_mib=12288,
    )
    world.coordinator.enter_phase("pa", client="w1")
    assert world.coordinator.plan_phase("pb", client="w2").fits
    pid = world.handle("a").pid
    assert pid is not None
    world.tick()
    world.gpu.allocate(pid, 2048)  # a grows to 6 GiB...
    world.tick()
    world.gpu.release(pid, 2048)  # ...and shrinks back: its peak is what it may need again
    world.tick()
    observed = world.store.read(EventQuery(stream="a", types=["VramObserved"]))
    assert [e.data["peak_mib"] for e in observed] == [4096, 6144]
    assert world.slot("a").reservation == 6144
    a_status = next(s for s in world.coordinator.status().services if s.name == "a")
    assert (a_status.reservation_mib, a_status.used_mib) == (6144, 4096)
    plan = world.coordinator.plan_phase("pb", client="w2")
    assert not plan.fits, "driver free (8 GiB) alone would have admitted b"
    assert (plan.need_mib, plan.free_before_mib, plan.blocked_by) == (7168, 6144, ("a",))
    # The learned peak is part of the log: a recovered coordinator reserves it too.
    assert world.reopen().slot("a").reservation == 6144


# ---------------------------------------------------------------- failed stops, the thread
class StubbornRuntime(MemoryRuntime):
    """A MemoryRuntime whose next ``fail_stops`` stops fail, as an engine that refuses."""

    def __init__(self, clock: ManualClock) -> None:
        super().__init__(clock, kind="native")
        self.fail_stops = 0

    def stop(self, handle: Handle, grace_s: float) -> StopResult:
        if self.fail_stops:
            self.fail_stops -= 1
            raise ServiceStopFailed(handle.service, "the engine refused the stop")
        return super().stop(handle, grace_s)


def test_a_stop_that_failed_is_retried_by_the_next_tick(make: Make) -> None:
    runtime = StubbornRuntime(ManualClock())
    world = make({"a": fake_service(4096, idle_ttl_s=30)}, runtime=runtime)
    world.coordinator.start_service("a")
    handle = world.handle("a")
    runtime.fail_stops = 1
    world.clock.advance(30)
    world.tick()
    assert world.state("a") is State.DRAINING
    assert "refused" in (world.slot("a").last_error or "")
    assert world.runtime.is_alive(handle)
    world.tick()
    assert world.state("a") is State.STOPPED
    assert not world.runtime.is_alive(handle)
    assert world.types("a")[-2:] == ["DrainRequested", "Stopped"]


def test_the_monitor_thread_keeps_ticking_while_the_gpu_is_unreadable(make: Make) -> None:
    world = make({"a": fake_service(4096, restart={"policy": "no"})})
    world.coordinator.enter_phase("pa", client="w")
    probe = world.engine.probe
    assert isinstance(probe, MemoryProbe)
    probe.unreadable = "GPU lost"
    probes_before = world.health.probes["a"]
    monitor = Monitor(world.engine, interval_s=0.01)
    monitor.start()
    try:
        # A first tick ran (it probed a) and then failed to read the GPU...
        eventually(lambda: world.health.probes["a"] != probes_before, 10, "a first monitor tick")
        world.runtime.kill("a")
        # ...and a later tick still notices the crash.
        eventually(lambda: world.state("a") is State.STOPPED, 10, "a tick after the GPU failed")
    finally:
        monitor.stop()
    assert "GPU lost" in world.last("a", "Crashed")["gpu_error"]


# ---------------------------------------------------------------- failed owners
class FlakyStore(MemoryEventStore):
    """Refuses the first append of one event type, as a full disk would."""

    def __init__(self, refuse: str) -> None:
        super().__init__()
        self.refuse: str | None = refuse

    def append(self, events: Sequence[NewEvent]) -> list[RecordedEvent]:
        if self.refuse is not None and any(e.type == self.refuse for e in events):
            self.refuse = None
            raise StoreError("disk full (test)")
        return super().append(events)


def test_a_start_whose_fact_cannot_be_recorded_is_drained_not_left_busy(
    tmp_path: Path,
) -> None:
    store = FlakyStore("ProcessLaunched")
    world = open_world(fake_config(tmp_path, {"a": fake_service(4096)}), store=store)
    try:
        slot = world.slot("a")
        with world.engine.cond:
            begin_start(world.engine, slot, {"reason": "test"})
        with pytest.raises(StoreError):
            run_start(world.engine, slot)
        # The owner gave up without recording the launch: nobody holds the slot...
        assert slot.state is State.STARTING
        assert not slot.busy
        assert "disk full" in (slot.last_error or "")
        # ...so the monitor drains it, and the process it had launched is stopped.
        world.tick()
        assert world.state("a") is State.STOPPED
        assert world.runtime.live() == []
        assert world.types("a")[-2:] == ["DrainRequested", "Stopped"]
        assert "start abandoned" in world.last("a", "DrainRequested")["reason"]
        # And the service starts normally afterwards.
        world.coordinator.enter_phase("pa", client="w")
        assert world.state("a") is State.HEALTHY
    finally:
        world.coordinator.close()


# ---------------------------------------------------------------- the sweep
def test_the_sweep_reaps_an_instance_that_outlived_its_service_but_not_the_running_one(
    make: Make,
) -> None:
    world = make({"a": fake_service(2048), "b": fake_service(1024)})
    world.coordinator.start_service("a")
    running = world.handle("a")
    # A leftover of an earlier instance of "a" (an escaped descendant that outlived it).
    ghost = world.runtime.start(world.config.services["a"], "ghost")
    world.tick()
    assert world.runtime.is_alive(ghost), "the sweep waits for its interval"
    before = world.last_seq()
    world.clock.advance(10)
    world.tick()
    assert not world.runtime.is_alive(ghost)
    assert world.runtime.is_alive(running)
    assert world.types("a", after_seq=before) == ["OrphanReaped"]
    reaped = world.last("a", "OrphanReaped")
    assert reaped["instance"] == "ghost"
    assert "outlived its instance" in reaped["reason"]
    assert world.state("a") is State.HEALTHY


def test_the_sweep_leaves_a_service_that_is_starting_alone(make: Make) -> None:
    world = make({"a": fake_service(2048, health={"timeout_s": 60})})
    world.health.ready_after["a"] = 10**6  # it never becomes healthy during this test
    with world.engine.cond:
        begin_start(world.engine, world.slot("a"), {"reason": "test"})
    # Started, launched but not yet attached as far as the sweep can tell: busy.
    pending = world.runtime.start(world.config.services["a"], "not-attached-yet")
    world.clock.advance(10)
    world.monitor.tick()  # not world.tick(): the start stays in flight on purpose
    assert world.runtime.is_alive(pending)
    world.runtime.stop(pending, 0.0)


def test_a_service_re_added_while_its_removal_is_still_stopping_keeps_one_slot(
    make: Make, tmp_path: Path
) -> None:
    runtime = StubbornRuntime(ManualClock())
    services = {"a": fake_service(2048), "b": fake_service(1024)}
    world = make(services, runtime=runtime)
    world.coordinator.start_service("a")
    slot = world.slot("a")
    runtime.fail_stops = 1  # the removal's stop fails once: "a" stays draining
    without = fake_config(tmp_path, {"b": services["b"]})
    assert world.coordinator.reload(without, by="test").removed == ("a",)
    world.settle()
    assert world.state("a") is State.DRAINING
    back = world.coordinator.reload(world.config, by="test")
    assert back.added == ("a",)
    assert world.slot("a") is slot  # one slot, one owner of the stream
    world.tick()  # the stop is retried and finishes
    assert world.state("a") is State.STOPPED
    world.coordinator.start_service("a")
    assert world.state("a") is State.HEALTHY
    versions = [e.version for e in world.store.read(EventQuery(stream="a"))]
    assert versions == list(range(1, len(versions) + 1))
