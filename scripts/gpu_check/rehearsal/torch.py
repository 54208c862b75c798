"""A stand-in for torch's CUDA allocation that ``pynvml.py`` beside it reads (rehearsal only)."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pynvml

uint8 = "uint8"
CONTEXT_MIB = 500


class OutOfMemoryError(RuntimeError):
    pass


def _set_device(index: int) -> None: ...
def _synchronize() -> None: ...


cuda = SimpleNamespace(
    is_available=lambda: True,
    set_device=_set_device,
    synchronize=_synchronize,
    OutOfMemoryError=OutOfMemoryError,
)


def ones(nbytes: int, dtype: str, device: str) -> SimpleNamespace:
    mib = nbytes // pynvml.MIB + CONTEXT_MIB
    if sum(pynvml.held().values()) + mib > pynvml.total_mib():
        raise OutOfMemoryError(f"rehearsal: {mib} MiB do not fit")
    (pynvml._dir() / f"{os.getpid()}.mib").write_text(str(mib))
    return SimpleNamespace(nbytes=nbytes)
