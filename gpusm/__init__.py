"""gpusm: run several GPU-hungry services on one GPU without running out of VRAM.

Layers, lowest first (imports point down only; ``tests/test_architecture.py`` checks):
``domain/`` (pure) with config, errors, results -> ``ports`` -> adapters (``store/``,
``gpu/``, ``runtimes/``, ``health/``, ``procs``) beside ``engine/`` (use cases, ports
only) -> ``wire`` -> ``wiring`` (the composition root) -> ``api/``, ``client``, ``cli/``.
"""

# Wires Coordinator.from_config to the concrete adapters (the composition root).
import gpusm.wiring  # noqa: F401
from gpusm.client import Client
from gpusm.config import Config, load_config
from gpusm.engine.coordinator import Coordinator
from gpusm.errors import (
    ConcurrencyConflict,
    ConfigError,
    CoordinatorBusy,
    GpuProbeError,
    GpusmError,
    IllegalTransition,
    InsufficientVram,
    RequestTimeout,
    ServiceRuntimeError,
    ServiceStartFailed,
    ServiceStopFailed,
    SimOutOfMemory,
    StoreError,
    UnknownName,
    VramNotReclaimed,
)
from gpusm.ports import EventQuery
from gpusm.results import PhaseResult, Status, StopNote
from gpusm.version import VERSION

__version__ = VERSION

__all__ = [
    "Client",
    "ConcurrencyConflict",
    "Config",
    "ConfigError",
    "Coordinator",
    "CoordinatorBusy",
    "EventQuery",
    "GpuProbeError",
    "GpusmError",
    "IllegalTransition",
    "InsufficientVram",
    "PhaseResult",
    "RequestTimeout",
    "ServiceRuntimeError",
    "ServiceStartFailed",
    "ServiceStopFailed",
    "SimOutOfMemory",
    "Status",
    "StopNote",
    "StoreError",
    "UnknownName",
    "VramNotReclaimed",
    "__version__",
    "load_config",
]
