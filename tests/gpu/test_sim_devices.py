"""Several simulated devices: device 0 is the sim folder, device i lives in device-<i>/."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gpusm.errors import GpuProbeError, SimOutOfMemory
from gpusm.gpu.sim import SimGpu, SimProbe, UnknownSimDevice, select_devices


def test_open_all_creates_each_device_in_its_own_folder_with_its_own_uuid(
    sim_dir: Path,
) -> None:
    devices = SimGpu.open_all(sim_dir, [1000, 500], reclaim_lag_s=0.0)
    assert [(d.index, d.total_mib) for d in devices] == [(0, 1000), (1, 500)]
    assert devices[0].directory == sim_dir
    assert devices[1].directory == sim_dir / "device-1"
    assert (sim_dir / "device-1" / "state.json").is_file()
    assert devices[0].uuid != devices[1].uuid
    assert all(d.uuid.startswith("SIM-") for d in devices)
    assert SimGpu.count(sim_dir) == 2
    again = SimGpu.open_all(sim_dir)
    assert [(d.index, d.uuid, d.total_mib) for d in again] == [
        (d.index, d.uuid, d.total_mib) for d in devices
    ]


def test_an_existing_single_device_folder_keeps_its_uuid_and_becomes_device_0(
    sim_dir: Path,
) -> None:
    old = SimGpu(sim_dir, total_mib=1000)
    devices = SimGpu.open_all(sim_dir, 2000, devices=3)
    assert devices[0].uuid == old.uuid
    assert [d.total_mib for d in devices] == [1000, 2000, 2000]  # existing kept without apply
    assert SimGpu.count(sim_dir) == 3


def test_apply_resizes_and_removes_surplus_devices(sim_dir: Path) -> None:
    SimGpu.open_all(sim_dir, 1000, devices=3)
    devices = SimGpu.open_all(sim_dir, [700, 300], devices=2, apply=True)
    assert [d.total_mib for d in devices] == [700, 300]
    assert SimGpu.count(sim_dir) == 2
    assert not (sim_dir / "device-2").exists()


def test_a_surplus_device_with_a_live_holder_is_not_removed(sim_dir: Path) -> None:
    devices = SimGpu.open_all(sim_dir, 1000, devices=2)
    devices[1].allocate(10)
    with pytest.raises(GpuProbeError, match="live processes hold memory"):
        SimGpu.open_all(sim_dir, 1000, devices=1, apply=True)
    assert SimGpu.count(sim_dir) == 2
    devices[1].release()


def test_a_missing_device_without_a_size_says_how_to_create_it(sim_dir: Path) -> None:
    SimGpu(sim_dir, total_mib=100)
    with pytest.raises(UnknownSimDevice, match="--devices 2"):
        SimGpu.open_all(sim_dir, devices=2)


def test_sizes_must_match_the_device_count(sim_dir: Path) -> None:
    with pytest.raises(GpuProbeError, match="one per device"):
        SimGpu.open_all(sim_dir, [1, 2, 3], devices=2)


def test_allocating_on_device_1_leaves_device_0_untouched(sim_dir: Path) -> None:
    dev0, dev1 = SimGpu.open_all(sim_dir, 1000, devices=2, reclaim_lag_s=0.0)
    dev1.allocate(300)
    assert (dev0.snapshot().used_mib, dev1.snapshot().used_mib) == (0, 300)
    assert dev1.holders() == {os.getpid(): 300}
    assert dev0.holders() == {}
    dev1.release()


def test_out_of_memory_is_per_device(sim_dir: Path) -> None:
    dev0, dev1 = SimGpu.open_all(sim_dir, [1000, 100], reclaim_lag_s=0.0)
    dev0.allocate(500)  # fits on device 0, would not on device 1
    with pytest.raises(SimOutOfMemory):
        dev1.allocate(500)
    assert (len(dev0.ooms()), len(dev1.ooms())) == (0, 1)
    assert SimProbe([dev0, dev1]).oom_count() == 1
    dev0.release()


def test_probe_reads_every_device_by_index_and_uuid(sim_dir: Path) -> None:
    devices = SimGpu.open_all(sim_dir, [1000, 500], reclaim_lag_s=0.0)
    devices[1].allocate(200)
    probe = SimProbe(devices)
    assert probe.device_count() == 2
    one = probe.snapshot(1)
    assert (one.index, one.uuid, one.total_mib, one.used_mib) == (1, devices[1].uuid, 500, 200)
    assert one.processes == {os.getpid(): 200}
    assert probe.snapshot(devices[1].uuid) == one
    assert probe.snapshot(devices[0].uuid).index == 0
    assert probe.snapshot().used_mib == 0
    with pytest.raises(GpuProbeError):
        probe.snapshot(2)
    with pytest.raises(GpuProbeError):
        probe.snapshot("SIM-nope")
    devices[1].release()


def test_a_probe_on_one_sim_gpu_still_works(sim_dir: Path) -> None:
    probe = SimProbe(SimGpu(sim_dir, total_mib=10))
    assert probe.device_count() == 1
    assert probe.snapshot(0).index == 0


def test_probe_refuses_devices_out_of_order(sim_dir: Path) -> None:
    dev0, dev1 = SimGpu.open_all(sim_dir, 10, devices=2)
    with pytest.raises(GpuProbeError, match="index order"):
        SimProbe([dev1, dev0])


def test_select_devices_by_index_uuid_or_default(sim_dir: Path) -> None:
    dev0, dev1, dev2 = SimGpu.open_all(sim_dir, 10, devices=3)
    pool = [dev0, dev1, dev2]
    assert select_devices(pool, None) == [dev0]
    assert select_devices(pool, " ") == [dev0]
    assert select_devices(pool, dev1.uuid) == [dev1]
    assert select_devices(pool, f"2, {dev0.uuid}") == [dev2, dev0]
    with pytest.raises(UnknownSimDevice, match="'3'"):
        select_devices(pool, "3")
    with pytest.raises(UnknownSimDevice, match="GPU-x"):
        select_devices(pool, "0,GPU-x")
    with pytest.raises(UnknownSimDevice, match="twice"):
        select_devices(pool, f"1,{dev1.uuid}")
