"""Problem details (RFC 9457): gpusm errors to HTTP responses and back again.

The server turns every :class:`~gpusm.errors.GpusmError` into a JSON problem whose
``type`` names the error and whose extra fields carry its numbers; :func:`error_from_problem`
rebuilds the same error class on the client side, so a worker catches the same
exceptions whether it talks to the coordinator in-process or over HTTP.

This module does not import FastAPI, so :mod:`gpusm.client` stays light.

=====================  ======  =========================================================
type (``urn:gpusm:``)  status  raised for
=====================  ======  =========================================================
unknown-name           404     a phase or service the config does not define
insufficient-vram      409     the request cannot fit (``need_mib``, ``free_mib``, …)
illegal-transition     409     a trigger the service's state forbids
concurrency-conflict   409     another writer appended first
operation-refused      409     any other refusal (e.g. the coordinator is closing)
request-timeout        504     the request did not finish before its deadline
vram-not-reclaimed     504     memory still held after a stop's settle timeout
service-start-failed   502     the service did not launch or never became healthy
service-stop-failed    502     the service could not be stopped
gpu-unreadable         503     NVML or the simulated GPU could not be read
recovering             503     recovery has not finished yet (with ``Retry-After``)
recovery-failed        503     recovery failed; the daemon is shutting down
stopping               503     the daemon is shutting down (with ``Retry-After``)
unauthorized           401     missing or wrong bearer token
misdirected-request    421     a ``Host`` header that is not local (DNS rebinding)
invalid-request        422     a body or query that does not match the schema
store-error            500     the event store failed
internal-error         500     a bug: anything unexpected
=====================  ======  =========================================================

Start failures are 502 (Bad Gateway) because the failing party is the upstream model
server, not the request: the same request may succeed after ``reset``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

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

__all__ = [
    "PROBLEM_MEDIA_TYPE",
    "HttpProblem",
    "error_from_problem",
    "problem_for_error",
    "problem_type",
]

PROBLEM_MEDIA_TYPE = "application/problem+json"
_PREFIX = "urn:gpusm:"

_TITLES = {
    "unknown-name": "Unknown name",
    "insufficient-vram": "Insufficient VRAM",
    "illegal-transition": "Illegal transition",
    "concurrency-conflict": "Concurrency conflict",
    "operation-refused": "Operation refused",
    "request-timeout": "Request timed out",
    "vram-not-reclaimed": "VRAM not reclaimed",
    "service-start-failed": "Service start failed",
    "service-stop-failed": "Service stop failed",
    "gpu-unreadable": "GPU unreadable",
    "recovering": "Recovering",
    "recovery-failed": "Recovery failed",
    "stopping": "Shutting down",
    "unauthorized": "Unauthorized",
    "misdirected-request": "Misdirected request",
    "invalid-request": "Invalid request",
    "store-error": "Event store error",
    "config-error": "Configuration error",
    "coordinator-busy": "Coordinator busy",
    "internal-error": "Internal server error",
}


def problem_type(slug: str) -> str:
    """The ``type`` URI of the problem named ``slug`` (``urn:gpusm:insufficient-vram``)."""
    return _PREFIX + slug


class HttpProblem(Exception):
    """An HTTP-level refusal that is not a gpusm error (bad host, bad token, recovering…)."""

    def __init__(
        self,
        status: int,
        slug: str,
        detail: str,
        headers: Mapping[str, str] | None = None,
        **extra: Any,
    ) -> None:
        self.status = status
        self.slug = slug
        self.detail = detail
        self.headers = dict(headers or {})
        self.extra = extra
        super().__init__(detail)

    def body(self) -> dict[str, Any]:
        """The problem document."""
        return _body(self.status, self.slug, self.detail, self.extra)


def _body(status: int, slug: str, detail: str, extra: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "type": problem_type(slug),
        "title": _TITLES.get(slug, slug),
        "status": status,
        "detail": detail,
        **extra,
    }


def _runtime_reason(exc: ServiceRuntimeError) -> str:
    # ServiceRuntimeError prefixes its message with the service; the client adds it back.
    return str(exc).removeprefix(f"service {exc.service!r}: ")


def problem_for_error(exc: GpusmError) -> tuple[int, dict[str, Any]]:
    """The status code and problem document for a gpusm error (see the module table)."""
    status, slug, extra = _classify(exc)
    return status, _body(status, slug, str(exc), extra)


def _classify(exc: GpusmError) -> tuple[int, str, dict[str, Any]]:
    if isinstance(exc, UnknownName):
        return 404, "unknown-name", {"kind": exc.kind, "name": exc.name, "known": exc.known}
    if isinstance(exc, InsufficientVram):
        return (
            409,
            "insufficient-vram",
            {
                "need_mib": exc.need_mib,
                "free_mib": exc.free_mib,
                "foreign_mib": exc.foreign_mib,
                "blocked_by": list(exc.blocked_by),
            },
        )
    if isinstance(exc, IllegalTransition):
        return (
            409,
            "illegal-transition",
            {
                "service": exc.service,
                "trigger": exc.trigger,
                "state": exc.state,
            },
        )
    if isinstance(exc, ConcurrencyConflict):
        return 409, "concurrency-conflict", {"stream": exc.stream, "version": exc.version}
    if isinstance(exc, RequestTimeout):
        return 504, "request-timeout", {}
    if isinstance(exc, VramNotReclaimed):
        return (
            504,
            "vram-not-reclaimed",
            {
                "service": exc.service,
                "waited_s": exc.waited_s,
                "holders": {str(pid): mib for pid, mib in exc.holders.items()},
                "free_mib": exc.free_mib,
            },
        )
    if isinstance(exc, ServiceRuntimeError):
        slug = (
            "service-stop-failed" if isinstance(exc, ServiceStopFailed) else "service-start-failed"
        )
        return 502, slug, {"service": exc.service, "reason": _runtime_reason(exc)}
    if isinstance(exc, GpuProbeError | SimOutOfMemory):
        return 503, "gpu-unreadable", {}
    if isinstance(exc, StoreError):
        return 500, "store-error", {}
    if isinstance(exc, ConfigError):
        return 500, "config-error", {}
    if isinstance(exc, CoordinatorBusy):
        return 503, "coordinator-busy", {}
    return 409, "operation-refused", {}


def _int(value: Any, default: int = 0) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _strings(value: Any) -> list[str]:
    return [str(v) for v in value] if isinstance(value, list) else []


def error_from_problem(status: int, problem: Mapping[str, Any]) -> GpusmError:
    """The gpusm error a problem document stands for (the class the server raised).

    Unknown or foreign problems become a plain :class:`~gpusm.errors.GpusmError` whose
    message carries the status and detail.
    """
    kind = str(problem.get("type", ""))
    slug = kind.removeprefix(_PREFIX) if kind.startswith(_PREFIX) else ""
    detail = str(problem.get("detail") or problem.get("title") or f"HTTP {status}")
    service = str(problem.get("service", ""))
    if slug == "unknown-name":
        return UnknownName(
            str(problem.get("kind", "name")),
            str(problem.get("name", "")),
            _strings(problem.get("known")),
        )
    if slug == "insufficient-vram":
        return InsufficientVram(
            _int(problem.get("need_mib")),
            _int(problem.get("free_mib")),
            _int(problem.get("foreign_mib")),
            _strings(problem.get("blocked_by")),
        )
    if slug == "illegal-transition":
        return IllegalTransition(
            service, str(problem.get("trigger", "")), str(problem.get("state", ""))
        )
    if slug == "concurrency-conflict":
        return ConcurrencyConflict(str(problem.get("stream", "")), _int(problem.get("version")))
    if slug == "request-timeout":
        return RequestTimeout(detail)
    if slug == "vram-not-reclaimed":
        holders = problem.get("holders")
        held = holders if isinstance(holders, dict) else {}
        waited = problem.get("waited_s")
        return VramNotReclaimed(
            service,
            float(waited) if isinstance(waited, int | float) else 0.0,
            {int(pid): _int(mib) for pid, mib in held.items() if str(pid).isdigit()},
            _int(problem.get("free_mib")),
        )
    if slug in ("service-start-failed", "service-stop-failed"):
        cls = ServiceStartFailed if slug == "service-start-failed" else ServiceStopFailed
        return cls(service, str(problem.get("reason") or detail))
    simple: dict[str, type[GpusmError]] = {
        "gpu-unreadable": GpuProbeError,
        "store-error": StoreError,
        "coordinator-busy": CoordinatorBusy,
    }
    if slug in simple:
        return simple[slug](detail)
    if slug == "operation-refused":
        return GpusmError(detail)
    return GpusmError(f"gpusm daemon answered {status}: {detail}")
