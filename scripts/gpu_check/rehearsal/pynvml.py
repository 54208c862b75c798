"""A stand-in for nvidia-ml-py over the files ``torch.py`` beside it writes (rehearsal only).

Put this folder first on PYTHONPATH to walk the GPU check's code paths on a machine with
no GPU; ``FAKE_GPU_DIR`` must name the same folder for both. Proves nothing about a GPU.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

MIB = 1024 * 1024


class NVMLError(Exception):
    def __init__(self, value: int = 999) -> None:
        super().__init__(value)
        self.value = value


def _dir() -> Path:
    return Path(os.environ["FAKE_GPU_DIR"])


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def held() -> dict[int, int]:
    out = {}
    for path in _dir().glob("*.mib"):
        pid = int(path.stem)
        if _alive(pid):
            out[pid] = int(path.read_text())
    return out


def total_mib() -> int:
    return int(os.environ.get("FAKE_GPU_TOTAL_MIB", "26624"))


def nvmlInit() -> None: ...
def nvmlShutdown() -> None: ...
def nvmlDeviceGetCount() -> int:
    return 1


def nvmlDeviceGetHandleByIndex(index: int) -> int:
    return index


def nvmlDeviceGetHandleByUUID(uuid: str) -> int:
    return 0


def nvmlDeviceGetName(handle: int) -> str:
    return "Rehearsal GPU"


def nvmlDeviceGetUUID(handle: int) -> str:
    return "GPU-00000000-0000-0000-0000-000000000000"


def nvmlDeviceGetMemoryInfo(handle: int) -> SimpleNamespace:
    used = sum(held().values()) * MIB
    return SimpleNamespace(total=total_mib() * MIB, used=used, free=total_mib() * MIB - used)


def nvmlDeviceGetComputeRunningProcesses(handle: int) -> list[SimpleNamespace]:
    return [SimpleNamespace(pid=p, usedGpuMemory=m * MIB) for p, m in held().items()]


def nvmlDeviceGetGraphicsRunningProcesses(handle: int) -> list[SimpleNamespace]:
    return []
