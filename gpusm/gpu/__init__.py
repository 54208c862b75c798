"""GPU probes: NVML for real NVIDIA GPUs, and a process-accurate simulated GPU."""

from gpusm.gpu.nvml import NvmlProbe
from gpusm.gpu.sim import SimAllocation, SimGpu, SimProbe

__all__ = ["NvmlProbe", "SimAllocation", "SimGpu", "SimProbe"]
