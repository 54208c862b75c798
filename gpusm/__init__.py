"""gpusm: run several GPU-hungry services on one GPU without running out of VRAM."""

from gpusm.config import Config, load_config
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

__version__ = "0.1.0"

__all__ = [
    "ConcurrencyConflict",
    "Config",
    "ConfigError",
    "CoordinatorBusy",
    "GpuProbeError",
    "GpusmError",
    "IllegalTransition",
    "InsufficientVram",
    "RequestTimeout",
    "ServiceRuntimeError",
    "ServiceStartFailed",
    "ServiceStopFailed",
    "SimOutOfMemory",
    "StoreError",
    "UnknownName",
    "VramNotReclaimed",
    "__version__",
    "load_config",
]
