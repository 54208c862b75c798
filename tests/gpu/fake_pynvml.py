"""A fake ``pynvml`` module: the functions NvmlProbe calls, over GPUs described in Python.

Any function can be made to fail with an NVML error code (``fail["nvmlInit"] = 12``),
exactly as pynvml raises ``NVMLError`` with ``.value``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["FakeGpu", "FakeNvml", "FakeProcess"]

_MIB = 1024 * 1024
_MESSAGES = {
    2: "Invalid Argument",
    3: "Not Supported",
    6: "Not Found",
    9: "Driver Not Loaded",
    12: "NVML Shared Library Not Found",
    15: "GPU is lost",
    999: "Unknown Error",
}


class NVMLError(Exception):
    """Like pynvml's: ``.value`` is the return code, ``str()`` its text."""

    def __init__(self, value: int) -> None:
        super().__init__(value)
        self.value = value

    def __str__(self) -> str:
        return _MESSAGES.get(self.value, f"error {self.value}")


@dataclass
class FakeProcess:
    """One entry of an NVML process list (``usedGpuMemory`` in bytes, or None)."""

    pid: int
    usedGpuMemory: int | None  # pynvml's spelling


@dataclass
class FakeGpu:
    """A GPU as NVML would describe it; memory in MiB for convenience."""

    uuid: str
    name: str | bytes = "NVIDIA Fake 24GB"
    total_mib: int = 24576
    used_mib: int = 1000
    compute: list[FakeProcess] = field(default_factory=list)
    graphics: list[FakeProcess] = field(default_factory=list)


@dataclass
class _Memory:
    total: int
    used: int
    free: int


class FakeNvml:
    """Stands in for the ``pynvml`` module; counts init/shutdown calls."""

    NVMLError = NVMLError

    def __init__(self, gpus: list[FakeGpu] | None = None) -> None:
        self.gpus = gpus if gpus is not None else [FakeGpu(uuid="GPU-fake-0")]
        self.fail: dict[str, int] = {}
        self.inits = 0
        self.shutdowns = 0

    def _check(self, name: str) -> None:
        if name in self.fail:
            raise NVMLError(self.fail[name])

    def nvmlInit(self) -> None:
        self._check("nvmlInit")
        self.inits += 1

    def nvmlShutdown(self) -> None:
        self._check("nvmlShutdown")
        self.shutdowns += 1

    def nvmlDeviceGetCount(self) -> int:
        self._check("nvmlDeviceGetCount")
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeGpu:
        self._check("nvmlDeviceGetHandleByIndex")
        if not 0 <= index < len(self.gpus):
            raise NVMLError(2)
        return self.gpus[index]

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> FakeGpu:
        self._check("nvmlDeviceGetHandleByUUID")
        for gpu in self.gpus:
            if gpu.uuid == uuid:
                return gpu
        raise NVMLError(6)

    def nvmlDeviceGetMemoryInfo(self, handle: FakeGpu) -> _Memory:
        self._check("nvmlDeviceGetMemoryInfo")
        total, used = handle.total_mib * _MIB, handle.used_mib * _MIB
        return _Memory(total=total, used=used, free=total - used)

    def nvmlDeviceGetName(self, handle: FakeGpu) -> str | bytes:
        self._check("nvmlDeviceGetName")
        return handle.name

    def nvmlDeviceGetUUID(self, handle: FakeGpu) -> str:
        self._check("nvmlDeviceGetUUID")
        return handle.uuid

    def nvmlDeviceGetComputeRunningProcesses(self, handle: FakeGpu) -> list[Any]:
        self._check("nvmlDeviceGetComputeRunningProcesses")
        return list(handle.compute)

    def nvmlDeviceGetGraphicsRunningProcesses(self, handle: FakeGpu) -> list[Any]:
        self._check("nvmlDeviceGetGraphicsRunningProcesses")
        return list(handle.graphics)
