"""What travels between ``gpusm serve`` and its clients, described once.

The API (:mod:`gpusm.api`) encodes with this module and the client
(:mod:`gpusm.client`) decodes with it; neither imports the other. No web framework is
imported here (pydantic only).

**Result shapes.** The API answers with the same frozen dataclasses the in-process
coordinator returns (:class:`~gpusm.results.PhaseResult`, :class:`~gpusm.results.Status`,
:class:`~gpusm.results.ServiceStatus`, :class:`~gpusm.results.StopNote`,
:class:`~gpusm.domain.policy.Plan`) plus the few envelopes below (:class:`Health`,
:class:`Released`, :class:`ReleasedAll`, :class:`EventPage` of
:class:`~gpusm.domain.events.RecordedEvent`). :func:`to_json` and :func:`from_json`
convert them through pydantic ``TypeAdapter`` s over those dataclasses, and FastAPI
derives the OpenAPI schemas from the same types.

**Errors.** Every refusal is an RFC 9457 problem document. :data:`PROBLEMS` is the one
table of problem types: ``type`` URI, HTTP status, title, the error class a client
raises, and how that error's constructor arguments travel as extension members.

=====================  ======  ===================  ======================================
type (``urn:gpusm:``)  status  client raises        raised for
=====================  ======  ===================  ======================================
unknown-name           404     UnknownName          a phase or service the config lacks
insufficient-vram      409     InsufficientVram     cannot fit (``need_mib``, ``free_mib``…)
illegal-transition     409     IllegalTransition    a trigger the service's state forbids
concurrency-conflict   409     ConcurrencyConflict  another writer appended first
operation-refused      409     GpusmError           any other refusal (e.g. closing)
request-timeout        504     RequestTimeout       no finish before the deadline
vram-not-reclaimed     504     VramNotReclaimed     memory held after the settle timeout
service-start-failed   502     ServiceStartFailed   did not launch or never became healthy
service-stop-failed    502     ServiceStopFailed    could not be stopped
gpu-unreadable         503     GpuProbeError        NVML or the simulated GPU unreadable
coordinator-busy       503     CoordinatorBusy      another coordinator owns the state dir
store-error            500     StoreError           the event store failed
config-error           500     GpusmError           the daemon's config is wrong
recovering             503     GpusmError           recovery not finished (``Retry-After``)
recovery-failed        503     GpusmError           recovery failed; the daemon stops
stopping               503     GpusmError           shutting down (``Retry-After``)
unauthorized           401     GpusmError           missing or wrong bearer token
forbidden              403     GpusmError           proxy: the key may not use that service
misdirected-request    421     GpusmError           a non-local ``Host`` (DNS rebinding)
invalid-request        422     GpusmError           body or query does not match the schema
internal-error         500     GpusmError           a bug: anything unexpected
service-unavailable    503     GpusmError           proxy: service not ready in ``wait_s``
upstream-unreachable   502     GpusmError           proxy: the service's upstream refused
upstream-timeout       504     GpusmError           proxy: the upstream did not answer
content-too-large      413     GpusmError           proxy: body too large to read the model
=====================  ======  ===================  ======================================

Start failures are 502 (Bad Gateway) because the failing party is the upstream model
server, not the request: the same request may succeed after ``reset``. A client that
meets a problem type it does not know raises a plain :class:`~gpusm.errors.GpusmError`
naming the status and detail.

**Reaching the daemon.** :func:`parse_listen` (``HOST:PORT``) and :func:`read_token`
(``$GPUSM_TOKEN`` or the token file), shared by ``gpusm serve`` and the client.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError

from gpusm.config import split_listen
from gpusm.domain.events import RecordedEvent
from gpusm.domain.policy import Plan
from gpusm.errors import (
    ConcurrencyConflict,
    ConfigError,
    CoordinatorBusy,
    GpuProbeError,
    GpusmError,
    IllegalTransition,
    InsufficientVram,
    ReloadRefused,
    RequestTimeout,
    ServiceRuntimeError,
    ServiceStartFailed,
    ServiceStopFailed,
    SimOutOfMemory,
    StoreError,
    UnknownName,
    VramNotReclaimed,
)
from gpusm.ports import WebhookStatus
from gpusm.results import PhaseResult, ReloadResult, ServiceStatus, Status, StopNote

__all__ = [
    "PROBLEMS",
    "PROBLEM_MEDIA_TYPE",
    "SHAPES",
    "TOKEN_ENV",
    "DaemonStatus",
    "EventPage",
    "Health",
    "Listen",
    "Problem",
    "ProblemType",
    "Released",
    "Renewed",
    "ReleasedAll",
    "WebhookDelivery",
    "error_from_problem",
    "from_json",
    "parse_listen",
    "problem_body",
    "problem_for_error",
    "problem_type",
    "read_token",
    "read_token_file",
    "to_json",
    "webhook_body",
]

T = TypeVar("T")


# ================================================================ result shapes
@dataclass(frozen=True, kw_only=True)
class Health:
    """Liveness: ``status`` is ``ok``, ``recovering``, ``failed`` or ``stopping``."""

    service: str = "gpusm"
    status: str
    recovered: bool
    version: str
    error: str | None = None


@dataclass(frozen=True)
class Released:
    """The client whose lease was dropped (its services stay warm)."""

    client: str


@dataclass(frozen=True)
class Renewed:
    """Whether the client's lease was renewed (False: it holds none; enter a phase)."""

    client: str
    renewed: bool
    expires_in_s: float | None = None


@dataclass(frozen=True)
class ReleasedAll:
    """Every service stopped by a release of everything."""

    stopped: tuple[StopNote, ...]


@dataclass(frozen=True)
class EventPage:
    """A page of events in ``seq`` order; pass ``next_after_seq`` as ``after_seq`` for more.

    ``next_after_seq`` is null when this page is the last one for now.
    """

    events: tuple[RecordedEvent, ...]
    next_after_seq: int | None


@dataclass(frozen=True)
class DaemonStatus(Status):
    """``GET /gpu/status`` of the daemon: :class:`~gpusm.results.Status` plus how each
    webhook's deliveries stand (``notify:``; never a secret)."""

    webhooks: tuple[WebhookStatus, ...] = ()


@dataclass(frozen=True)
class WebhookDelivery:
    """The JSON body of one webhook POST: events in ``seq`` order, shaped as in
    :class:`EventPage`."""

    webhook: str
    events: tuple[RecordedEvent, ...]


def webhook_body(webhook: str, events: Sequence[RecordedEvent]) -> bytes:
    """The body of a webhook POST of ``events`` (see :class:`WebhookDelivery`)."""
    return to_json(WebhookDelivery(webhook, tuple(events)))


# Every type an answer of the API has (besides problems and /metrics' text).
SHAPES: tuple[type, ...] = (
    EventPage,
    Health,
    PhaseResult,
    Plan,
    Released,
    ReleasedAll,
    Renewed,
    ReloadResult,
    ServiceStatus,
    Status,
    StopNote,
)


_ADAPTERS: dict[type, TypeAdapter[Any]] = {}


def _adapter(kind: type) -> TypeAdapter[Any]:
    found = _ADAPTERS.get(kind)
    if found is None:
        # Built on first use (a few ms each); a race builds one twice, harmlessly.
        found = _ADAPTERS[kind] = TypeAdapter(kind)
    return found


def to_json(value: Any) -> bytes:
    """``value`` (one of :data:`SHAPES`) as compact JSON, the way the API sends it."""
    return _adapter(type(value)).dump_json(value)


def from_json(kind: type[T], data: Any) -> T:
    """A ``kind`` rebuilt from decoded JSON (or JSON text); GpusmError if it does not fit."""
    adapter = _adapter(kind)
    try:
        if isinstance(data, str | bytes | bytearray):
            return cast(T, adapter.validate_json(data))
        return cast(T, adapter.validate_python(data))
    except ValidationError as exc:
        raise GpusmError(
            f"the gpusm daemon's answer is not a {kind.__name__} ({exc.error_count()} "
            f"errors, first: {exc.errors()[0]['msg']}); are client and daemon the same version?"
        ) from exc


# ================================================================ errors
PROBLEM_MEDIA_TYPE = "application/problem+json"
_PREFIX = "urn:gpusm:"


class Problem(BaseModel):
    """An RFC 9457 problem document; extra fields carry the error's numbers."""

    model_config = ConfigDict(extra="allow")

    type: str
    title: str
    status: int
    detail: str


class _Members:
    """Typed reads of a problem document; a missing or malformed member reads as empty."""

    def __init__(self, status: int, doc: Mapping[str, Any]) -> None:
        self.status = status
        self.doc = doc
        self.detail = str(doc.get("detail") or doc.get("title") or f"HTTP {status}")

    def text(self, key: str, default: str = "") -> str:
        return str(self.doc.get(key, default))

    def number(self, key: str) -> int:
        return _int(self.doc.get(key))

    def seconds(self, key: str) -> float:
        value = self.doc.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float):
            return 0.0
        return float(value)

    def names(self, key: str) -> list[str]:
        value = self.doc.get(key)
        return [str(v) for v in value] if isinstance(value, list) else []

    def holders(self, key: str) -> dict[int, int]:
        value = self.doc.get(key)
        held = value if isinstance(value, dict) else {}
        return {int(pid): _int(mib) for pid, mib in held.items() if str(pid).isdigit()}


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _no_members(_: Any) -> dict[str, Any]:
    return {}


def _runtime_members(exc: ServiceRuntimeError) -> dict[str, Any]:
    # ServiceRuntimeError prefixes its message with the service; the client adds it back.
    return {"service": exc.service, "reason": str(exc).removeprefix(f"service {exc.service!r}: ")}


@dataclass(frozen=True)
class ProblemType:
    """One row of the error table (see the module docstring).

    ``error`` is what a client raises for this type (None: a plain GpusmError naming the
    status), and also what the server encodes as this type, together with
    ``raised_for`` (subclasses without a type of their own). ``members`` gives an
    error's extension members; ``rebuild`` makes the error again from them (default:
    ``error(detail)``).
    """

    slug: str
    status: int
    title: str
    error: type[GpusmError] | None = None
    raised_for: tuple[type[GpusmError], ...] = ()
    members: Callable[[Any], dict[str, Any]] = _no_members
    rebuild: Callable[[_Members], GpusmError] | None = None

    @property
    def uri(self) -> str:
        """The ``type`` member (``urn:gpusm:insufficient-vram``)."""
        return _PREFIX + self.slug

    def decode(self, found: _Members) -> GpusmError:
        """The error a problem document of this type stands for."""
        if self.rebuild is not None:
            return self.rebuild(found)
        if self.error is not None:
            return self.error(found.detail)
        return GpusmError(f"gpusm daemon answered {found.status}: {found.detail}")


_TABLE = (
    ProblemType(
        "unknown-name",
        404,
        "Unknown name",
        UnknownName,
        members=lambda e: {"kind": e.kind, "name": e.name, "known": e.known},
        rebuild=lambda m: UnknownName(m.text("kind", "name"), m.text("name"), m.names("known")),
    ),
    ProblemType(
        "insufficient-vram",
        409,
        "Insufficient VRAM",
        InsufficientVram,
        members=lambda e: {
            "need_mib": e.need_mib,
            "free_mib": e.free_mib,
            "foreign_mib": e.foreign_mib,
            "blocked_by": list(e.blocked_by),
        },
        rebuild=lambda m: InsufficientVram(
            m.number("need_mib"),
            m.number("free_mib"),
            m.number("foreign_mib"),
            m.names("blocked_by"),
        ),
    ),
    ProblemType(
        "illegal-transition",
        409,
        "Illegal transition",
        IllegalTransition,
        members=lambda e: {"service": e.service, "trigger": e.trigger, "state": e.state},
        rebuild=lambda m: IllegalTransition(m.text("service"), m.text("trigger"), m.text("state")),
    ),
    ProblemType(
        "concurrency-conflict",
        409,
        "Concurrency conflict",
        ConcurrencyConflict,
        members=lambda e: {"stream": e.stream, "version": e.version},
        rebuild=lambda m: ConcurrencyConflict(m.text("stream"), m.number("version")),
    ),
    ProblemType("operation-refused", 409, "Operation refused", GpusmError),
    ProblemType("request-timeout", 504, "Request timed out", RequestTimeout),
    ProblemType(
        "vram-not-reclaimed",
        504,
        "VRAM not reclaimed",
        VramNotReclaimed,
        members=lambda e: {
            "service": e.service,
            "waited_s": e.waited_s,
            "holders": {str(pid): mib for pid, mib in e.holders.items()},
            "free_mib": e.free_mib,
        },
        rebuild=lambda m: VramNotReclaimed(
            m.text("service"), m.seconds("waited_s"), m.holders("holders"), m.number("free_mib")
        ),
    ),
    ProblemType(
        "service-start-failed",
        502,
        "Service start failed",
        ServiceStartFailed,
        raised_for=(ServiceRuntimeError,),
        members=_runtime_members,
        rebuild=lambda m: ServiceStartFailed(m.text("service"), m.text("reason") or m.detail),
    ),
    ProblemType(
        "service-stop-failed",
        502,
        "Service stop failed",
        ServiceStopFailed,
        members=_runtime_members,
        rebuild=lambda m: ServiceStopFailed(m.text("service"), m.text("reason") or m.detail),
    ),
    ProblemType("gpu-unreadable", 503, "GPU unreadable", GpuProbeError, (SimOutOfMemory,)),
    ProblemType("coordinator-busy", 503, "Coordinator busy", CoordinatorBusy),
    ProblemType("reload-refused", 422, "Reload refused", ReloadRefused),
    ProblemType("store-error", 500, "Event store error", StoreError),
    ProblemType("config-error", 500, "Configuration error", raised_for=(ConfigError,)),
    # HTTP-level refusals: raised by the API itself, never by the coordinator.
    ProblemType("recovering", 503, "Recovering"),
    ProblemType("recovery-failed", 503, "Recovery failed"),
    ProblemType("stopping", 503, "Shutting down"),
    ProblemType("unauthorized", 401, "Unauthorized"),
    ProblemType("forbidden", 403, "Forbidden"),
    ProblemType("misdirected-request", 421, "Misdirected request"),
    ProblemType("invalid-request", 422, "Invalid request"),
    ProblemType("internal-error", 500, "Internal server error"),
    # The proxy's refusals (gpusm.api.proxy): the service or its upstream, not the request.
    ProblemType("service-unavailable", 503, "Service unavailable"),
    ProblemType("upstream-unreachable", 502, "Upstream unreachable"),
    ProblemType("upstream-timeout", 504, "Upstream timed out"),
    ProblemType("content-too-large", 413, "Content too large"),
)

PROBLEMS: Mapping[str, ProblemType] = {row.slug: row for row in _TABLE}

# The server's side of the table: error class -> row (a subclass's own row wins).
_BY_CLASS: dict[type[GpusmError], ProblemType] = {
    cls: row for row in _TABLE for cls in ((row.error,) if row.error else ()) + row.raised_for
}


def problem_type(slug: str) -> str:
    """The ``type`` URI of the problem named ``slug`` (``urn:gpusm:insufficient-vram``)."""
    return _PREFIX + slug


def problem_body(slug: str, detail: str, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The problem document of type ``slug`` (status and title from :data:`PROBLEMS`)."""
    row = PROBLEMS[slug]
    return {
        "type": row.uri,
        "title": row.title,
        "status": row.status,
        "detail": detail,
        **(extra or {}),
    }


def problem_for_error(exc: GpusmError) -> tuple[int, dict[str, Any]]:
    """The status code and problem document for a gpusm error."""
    row = next(_BY_CLASS[cls] for cls in type(exc).__mro__ if cls in _BY_CLASS)
    return row.status, problem_body(row.slug, str(exc), row.members(exc))


def error_from_problem(status: int, problem: Mapping[str, Any]) -> GpusmError:
    """The gpusm error a problem document stands for (the class the server raised).

    Unknown or foreign problems become a plain :class:`~gpusm.errors.GpusmError` whose
    message carries the status and detail.
    """
    uri = str(problem.get("type", ""))
    row = PROBLEMS.get(uri.removeprefix(_PREFIX)) if uri.startswith(_PREFIX) else None
    found = _Members(status, problem)
    if row is None:
        return GpusmError(f"gpusm daemon answered {status}: {found.detail}")
    return row.decode(found)


# ================================================================ reaching the daemon
TOKEN_ENV = "GPUSM_TOKEN"


@dataclass(frozen=True)
class Listen:
    """Where to listen: a host (name or address, no brackets) and a port (0 = any free)."""

    host: str
    port: int

    @property
    def url(self) -> str:
        """The base URL a local client uses (a wildcard address becomes loopback)."""
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(self.host, self.host)
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"


def parse_listen(value: str, source: str = "api.listen") -> Listen:
    """``HOST:PORT`` or ``[IPv6]:PORT``; ConfigError naming ``source`` if malformed.

    The syntax is :func:`gpusm.config.split_listen`'s, which also checks ``api.listen``.
    """
    found = split_listen(value)
    if found is None:
        raise ConfigError(
            source, "", f"{value!r} is not HOST:PORT", "write e.g. 127.0.0.1:7723 or [::1]:7723"
        )
    return Listen(*found)


def read_token_file(path: Path) -> str:
    """The token in ``path``; ConfigError if unreadable, empty, or readable by others."""
    try:
        info = path.stat()
        text = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            str(path), "api.token_file", f"cannot read the API token ({exc})", "fix its permissions"
        ) from exc
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            str(path),
            "api.token_file",
            f"the API token is readable by other users (mode {stat.S_IMODE(info.st_mode):04o})",
            f"chmod 600 {path}",
        )
    if not text:
        raise ConfigError(
            str(path), "api.token_file", "the API token file is empty", f"delete {path} to renew it"
        )
    return text


def read_token(path: Path | None) -> str | None:
    """``$GPUSM_TOKEN``, else the token in ``path`` if it exists, else None."""
    env = os.environ.get(TOKEN_ENV, "").strip()
    if env:
        return env
    if path is None or not path.exists():
        return None
    return read_token_file(path)
