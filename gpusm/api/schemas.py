"""Request bodies of the HTTP API (pydantic models, published in OpenAPI).

Answers are the result types of :mod:`gpusm.wire` (one description, shared with the
client). Requests name phases, services and clients only: nothing in a request ever becomes a
command line, an image or a mount; those come from the config file alone.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "ActionRequest",
    "ClientName",
    "EnsureRequest",
    "PhaseRequest",
    "ReleaseRequest",
    "StartRequest",
]

# A name looked up in the config; anything else is a 404 (so it only needs to be bounded).
LookupName = Annotated[str, Field(min_length=1, max_length=200)]
# Client ids and "by" labels are recorded in events: printable and bounded.
ClientName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:@/+-]{0,127}$")]
# A day is far beyond any sensible phase switch; the bound keeps deadlines finite.
Timeout = Annotated[float, Field(gt=0, le=86400)]
Priority = Annotated[int, Field(ge=-(10**9), le=10**9)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PhaseRequest(_Request):
    """Enter a phase: make exactly its services healthy for ``client``."""

    phase: LookupName
    client: ClientName = "default"
    timeout: Timeout | None = None
    priority: Priority | None = None


class EnsureRequest(_Request):
    """Make one service healthy for ``client`` (its lease becomes that service)."""

    client: ClientName = "default"
    timeout: Timeout | None = None


class ActionRequest(_Request):
    """Who asks (recorded in the event log as ``by``)."""

    by: ClientName = "api"


class StartRequest(ActionRequest):
    """Start one service without a lease; ``timeout`` bounds the wait for health."""

    timeout: Timeout | None = None


class ReleaseRequest(_Request):
    """Drop one client's lease."""

    client: ClientName = "default"
