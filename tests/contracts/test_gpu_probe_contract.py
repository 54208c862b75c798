"""The GpuProbe contract against every probe: in-memory, sim, NVML on a fake pynvml, real NVML."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gpusm.errors import GpuProbeError
from gpusm.gpu import NvmlProbe, SimGpu, SimProbe
from gpusm.gpu.memory import MemoryGpu, MemoryProbe
from gpusm.ports import GpuProbe
from tests.contracts.gpu_probe_contract import GpuProbeContract
from tests.gpu.fake_pynvml import FakeGpu, FakeNvml, FakeProcess

_MIB = 1024 * 1024


class TestMemoryProbeContract(GpuProbeContract):
    def make_probe(self, tmp_path: Path) -> GpuProbe:
        return MemoryProbe(MemoryGpu(8192))

    def hold(self, probe: GpuProbe, mib: int) -> int:
        assert isinstance(probe, MemoryProbe)
        probe.gpu.allocate(4242, mib)
        return 4242


class TestSimProbeContract(GpuProbeContract):
    def make_probe(self, tmp_path: Path) -> GpuProbe:
        return SimProbe(SimGpu(tmp_path / "sim", total_mib=8192, reclaim_lag_s=0.0))

    def hold(self, probe: GpuProbe, mib: int) -> int:
        assert isinstance(probe, SimProbe)
        probe.sim.allocate(mib)
        return os.getpid()


class TestMultiDeviceSimProbeContract(GpuProbeContract):
    def make_probe(self, tmp_path: Path) -> GpuProbe:
        devices = SimGpu.open_all(tmp_path / "sim", [8192, 4096], reclaim_lag_s=0.0)
        return SimProbe(devices)

    def hold(self, probe: GpuProbe, mib: int) -> int:
        assert isinstance(probe, SimProbe)
        probe.devices[0].allocate(mib)
        return os.getpid()


class TestFakeNvmlProbeContract(GpuProbeContract):
    def make_probe(self, tmp_path: Path) -> GpuProbe:
        self.nvml = FakeNvml(
            [
                FakeGpu(uuid="GPU-aaaa", compute=[FakeProcess(pid=4242, usedGpuMemory=900 * _MIB)]),
                FakeGpu(uuid="GPU-bbbb", name=b"NVIDIA Old Bytes"),
            ]
        )
        return NvmlProbe(self.nvml)

    def hold(self, probe: GpuProbe, mib: int) -> int:
        gpu = self.nvml.gpus[0]
        gpu.compute.append(FakeProcess(pid=777, usedGpuMemory=mib * _MIB))
        gpu.used_mib += mib
        return 777


@pytest.mark.gpu
class TestRealNvmlProbeContract(GpuProbeContract):
    def make_probe(self, tmp_path: Path) -> GpuProbe:
        probe = NvmlProbe()
        try:
            probe.device_count()
        except GpuProbeError as exc:
            pytest.skip(f"no usable NVIDIA GPU here: {exc}")
        return probe
