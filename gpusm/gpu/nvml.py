"""The NVML probe: VRAM per NVIDIA GPU and per process, read through nvidia-ml-py.

This is the only module that imports ``pynvml``. Every ``NVMLError`` (and a missing
``pynvml``) becomes :class:`~gpusm.errors.GpuProbeError` carrying NVML's message and a
hint for a person. Tests pass a fake module object with the same functions.
"""

from __future__ import annotations

import threading
from typing import Any

from gpusm.errors import GpuProbeError
from gpusm.ports import DeviceSnapshot

__all__ = ["NvmlProbe"]

_MIB = 1024 * 1024

# NVML return codes (nvml.h; a stable ABI), with what a person should do about each.
_HINTS: dict[int, str] = {
    1: "NVML was not initialised; this is a gpusm bug, please report it",
    2: "check the device index or UUID (nvidia-smi -L lists them)",
    3: "this GPU or driver does not support the call",
    4: "run gpusm as a user allowed to read the GPU",
    6: "no GPU with that index or UUID; nvidia-smi -L lists them",
    9: "the NVIDIA kernel driver is not loaded; check `nvidia-smi`, or use gpu.backend: sim",
    10: "the driver timed out; retry, and check `nvidia-smi`",
    12: "libnvidia-ml.so was not found; install the NVIDIA driver, or use gpu.backend: sim",
    13: "the driver is too old for this call; update the NVIDIA driver",
    15: "the GPU fell off the bus; check `dmesg`, a reboot may be needed",
    16: "the GPU needs a reset or a reboot",
    18: "the NVML library and the kernel module differ in version; reboot or reload the driver",
}
_NOT_SUPPORTED = 3
_GENERIC_HINT = "check `nvidia-smi`; use gpu.backend: sim to run without a GPU"


def _text(value: bytes | str) -> str:
    # Old nvidia-ml-py versions return bytes, new ones str.
    return value.decode() if isinstance(value, bytes) else str(value)


class NvmlProbe:
    """A :class:`~gpusm.ports.GpuProbe` over NVML; initialises NVML on first use.

    ``nvml_module`` replaces ``pynvml`` (for tests). Safe to share between threads.
    After :meth:`close`, further reads raise GpuProbeError.
    """

    # A real driver's memory that no listed process holds (contexts, caches) wobbles.
    slack_mib = 64

    def __init__(self, nvml_module: Any | None = None) -> None:
        self._nvml = nvml_module
        self._lock = threading.Lock()
        self._initialised = False
        self._closed = False
        # Name and UUID do not change while NVML is initialised; cached to keep reads cheap.
        self._static: dict[int, tuple[Any, str, str]] = {}

    # ------------------------------------------------------------ GpuProbe
    def device_count(self) -> int:
        """Number of GPUs NVML sees (it ignores CUDA_VISIBLE_DEVICES)."""
        nvml = self._ready()
        return int(self._call("count the GPUs", nvml.nvmlDeviceGetCount))

    def snapshot(self, device: int | str = 0) -> DeviceSnapshot:
        """Memory of one GPU by index or UUID, with compute and graphics processes merged."""
        nvml = self._ready()
        index = self._index_of(device)
        handle, name, uuid = self._device(index)
        info = self._call(f"read memory of GPU {index}", nvml.nvmlDeviceGetMemoryInfo, handle)
        processes = self._merge(
            self._processes(index, "compute", nvml.nvmlDeviceGetComputeRunningProcesses, handle),
            self._processes(index, "graphics", nvml.nvmlDeviceGetGraphicsRunningProcesses, handle),
        )
        return DeviceSnapshot(
            index=index,
            uuid=uuid,
            name=name,
            total_mib=int(info.total) // _MIB,
            used_mib=int(info.used) // _MIB,
            free_mib=int(info.free) // _MIB,
            processes=processes,
        )

    def oom_count(self) -> int | None:
        """NVML does not report allocation failures: always None."""
        return None

    def close(self) -> None:
        """Shut NVML down; idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._static.clear()
            if self._initialised:
                self._initialised = False
                assert self._nvml is not None
                self._call("shut NVML down", self._nvml.nvmlShutdown)

    # ------------------------------------------------------------ internals
    def _ready(self) -> Any:
        with self._lock:
            if self._closed:
                raise GpuProbeError("the NVML probe is closed; open a new one")
            if self._nvml is None:
                try:
                    import pynvml
                except ImportError as exc:
                    raise GpuProbeError(
                        "nvidia-ml-py is not installed; `pip install nvidia-ml-py`, "
                        "or use gpu.backend: sim"
                    ) from exc
                self._nvml = pynvml
            if not self._initialised:
                self._call("initialise NVML", self._nvml.nvmlInit)
                self._initialised = True
            return self._nvml

    def _call(self, what: str, fn: Any, *args: Any) -> Any:
        """Call an NVML function, translating its errors."""
        assert self._nvml is not None
        try:
            return fn(*args)
        except self._nvml.NVMLError as exc:
            code = getattr(exc, "value", None)
            hint = _HINTS.get(code, _GENERIC_HINT) if isinstance(code, int) else _GENERIC_HINT
            raise GpuProbeError(f"NVML could not {what}: {exc} ({hint})") from exc

    def _index_of(self, device: int | str) -> int:
        if isinstance(device, str):
            nvml = self._nvml
            assert nvml is not None
            # Validates the UUID (NOT_FOUND becomes a clear error) before the index scan.
            self._call(f"find GPU {device!r}", nvml.nvmlDeviceGetHandleByUUID, device)
            for index in range(self.device_count()):
                if self._device(index)[2] == device:
                    return index
            raise GpuProbeError(f"GPU {device!r} is not among the devices NVML lists")
        count = self.device_count()
        if isinstance(device, bool) or not 0 <= device < count:
            raise GpuProbeError(f"no GPU with index {device!r}; NVML sees {count} (0..{count - 1})")
        return device

    def _device(self, index: int) -> tuple[Any, str, str]:
        if index not in self._static:
            nvml = self._nvml
            assert nvml is not None
            handle = self._call(f"open GPU {index}", nvml.nvmlDeviceGetHandleByIndex, index)
            name = _text(self._call(f"name GPU {index}", nvml.nvmlDeviceGetName, handle))
            uuid = _text(self._call(f"read GPU {index}'s UUID", nvml.nvmlDeviceGetUUID, handle))
            self._static[index] = (handle, name, uuid)
        return self._static[index]

    def _processes(self, index: int, kind: str, fn: Any, handle: Any) -> dict[int, int]:
        """MiB per pid from one process list; one pid listed twice (MIG) is summed."""
        try:
            entries = self._call(f"list {kind} processes on GPU {index}", fn, handle)
        except GpuProbeError as exc:
            # Compute-only GPUs (TCC mode, some datacenter parts) refuse the graphics list;
            # the compute list still says who holds memory.
            if kind == "graphics" and getattr(exc.__cause__, "value", None) == _NOT_SUPPORTED:
                return {}
            raise
        out: dict[int, int] = {}
        for entry in entries:
            used = entry.usedGpuMemory
            # None: the driver cannot attribute memory (e.g. Windows WDDM, some containers).
            mib = 0 if used is None else int(used) // _MIB
            out[int(entry.pid)] = out.get(int(entry.pid), 0) + mib
        return out

    @staticmethod
    def _merge(compute: dict[int, int], graphics: dict[int, int]) -> dict[int, int]:
        # A process with both contexts appears in both lists with the same memory: max, not sum.
        merged = dict(compute)
        for pid, mib in graphics.items():
            merged[pid] = max(merged.get(pid, 0), mib)
        return merged
