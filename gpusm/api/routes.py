"""The HTTP endpoints: thin, blocking (run in the threadpool), one coordinator verb each.

Every POST needs the bearer token. Names in paths and bodies are looked up in the
config; an unknown one is a 404 problem. Errors leave as problem details
(:mod:`gpusm.wire`). Answers are encoded by :func:`gpusm.wire.to_json`, and their
OpenAPI schemas come from the same result types.
"""

from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Path, Query, Request, Security
from fastapi.responses import Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from gpusm.api.problems import HttpProblem
from gpusm.api.schemas import (
    ActionRequest,
    EnsureRequest,
    PhaseRequest,
    ReleaseRequest,
    StartRequest,
)
from gpusm.api.security import bearer_matches
from gpusm.api.state import ApiState
from gpusm.api.stream import build_stream_router
from gpusm.domain.policy import Plan
from gpusm.engine.coordinator import Coordinator
from gpusm.ports import EventQuery
from gpusm.results import PhaseResult, ReloadResult, ServiceStatus, StopNote
from gpusm.version import VERSION as __version__
from gpusm.wire import (
    DaemonStatus,
    EventPage,
    Health,
    Problem,
    Released,
    ReleasedAll,
    Renewed,
    to_json,
)

__all__ = ["build_router", "only_once", "problem_responses", "utc_query"]

_DESCRIPTIONS = {
    400: "The body could not be parsed",
    401: "Missing or wrong bearer token",
    404: "Unknown phase or service",
    409: "Refused: insufficient VRAM, illegal transition or conflict",
    421: "Host header is not local",
    422: "Invalid request",
    500: "Internal error",
    502: "The service failed to start or stop",
    503: "Recovering, shutting down, or the GPU cannot be read",
    504: "Timed out",
}
_ALWAYS = (421, 422, 500, 503)
_WRITE = (*_ALWAYS, 400, 401, 409)
_TIME: dict[str, Any] = {"format": "date-time"}
_MAX_SEQ = 2**62
Name = Annotated[str, Path(min_length=1, max_length=200)]


def problem_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for problem responses with these status codes."""
    return {c: {"model": Problem, "description": _DESCRIPTIONS[c]} for c in sorted(set(codes))}


def utc_query(value: str | None, name: str) -> datetime | None:
    """An RFC 3339 / ISO 8601 time as UTC; 422 for anything else (never a timestamp)."""
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value.strip().upper())
        # A time without a zone is UTC, like every time gpusm records.
        if parsed.tzinfo is None:
            return parsed.replace(tzinfo=UTC)
        return parsed.astimezone(UTC)
    except (OverflowError, ValueError) as exc:
        raise HttpProblem(
            "invalid-request",
            f"{name}: {value!r} is not an ISO 8601 time in range, e.g. 2026-01-31T12:00Z ({exc})",
        ) from exc


def only_once(*names: str) -> Any:
    """A dependency that refuses a repeated single-valued query parameter (422)."""

    async def check(request: Request) -> None:
        for name in names:
            if len(request.query_params.getlist(name)) > 1:
                raise HttpProblem("invalid-request", f"{name}: give it at most once")

    return Depends(check)


def _json(value: Any) -> Response:
    """A result type as the JSON answer (see :func:`gpusm.wire.to_json`)."""
    return Response(to_json(value), media_type="application/json")


def _service(coordinator: Coordinator, name: str) -> Response:
    for svc in coordinator.status().services:
        if svc.name == name:
            return _json(svc)
    raise AssertionError(f"service {name} vanished from status")  # pragma: no cover


def build_router(state: ApiState) -> APIRouter:
    """The API's routes, bound to ``state``."""
    router = APIRouter()
    coord, write = _guards(state)
    _status_routes(router, state, coord)
    _write_routes(router, state, coord, write)
    _query_routes(router, state, coord)
    router.include_router(
        build_stream_router(
            state,
            coord,
            problem_responses(*_ALWAYS),
            [only_once("service", "after_seq", "heartbeat_s")],
        )
    )
    return router


def _guards(state: ApiState) -> tuple[Any, dict[str, Any]]:
    """The dependency that yields the recovered coordinator (else 503), and the route
    options that make a route need the bearer token."""
    bearer = HTTPBearer(
        auto_error=False, description="The token from $GPUSM_TOKEN or the api-token file"
    )

    async def authorized(
        request: Request, _: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)]
    ) -> None:
        if not bearer_matches(request.headers.get("authorization"), state.token):
            raise HttpProblem(
                "unauthorized",
                "missing or wrong bearer token; send Authorization: Bearer <token> "
                "with the token from $GPUSM_TOKEN or the daemon's api-token file",
                headers={"WWW-Authenticate": 'Bearer realm="gpusm"'},
            )

    async def coordinator() -> Coordinator:
        found = state.coordinator
        if found is None:
            raise state.unavailable()
        return found

    return Depends(coordinator), {"dependencies": [Depends(authorized)]}


def _status_routes(router: APIRouter, state: ApiState, coord: Any) -> None:
    Coord = Annotated[Coordinator, coord]

    @router.get("/healthz", response_model=Health, tags=["daemon"])
    async def healthz() -> Response:
        """Liveness; answers even while recovering (``status``: recovering)."""
        return _json(
            Health(
                status=state.phase,
                recovered=state.coordinator is not None,
                version=__version__,
                error=None if state.error is None else str(state.error),
            )
        )

    @router.get("/gpu/status", response_model=DaemonStatus, responses=problem_responses(*_ALWAYS))
    async def status(coord: Coord) -> Response:
        """Devices, services (state, pid, VRAM, leases, time in state) and leases now, and
        how each webhook's deliveries stand (``webhooks``: pending events, failures)."""
        return Response(await state.status_json(coord), media_type="application/json")


def _write_routes(router: APIRouter, state: ApiState, coord: Any, write: dict[str, Any]) -> None:
    Coord = Annotated[Coordinator, coord]

    @router.post(
        "/gpu/phase",
        response_model=PhaseResult,
        responses=problem_responses(*_WRITE, 404, 502, 504),
        **write,
    )
    def phase(body: PhaseRequest, coord: Coord) -> Response:
        """Enter a phase: block until exactly its services are healthy for ``client``."""
        result = coord.enter_phase(
            body.phase, body.client, body.timeout, body.priority, state.config.api.lease_ttl_s
        )
        state.metrics.observe_phase(result)
        return _json(result)

    @router.post(
        "/gpu/services/{name}/ensure",
        response_model=PhaseResult,
        responses=problem_responses(*_WRITE, 404, 502, 504),
        **write,
    )
    def ensure(
        name: Name, coord: Coord, body: Annotated[EnsureRequest | None, Body()] = None
    ) -> Response:
        """Make one service healthy for ``client``; its lease becomes just that service."""
        body = body or EnsureRequest()
        result = coord.ensure_service(name, body.client, body.timeout, state.config.api.lease_ttl_s)
        state.metrics.observe_phase(result)
        return _json(result)

    @router.post(
        "/gpu/services/{name}/start",
        response_model=ServiceStatus,
        responses=problem_responses(*_WRITE, 404, 502, 504),
        **write,
    )
    def start(
        name: Name, coord: Coord, body: Annotated[StartRequest | None, Body()] = None
    ) -> Response:
        """Start one service without a lease; block until healthy; return its status."""
        body = body or StartRequest()
        coord.start_service(name, body.by, body.timeout)
        return _service(coord, name)

    @router.post(
        "/gpu/services/{name}/stop",
        response_model=StopNote,
        responses=problem_responses(*_WRITE, 404, 502, 504),
        **write,
    )
    def stop(
        name: Name, coord: Coord, body: Annotated[ActionRequest | None, Body()] = None
    ) -> Response:
        """Stop one service and wait until its VRAM is back."""
        return _json(coord.stop_service(name, (body or ActionRequest()).by))

    @router.post(
        "/gpu/services/{name}/park",
        response_model=StopNote,
        responses=problem_responses(*_WRITE, 404, 502, 504),
        **write,
    )
    def park(
        name: Name, coord: Coord, body: Annotated[ActionRequest | None, Body()] = None
    ) -> Response:
        """Park one service (it keeps its process, gives its VRAM back) and wait until the
        GPU shows it; ``action`` is "stop" when the park failed and it was stopped."""
        return _json(coord.park_service(name, (body or ActionRequest()).by))

    @router.post(
        "/gpu/services/{name}/reset",
        response_model=ServiceStatus,
        responses=problem_responses(*_WRITE, 404),
        **write,
    )
    def reset(
        name: Name, coord: Coord, body: Annotated[ActionRequest | None, Body()] = None
    ) -> Response:
        """Clear a service that gave up (``failed``) so it may start again."""
        coord.reset_service(name, (body or ActionRequest()).by)
        return _service(coord, name)

    @router.post(
        "/gpu/release",
        response_model=Released,
        responses=problem_responses(*_WRITE),
        **write,
    )
    def release(body: ReleaseRequest, coord: Coord) -> Response:
        """Drop a client's lease; its services stay warm until their room is needed."""
        coord.release(body.client)
        return _json(Released(body.client))

    @router.post(
        "/gpu/reload",
        response_model=ReloadResult,
        responses=problem_responses(*_WRITE),
        **write,
    )
    def reload(coord: Coord, body: Annotated[ActionRequest | None, Body()] = None) -> Response:
        """Read the config file again and apply it without a restart (see README,
        "Changing the config"); 422 ``reload-refused`` leaves the running config as it was."""
        return _json(state.reload((body or ActionRequest()).by))

    @router.post(
        "/gpu/leases/renew",
        response_model=Renewed,
        responses=problem_responses(*_WRITE),
        **write,
    )
    def renew(body: ReleaseRequest, coord: Coord) -> Response:
        """The client is alive: its lease's TTL starts again (``renewed`` false: it has
        none any more, it expired or was revoked)."""
        renewed = coord.renew(body.client)
        expires = coord.lease_expires_s(body.client) if renewed else None
        return _json(Renewed(body.client, renewed, expires))

    @router.post(
        "/gpu/release-all",
        response_model=ReleasedAll,
        responses=problem_responses(*_WRITE, 502, 504),
        **write,
    )
    def release_all(coord: Coord, body: Annotated[ActionRequest | None, Body()] = None) -> Response:
        """Drop every lease and stop every running service."""
        notes = coord.release_all((body or ActionRequest()).by)
        return _json(ReleasedAll(tuple(notes)))


def _query_routes(router: APIRouter, state: ApiState, coord: Any) -> None:
    Coord = Annotated[Coordinator, coord]

    @router.get(
        "/gpu/plan/{phase}",
        response_model=Plan,
        responses=problem_responses(*_ALWAYS, 404),
        dependencies=[only_once("client", "priority")],
    )
    def plan(
        phase: Name,
        coord: Coord,
        client: Annotated[str, Query(max_length=128)] = "default",
        priority: Annotated[int | None, Query(ge=-(10**9), le=10**9)] = None,
    ) -> Response:
        """Dry run: what entering ``phase`` would stop and start, or why it cannot fit."""
        return _json(coord.plan_phase(phase, client, priority))

    @router.get(
        "/gpu/events",
        response_model=EventPage,
        responses=problem_responses(*_ALWAYS),
        dependencies=[only_once("service", "since", "until", "limit", "after_seq")],
    )
    def events(
        coord: Coord,
        # Not nullable in the spec: a query value is always text, and a spec that allows
        # null makes a fuzzer expect "true" (a "boolean") to be refused.
        type: Annotated[list[str], Query(max_length=50, default_factory=list)],
        service: Annotated[str, Query(max_length=200)] = "",
        since: Annotated[str | None, Query(max_length=64, json_schema_extra=_TIME)] = None,
        until: Annotated[str | None, Query(max_length=64, json_schema_extra=_TIME)] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        after_seq: Annotated[int, Query(ge=0, le=_MAX_SEQ)] = 0,
    ) -> Response:
        """Events oldest first after ``after_seq``; ``next_after_seq`` pages on (null: no more)."""
        query = EventQuery(
            stream=service or None,
            types=type or None,
            since=utc_query(since, "since"),
            until=utc_query(until, "until"),
            after_seq=after_seq,
            limit=limit,
        )
        found = coord.events(query)
        next_after = found[-1].seq if len(found) == limit else None
        return _json(EventPage(tuple(found), next_after))

    @router.get(
        "/metrics",
        response_class=Response,
        responses={
            200: {"content": {"text/plain": {"schema": {"type": "string"}}}},
            **problem_responses(*_ALWAYS),
        },
        tags=["daemon"],
    )
    def metrics(_: Coord) -> Response:
        """Prometheus text exposition (gauges now; counters over the whole event log)."""
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_PLAIN_0_0_4)
