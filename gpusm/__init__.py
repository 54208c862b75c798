"""gpusm: run several GPU-hungry services on one GPU without running out of VRAM."""

from gpusm.client import Client
from gpusm.config import Config, load_config
from gpusm.coordinator import Coordinator
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

__version__ = "0.1.0"

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
