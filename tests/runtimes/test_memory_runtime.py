"""The in-memory runtime's test knobs: clock-driven stops, crashes, failures and hooks."""

from __future__ import annotations

from unittest.mock import Mock

import pytest

from gpusm.clock import ManualClock
from gpusm.config import HealthConfig, NativeServiceConfig
from gpusm.errors import ServiceStartFailed
from gpusm.ports import Handle
from gpusm.runtimes.memory import FAKE_PID_BASE, MemoryRuntime


def svc(name: str) -> NativeServiceConfig:
    return NativeServiceConfig(
        name=name, command=["fake"], vram_mib=100, health=HealthConfig(tcp="h:1")
    )


@pytest.fixture
def rt(manual_clock: ManualClock) -> MemoryRuntime:
    return MemoryRuntime(manual_clock)


def test_fake_pids_never_look_like_real_ones(rt: MemoryRuntime) -> None:
    handle = rt.start(svc("a"), "i1")
    assert handle.pid is not None
    assert handle.pid > FAKE_PID_BASE


def test_stop_of_a_sigterm_ignorer_takes_exactly_the_grace_on_the_clock(
    rt: MemoryRuntime, manual_clock: ManualClock
) -> None:
    rt.ignore_term.add("a")
    handle = rt.start(svc("a"), "i1")
    before = manual_clock.monotonic()
    result = rt.stop(handle, 7.0)
    assert result.escalated
    assert result.duration_s == pytest.approx(7.0)
    assert manual_clock.monotonic() - before == pytest.approx(7.0)
    assert rt.exit_code(handle) == -9


def test_slow_but_cooperative_stop_takes_its_delay_without_escalating(rt: MemoryRuntime) -> None:
    rt.term_delay_s["a"] = 2.0
    handle = rt.start(svc("a"), "i1")
    result = rt.stop(handle, 5.0)
    assert not result.escalated
    assert result.duration_s == pytest.approx(2.0)
    assert rt.exit_code(handle) == -15
    rt.term_delay_s["a"] = 9.0
    assert rt.stop(rt.start(svc("a"), "i2"), 5.0).escalated


def test_kill_crashes_every_live_instance_of_the_service(rt: MemoryRuntime) -> None:
    a1, a2, b = rt.start(svc("a"), "1"), rt.start(svc("a"), "2"), rt.start(svc("b"), "3")
    assert set(rt.kill("a", exit_code=1)) == {a1, a2}
    assert not rt.is_alive(a1)
    assert not rt.is_alive(a2)
    assert rt.is_alive(b)
    assert rt.exit_code(a1) == 1
    assert rt.kill("a") == []


def test_crash_after_fires_when_the_clock_passes_it(
    rt: MemoryRuntime, manual_clock: ManualClock
) -> None:
    rt.crash_after_s["a"] = 3.0
    handle = rt.start(svc("a"), "1")
    manual_clock.advance(2.9)
    assert rt.is_alive(handle)
    manual_clock.advance(0.2)
    assert not rt.is_alive(handle)
    assert rt.exit_code(handle) == 1


def test_crash_exit_code_sets_how_such_an_exit_ends(
    rt: MemoryRuntime, manual_clock: ManualClock
) -> None:
    rt.crash_after_s["a"] = 1.0
    rt.crash_exit_code["a"] = 0
    handle = rt.start(svc("a"), "1")
    rt.crash_exit_code["a"] = 7  # fixed at start: a later change does not apply
    manual_clock.advance(1.0)
    assert rt.exit_code(handle) == 0  # noticed by exit_code itself too
    assert not rt.is_alive(handle)


def test_failure_injection_applies_to_one_start_only(rt: MemoryRuntime) -> None:
    rt.fail_next_start = OSError("disk on fire")
    with pytest.raises(ServiceStartFailed, match="'a': disk on fire"):
        rt.start(svc("a"), "1")
    assert rt.is_alive(rt.start(svc("a"), "2"))


def test_hooks_let_a_fake_gpu_follow_starts_and_exits(rt: MemoryRuntime) -> None:
    rt.on_start = Mock()
    rt.on_exit = Mock()
    config = svc("a")
    handle = rt.start(config, "1")
    rt.on_start.assert_called_once_with(handle, config)
    rt.stop(handle, 1.0)
    rt.stop(handle, 1.0)  # already dead: no second exit
    rt.on_exit.assert_called_once_with(handle)


def test_reopened_runtime_shares_the_machine(rt: MemoryRuntime) -> None:
    rt.children["a"] = 2
    handle = rt.start(svc("a"), "1")
    other = rt.reopen()
    assert other.find_orphans() == [handle]
    assert other.pids_of(handle) == rt.pids_of(handle)
    assert len(other.pids_of(handle)) == 3
    other.stop(handle, 1.0)
    assert rt.live() == []
    assert not any(rt.pid_alive(pid) for pid in rt.pids_of(handle) | {handle.pid or 0})


def test_records_starts_stops_and_serves_log_tails(rt: MemoryRuntime) -> None:
    handle = rt.start(svc("a"), "1")
    result = rt.stop(handle, 1.0)
    assert rt.started == [handle]
    assert rt.stopped == [(handle, result)]
    rt.logs["a"] = "one\ntwo\nthree"
    assert rt.log_tail(handle, lines=2) == "two\nthree"
    assert rt.log_tail(handle, lines=0) == ""
    assert rt.log_tail(Handle("a", "never-started")) == ""
    assert rt.log_tail(rt.start(svc("b"), "2")) == ""
    rt.close()
    rt.close()


def test_unknown_or_stale_handles_are_not_alive(rt: MemoryRuntime) -> None:
    handle = rt.start(svc("a"), "1")
    assert rt.exit_code(Handle("a", "1", pid=handle.pid, create_time=0.0)) is None
    assert rt.exit_code(Handle("a", "1")) is None
    assert not rt.is_alive(Handle("a", "1"))
    assert rt.exit_code(handle) is None
