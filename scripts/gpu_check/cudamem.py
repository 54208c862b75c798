"""Hold real GPU memory from Python with whatever is there: torch, cupy, or the driver itself.

Standard library only: the last resort calls ``libcuda.so.1`` (the driver API, present
wherever the NVIDIA driver is) through ``ctypes``, so a GPU machine with no torch or cupy
for this interpreter can still allocate. Every backend writes the whole block once, so
the pages really exist on the device and NVML counts them against this process.

``allocate(mib, device, backend)`` returns a :class:`Block`; the memory lives until the
process exits (the point: the checks measure how fast the driver gives it back).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Any

__all__ = ["BACKENDS", "Block", "NoBackend", "OutOfMemory", "allocate"]

MIB = 1024 * 1024
BACKENDS = ("torch", "cupy", "cuda")

_CUDA_SUCCESS = 0
_CUDA_ERROR_OUT_OF_MEMORY = 2


class OutOfMemory(Exception):
    """The allocation did not fit on the device."""


class NoBackend(Exception):
    """No way to allocate GPU memory here (the message says what each backend lacked)."""


@dataclass
class Block:
    """An allocation: which backend made it, how big, and the object that keeps it alive."""

    backend: str
    nbytes: int
    keep: Any = None


def allocate(mib: int, device: int = 0, backend: str = "auto") -> Block:
    """``mib`` MiB (at least one byte, so a context-only holder runs the same code) on
    CUDA device ``device`` (an ordinal after CUDA_VISIBLE_DEVICES), written once."""
    nbytes = max(mib * MIB, 1)
    names = BACKENDS if backend == "auto" else (backend,)
    missing = []
    for name in names:
        try:
            return _ALLOCATORS[name](nbytes, device)
        except NoBackend as exc:
            missing.append(f"{name}: {exc}")
    raise NoBackend("; ".join(missing))


def _torch(nbytes: int, device: int) -> Block:
    try:
        import torch  # type: ignore[import-not-found,unused-ignore]
    except ImportError as exc:
        raise NoBackend(f"not importable ({exc})") from exc
    if not torch.cuda.is_available():
        raise NoBackend("torch.cuda.is_available() is False")
    torch.cuda.set_device(device)
    try:
        block = torch.ones(nbytes, dtype=torch.uint8, device=f"cuda:{device}")
        torch.cuda.synchronize()
    except torch.cuda.OutOfMemoryError as exc:
        raise OutOfMemory(str(exc)) from exc
    return Block("torch", nbytes, block)


def _cupy(nbytes: int, device: int) -> Block:
    try:
        import cupy  # type: ignore[import-not-found,unused-ignore]
    except ImportError as exc:
        raise NoBackend(f"not importable ({exc})") from exc
    cupy.cuda.Device(device).use()
    try:
        block = cupy.ones(nbytes, dtype=cupy.uint8)
        cupy.cuda.Device(device).synchronize()
    except cupy.cuda.memory.OutOfMemoryError as exc:
        raise OutOfMemory(str(exc)) from exc
    return Block("cupy", nbytes, block)


def _cuda(nbytes: int, device: int) -> Block:
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError as exc:
        raise NoBackend(f"libcuda.so.1 not loadable ({exc})") from exc

    def call(what: str, rc: int) -> None:
        if rc == _CUDA_SUCCESS:
            return
        name = ctypes.c_char_p()
        lib.cuGetErrorName(rc, ctypes.byref(name))
        text = f"{what} failed: {(name.value or b'?').decode()} ({rc})"
        if rc == _CUDA_ERROR_OUT_OF_MEMORY:
            raise OutOfMemory(text)
        raise NoBackend(text)

    lib.cuMemAlloc_v2.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.c_size_t]
    lib.cuMemsetD8_v2.argtypes = [ctypes.c_uint64, ctypes.c_ubyte, ctypes.c_size_t]
    call("cuInit", lib.cuInit(0))
    dev = ctypes.c_int()
    call("cuDeviceGet", lib.cuDeviceGet(ctypes.byref(dev), device))
    ctx = ctypes.c_void_p()
    call("cuDevicePrimaryCtxRetain", lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev))
    call("cuCtxSetCurrent", lib.cuCtxSetCurrent(ctx))
    ptr = ctypes.c_uint64()
    call("cuMemAlloc", lib.cuMemAlloc_v2(ctypes.byref(ptr), nbytes))
    call("cuMemsetD8", lib.cuMemsetD8_v2(ptr, 1, nbytes))
    call("cuCtxSynchronize", lib.cuCtxSynchronize())
    return Block("cuda", nbytes, (lib, ctx, ptr))


_ALLOCATORS = {"torch": _torch, "cupy": _cupy, "cuda": _cuda}
