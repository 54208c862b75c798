"""After a restart, status tells time in state and the last error from the log."""

from __future__ import annotations

from pathlib import Path

from gpusm.clock import ManualClock
from tests.coordinator.fakes_helpers import fake_config, fake_service, open_world
from tests.support import service_status


def test_time_in_state_and_last_error_survive_a_restart(tmp_path: Path) -> None:
    clock = ManualClock()
    world = open_world(
        fake_config(tmp_path, {"a": fake_service(2048), "b": fake_service(1024)}), clock=clock
    )
    world.coordinator.start_service("a")
    world.coordinator.start_service("b")
    clock.advance(5)
    world.runtime.kill("a", exit_code=-9)
    world.tick()  # the monitor sees the crash
    crashed = service_status(world.coordinator, "a")
    assert crashed.state == "stopped"
    assert crashed.last_error == "process exited"
    clock.advance(40)

    again = world.reopen()

    a = service_status(again.coordinator, "a")
    b = service_status(again.coordinator, "b")
    assert a.last_error == "process exited"
    assert 39.9 <= a.in_state_s <= 40.1, a  # stopped 40 s ago, not "for 0.0s"
    assert b.state == "healthy"
    assert b.last_error is None
    assert 44.9 <= b.in_state_s <= 45.1, b
    again.coordinator.close()
