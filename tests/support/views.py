"""Reading a coordinator the way its users do: through its public views."""

from __future__ import annotations

from gpusm import Coordinator
from gpusm.results import ServiceStatus

__all__ = ["service_status", "state_of"]


def service_status(coordinator: Coordinator, name: str) -> ServiceStatus:
    """``name``'s row of :meth:`Coordinator.status`."""
    found = [s for s in coordinator.status().services if s.name == name]
    assert found, f"no service {name!r} in the status"
    return found[0]


def state_of(coordinator: Coordinator, name: str) -> str:
    """``name``'s state now, as the status reports it (``"healthy"``, ...)."""
    return service_status(coordinator, name).state
