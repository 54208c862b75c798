"""Runtimes: how service instances are started, watched and stopped.

``NativeRuntime`` runs local processes; ``MemoryRuntime`` is the in-memory fake for
tests. ``DockerRuntime`` lives in :mod:`gpusm.runtimes.docker` and is not imported
here, so that using gpusm without Docker never loads the docker SDK.
"""

from __future__ import annotations

from gpusm.runtimes.memory import MemoryRuntime
from gpusm.runtimes.native import NativeRuntime

__all__ = ["MemoryRuntime", "NativeRuntime"]
