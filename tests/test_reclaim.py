"""Verified VRAM reclaim: the poll schedule on a scripted probe, then the simulated GPU
with real fake-model-server processes."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpusm.clock import ManualClock, SystemClock
from gpusm.config import HealthConfig, NativeServiceConfig
from gpusm.engine.reclaim import FIRST_POLL_S, MAX_POLL_S, wait_reclaimed
from gpusm.errors import GpuProbeError, VramNotReclaimed
from gpusm.gpu.sim import SimGpu, SimProbe
from gpusm.health import Health
from gpusm.ports import DeviceSnapshot, Handle
from gpusm.runtimes.native import NativeRuntime
from tests.support import eventually
from tests.support.ports import free_port


def snap(free: int, processes: dict[int, int] | None = None) -> DeviceSnapshot:
    used = 1000 - free
    return DeviceSnapshot(0, "GPU-x", "x", 1000, used, free, processes or {})


class ScriptedProbe:
    """A GpuProbe that returns a list of snapshots in turn (the last one forever)."""

    def __init__(self, *snaps: DeviceSnapshot) -> None:
        self.snaps = list(snaps)
        self.reads = 0

    def device_count(self) -> int:
        return 1

    def snapshot(self, device: int | str = 0) -> DeviceSnapshot:
        self.reads += 1
        return self.snaps.pop(0) if len(self.snaps) > 1 else self.snaps[0]

    def close(self) -> None:
        pass


class RecordingClock(ManualClock):
    """A manual clock that remembers every sleep."""

    def __init__(self) -> None:
        super().__init__()
        self.sleeps: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        super().sleep(seconds)


def test_returns_at_once_when_the_memory_is_already_free() -> None:
    probe = ScriptedProbe(snap(1000))
    took = wait_reclaimed(probe, service="a", pids={7}, expect_free_mib=900, clock=RecordingClock())
    assert took == 0.0
    assert probe.reads == 1


def test_waits_until_our_pids_let_go_and_enough_is_free() -> None:
    clock = RecordingClock()
    probe = ScriptedProbe(
        snap(500, {7: 500}),
        snap(500, {7: 500}),
        snap(1000, {7: 0}),  # listed with nothing held: counts as let go
    )
    took = wait_reclaimed(probe, service="a", pids={7}, expect_free_mib=1000, clock=clock)
    assert probe.reads == 3
    assert took == pytest.approx(sum(clock.sleeps))


def test_polls_fast_first_and_never_leaves_a_gap_over_100ms() -> None:
    clock = RecordingClock()
    probe = ScriptedProbe(snap(0, {7: 1000}))
    with pytest.raises(VramNotReclaimed):
        wait_reclaimed(
            probe, service="a", pids={7}, expect_free_mib=1, settle_timeout_s=2.0,
            poll_s=5.0, clock=clock,
        )  # fmt: skip
    assert clock.sleeps[0] == FIRST_POLL_S
    assert clock.sleeps == sorted(clock.sleeps[:-1]) + clock.sleeps[-1:]
    assert max(clock.sleeps) <= MAX_POLL_S == 0.1
    assert sum(clock.sleeps) == pytest.approx(2.0)


def test_timeout_names_our_pids_that_still_hold_memory(manual_clock: ManualClock) -> None:
    probe = ScriptedProbe(snap(100, {7: 600, 8: 300}))
    with pytest.raises(VramNotReclaimed) as info:
        wait_reclaimed(
            probe, service="tts", pids={7}, expect_free_mib=700, settle_timeout_s=0.5,
            clock=manual_clock,
        )  # fmt: skip
    err = info.value
    assert (err.service, err.holders, err.free_mib) == ("tts", {7: 600}, 100)
    assert err.waited_s == pytest.approx(0.5)
    assert "pid 7: 600 MiB" in str(err)


def test_timeout_names_every_holder_when_someone_else_took_the_room(
    manual_clock: ManualClock,
) -> None:
    probe = ScriptedProbe(snap(100, {8: 900, 9: 0}))
    with pytest.raises(VramNotReclaimed) as info:
        wait_reclaimed(
            probe, service="tts", pids={7}, expect_free_mib=700, settle_timeout_s=0.3,
            clock=manual_clock,
        )  # fmt: skip
    assert info.value.holders == {8: 900}


def test_probe_errors_pass_through(manual_clock: ManualClock) -> None:
    class Broken(ScriptedProbe):
        def snapshot(self, device: int | str = 0) -> DeviceSnapshot:
            raise GpuProbeError("GPU lost")

    with pytest.raises(GpuProbeError, match="GPU lost"):
        wait_reclaimed(Broken(snap(0)), service="a", pids=set(), expect_free_mib=0)


# ---------------------------------------------------------------- on the simulated GPU
TOTAL_MIB = 1000
LAG_S = 0.1


@pytest.fixture
def sim_dir(tmp_path: Path) -> Path:
    d = tmp_path / "sim"
    SimGpu(d, total_mib=TOTAL_MIB, reclaim_lag_s=LAG_S)
    return d


# Instance ids of this module's services, so cleanup finds only ours.
PREFIX = f"rc-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def rt(tmp_path: Path) -> Iterator[NativeRuntime]:
    """A runtime that, after the test, stops any of this module's instances still running."""
    mine = lambda env: env.get("GPUSM_INSTANCE", "").startswith(PREFIX)  # noqa: E731
    runtime = NativeRuntime(tmp_path / "logs", marker_filter=mine)
    yield runtime
    for handle in runtime.find_orphans():
        runtime.stop(handle, 0.1)


def start_fake_server(
    rt: NativeRuntime, sim_dir: Path, vram_mib: int, *flags: str
) -> tuple[Handle, Health]:
    """A healthy `gpusm sim service` holding ``vram_mib`` of the simulated GPU."""
    port = free_port()
    svc = NativeServiceConfig(
        name="fake",
        command=["{python}", "-m", "gpusm", "sim", "service", "--vram-mib", str(vram_mib),
                 "--port", str(port), "--sim-dir", str(sim_dir), *flags],
        vram_mib=vram_mib,
        health=HealthConfig(http=f"http://127.0.0.1:{port}/health"),
    )  # fmt: skip
    handle = rt.start(svc, f"{PREFIX}-{port}")
    health = Health()
    result = health.wait_healthy(
        svc.health, time.monotonic() + 60, still_alive=lambda: rt.is_alive(handle)
    )
    assert result.ok, f"{result.reason}\n{rt.log_tail(handle)}"
    return handle, health


def test_reclaim_after_stop_waits_for_the_driver_lag(rt: NativeRuntime, sim_dir: Path) -> None:
    probe = SimProbe(SimGpu(sim_dir))
    handle, health = start_fake_server(rt, sim_dir, 300)
    try:
        pids = rt.pids_of(handle)
        assert probe.snapshot().processes == {handle.pid: 300}
        assert not rt.stop(handle, 5.0).escalated
        took = wait_reclaimed(
            probe, service="fake", pids=pids, expect_free_mib=TOTAL_MIB, clock=SystemClock()
        )
    finally:
        rt.stop(handle, 0.1)
        health.close()
    assert LAG_S * 0.9 <= took < 5.0
    assert probe.snapshot().free_mib == TOTAL_MIB


def test_process_that_did_not_die_is_named_as_the_holder(rt: NativeRuntime, sim_dir: Path) -> None:
    probe = SimProbe(SimGpu(sim_dir))
    handle, health = start_fake_server(rt, sim_dir, 200, "--ignore-sigterm")
    try:
        assert handle.pid is not None
        with pytest.raises(VramNotReclaimed) as info:
            wait_reclaimed(
                probe, service="fake", pids={handle.pid}, expect_free_mib=TOTAL_MIB,
                settle_timeout_s=0.3, clock=SystemClock(),
            )  # fmt: skip
        assert info.value.holders == {handle.pid: 200}
        assert f"pid {handle.pid}: 200 MiB" in str(info.value)
    finally:
        assert rt.stop(handle, 0.2).escalated
        health.close()


def test_foreign_hog_that_ate_the_room_is_named(rt: NativeRuntime, sim_dir: Path) -> None:
    sim = SimGpu(sim_dir)
    hog = subprocess.Popen(
        [sys.executable, "-m", "gpusm", "sim", "hog", "--mib", "800", "--sim-dir", str(sim_dir)],
        stdout=subprocess.DEVNULL,
    )
    try:
        handle, health = start_fake_server(rt, sim_dir, 100)
        pids = rt.pids_of(handle)
        rt.stop(handle, 5.0)
        health.close()
        eventually(lambda: hog.pid in sim.holders(), 30, "the hog to allocate")
        with pytest.raises(VramNotReclaimed) as info:
            wait_reclaimed(
                SimProbe(sim), service="fake", pids=pids, expect_free_mib=TOTAL_MIB,
                settle_timeout_s=0.5, clock=SystemClock(),
            )  # fmt: skip
        assert info.value.holders == {hog.pid: 800}
        assert info.value.free_mib == TOTAL_MIB - 800
    finally:
        hog.terminate()
        hog.wait(10)
