"""The GpuProbe contract, run against the simulated GPU, NVML over a fake pynvml, and real NVML."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from fake_pynvml import FakeGpu, FakeNvml, FakeProcess
from gpu_probe_contract import GpuProbeContract

from gpusm.errors import GpuProbeError
from gpusm.gpu import NvmlProbe, SimGpu, SimProbe
from gpusm.ports import GpuProbe

_MIB = 1024 * 1024


class TestSimProbeContract(GpuProbeContract):
    def make_probe(self, tmp_path: Path) -> GpuProbe:
        return SimProbe(SimGpu(tmp_path / "sim", total_mib=8192, reclaim_lag_s=0.0))

    def hold(self, probe: GpuProbe, mib: int) -> int:
        assert isinstance(probe, SimProbe)
        probe.sim.allocate(mib)
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
