"""The public API changes only on purpose: this list is the contract."""

from __future__ import annotations

import gpusm

PUBLIC = [
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


def test_public_names_are_pinned_and_sorted() -> None:
    assert gpusm.__all__ == PUBLIC
    assert sorted(gpusm.__all__) == gpusm.__all__


def test_every_public_name_resolves() -> None:
    for name in gpusm.__all__:
        assert getattr(gpusm, name) is not None


def test_every_error_is_a_gpusm_error() -> None:
    for name in gpusm.__all__:
        value = getattr(gpusm, name)
        if isinstance(value, type) and issubclass(value, Exception):
            assert issubclass(value, gpusm.GpusmError), name
