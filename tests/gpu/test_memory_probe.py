"""The in-memory GPU: OOMs, the reclaim lag, and fake processes holding VRAM.

Its probe contract runs in tests/contracts/test_gpu_probe_contract.py.
"""

from __future__ import annotations

import pytest

from gpusm.clock import ManualClock
from gpusm.config import HealthConfig, NativeServiceConfig
from gpusm.errors import GpuProbeError, SimOutOfMemory
from gpusm.gpu.memory import MEMORY_GPU_NAME, MemoryGpu, MemoryOom, MemoryProbe
from gpusm.runtimes.memory import MemoryRuntime


def svc(name: str, vram_mib: int = 1000) -> NativeServiceConfig:
    return NativeServiceConfig(
        name=name, command=["fake"], vram_mib=vram_mib, health=HealthConfig(tcp="h:1")
    )


def test_snapshot_names_the_device_and_adds_up() -> None:
    gpu = MemoryGpu(4096, uuid="MEM-x")
    gpu.allocate(1, 1000)
    gpu.hog(2, 500)
    snap = MemoryProbe(gpu).snapshot("MEM-x")
    assert (snap.name, snap.total_mib, snap.used_mib, snap.free_mib) == (
        MEMORY_GPU_NAME,
        4096,
        1500,
        2596,
    )
    assert dict(snap.processes) == {1: 1000, 2: 500}


def test_allocation_beyond_free_is_refused_recorded_and_changes_nothing() -> None:
    gpu = MemoryGpu(2048)
    gpu.allocate(7, 2000)
    with pytest.raises(SimOutOfMemory) as caught:
        gpu.allocate(8, 100)
    assert (caught.value.pid, caught.value.requested_mib, caught.value.free_mib) == (8, 100, 48)
    assert gpu.ooms == [MemoryOom(pid=8, requested_mib=100, free_mib=48)]
    assert gpu.holders() == {7: 2000}


def test_allocations_of_one_pid_add_up_and_release_frees_part_or_all() -> None:
    gpu = MemoryGpu(4096)
    gpu.allocate(7, 1000)
    gpu.allocate(7, 500)
    gpu.release(7, 300)
    assert gpu.holders() == {7: 1200}
    gpu.release(7)
    assert gpu.holders() == {}
    assert gpu.snapshot().free_mib == 4096


def test_releasing_more_than_held_is_an_error_that_names_the_pid() -> None:
    gpu = MemoryGpu(4096)
    gpu.allocate(7, 100)
    with pytest.raises(GpuProbeError, match="pid 7 holds 100 MiB"):
        gpu.release(7, 101)
    gpu.release(7, 100)
    assert gpu.holders() == {}


@pytest.mark.parametrize("mib", [0, -5])
def test_non_positive_amounts_are_refused(mib: int) -> None:
    gpu = MemoryGpu(4096)
    with pytest.raises(GpuProbeError, match="positive"):
        gpu.allocate(1, mib)
    with pytest.raises(GpuProbeError, match="positive"):
        gpu.release(1, mib)


def test_bad_size_or_lag_is_refused_with_a_clear_message() -> None:
    with pytest.raises(GpuProbeError, match="above 0 MiB"):
        MemoryGpu(0)
    with pytest.raises(GpuProbeError, match="0 s or more"):
        MemoryGpu(100, reclaim_lag_s=-1)


def test_exited_memory_stays_used_by_no_pid_until_the_lag_passes(
    manual_clock: ManualClock,
) -> None:
    gpu = MemoryGpu(4096, reclaim_lag_s=0.5, clock=manual_clock)
    gpu.allocate(7, 1000)
    gpu.exited(7)
    snap = gpu.snapshot()
    assert (snap.used_mib, dict(snap.processes)) == (1000, {})
    manual_clock.advance(0.49)
    assert gpu.snapshot().used_mib == 1000
    manual_clock.advance(0.01)
    assert gpu.snapshot().used_mib == 0


def test_exited_memory_without_lag_is_free_at_once() -> None:
    gpu = MemoryGpu(4096)
    gpu.allocate(7, 1000)
    gpu.exited(7)
    gpu.exited(8)  # a pid that held nothing: nothing to free
    assert gpu.snapshot().used_mib == 0


def test_attached_fake_processes_hold_their_vram_while_alive(manual_clock: ManualClock) -> None:
    gpu = MemoryGpu(8192, reclaim_lag_s=1.0, clock=manual_clock)
    runtime = MemoryRuntime(manual_clock)
    gpu.attach(runtime, {"b": 3000, "none": 0})
    a = runtime.start(svc("a", 1000), "i1")
    b = runtime.start(svc("b", 1000), "i2")
    runtime.start(svc("none", 1000), "i3")
    assert a.pid is not None
    assert b.pid is not None
    assert gpu.holders() == {a.pid: 1000, b.pid: 3000}
    runtime.kill("a")
    assert gpu.holders() == {b.pid: 3000}
    assert gpu.snapshot().used_mib == 4000  # a's memory lags behind its exit
    manual_clock.advance(1.0)
    runtime.stop(b, 1.0)
    manual_clock.advance(1.0)
    assert gpu.snapshot().used_mib == 0


def test_an_attached_process_that_does_not_fit_is_recorded_as_oom_and_exits(
    manual_clock: ManualClock,
) -> None:
    gpu = MemoryGpu(2048, clock=manual_clock)
    runtime = MemoryRuntime(manual_clock)
    gpu.attach(runtime)
    first = runtime.start(svc("a", 1500), "i1")
    second = runtime.start(svc("b", 1500), "i2")
    assert runtime.is_alive(first)
    assert not runtime.is_alive(second)
    assert [(o.pid, o.requested_mib) for o in gpu.ooms] == [(second.pid, 1500)]
    assert gpu.holders() == {first.pid: 1500}


def test_unknown_device_names_the_one_that_exists() -> None:
    probe = MemoryProbe(MemoryGpu(100, uuid="MEM-1"))
    with pytest.raises(GpuProbeError, match=r"no GPU 1: the in-memory GPUs are 0 \(MEM-1\)"):
        probe.snapshot(1)


def test_several_in_memory_gpus_are_read_by_index_or_uuid() -> None:
    probe = MemoryProbe([MemoryGpu(100), MemoryGpu(200, index=1)])
    assert probe.device_count() == 2
    assert probe.snapshot(1).total_mib == 200
    assert probe.snapshot("MEM-GPU-1").index == 1
    probe.gpus[1].hog(7, 50)
    assert probe.snapshot(0).used_mib == 0
    with pytest.raises(SimOutOfMemory):
        probe.gpus[1].allocate(8, 151)
    assert probe.oom_count() == 1


def test_an_unreadable_gpu_fails_every_read_with_its_reason_until_it_is_back() -> None:
    probe = MemoryProbe(MemoryGpu(100))
    probe.unreadable = "GPU has fallen off the bus"
    with pytest.raises(GpuProbeError, match="fallen off the bus"):
        probe.snapshot()
    probe.unreadable = None
    assert probe.snapshot().total_mib == 100
