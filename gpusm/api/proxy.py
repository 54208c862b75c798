"""The proxy on ``gpusm serve``: a program that knows only a model server's URL makes
gpusm run the right service.

* ``/svc/{service}/{path}`` (any method) goes to the service's upstream
  (``services.NAME.upstream``, default the origin of its HTTP health check) + ``/{path}``
  + the query.
* ``/v1/{path}`` (OpenAI) and ``/api/{path}`` (Ollama) go to the service that serves the
  model the request names (:mod:`gpusm.api.proxy_models`); the path is kept as it is.
  ``GET /v1/models`` lists the configured models and starts nothing.

Each request takes a lease of its own (client ``proxy:<key>:<request id>``) through
:meth:`~gpusm.engine.coordinator.Coordinator.ensure_service`: the same admission,
queue and preemption as a phase, waiting at most ``proxy.wait_s``; a refusal is a 503
problem with ``Retry-After``. The lease is held until the answer's last byte has been
sent (a preemption drains it, up to ``drain_timeout_s``, rather than cutting it off) and
released however the request ends. Every route needs the daemon's bearer token (the
``admin`` key).
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from functools import partial
from typing import Any

import anyio.to_thread
import httpx
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response

from gpusm.api.problems import HttpProblem
from gpusm.api.proxy_http import UPSTREAM_TIMEOUT, Relay, open_upstream
from gpusm.api.proxy_models import model_in_body, model_list, names_model_in_body, route_model
from gpusm.api.security import bearer_matches
from gpusm.api.state import ApiState
from gpusm.engine.coordinator import Coordinator
from gpusm.errors import GpusmError, InsufficientVram, RequestTimeout, UnknownName
from gpusm.results import PhaseResult

__all__ = ["MODEL_BODY_LIMIT", "build_proxy_router"]

_log = logging.getLogger("gpusm.api.proxy")

# A body read to find its model is held in memory: no bigger than this.
MODEL_BODY_LIMIT = 1 << 20
_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
# Retry-After when the service could not be made ready: about one more load's worth.
_RETRY_MIN_S = 1
_RETRY_MAX_S = 60


@dataclass(frozen=True)
class Caller:
    """Who sends a proxied request: the key it authenticated with.

    Only the daemon's own token (``admin``) exists for now; per-key priorities and
    allowed services (``api.keys``) will be fields here.
    """

    key: str


def _caller(state: ApiState, request: Request) -> Caller:
    if bearer_matches(request.headers.get("authorization"), state.token):
        return Caller("admin")
    raise HttpProblem(
        "unauthorized",
        "missing or wrong bearer token; the proxy needs Authorization: Bearer <token> "
        "with the token from $GPUSM_TOKEN or the daemon's api-token file",
        headers={"WWW-Authenticate": 'Bearer realm="gpusm"'},
    )


def _coordinator(state: ApiState) -> Coordinator:
    found = state.coordinator
    if found is None:
        raise state.unavailable()
    return found


def _retry_after(coordinator: Coordinator, service: str) -> str:
    load = coordinator.config.services[service].load_s or 0.0
    return str(min(_RETRY_MAX_S, max(_RETRY_MIN_S, math.ceil(load))))


class _Proxy:
    """The routes' shared part: the upstream client, leases, forwarding."""

    def __init__(self, state: ApiState) -> None:
        self.state = state
        self.http: httpx.AsyncClient | None = None

    @asynccontextmanager
    async def lifespan(self, _: FastAPI) -> AsyncIterator[None]:
        # No pooled connection outlives the server, and the environment's proxy
        # settings never apply: upstreams are this machine's services.
        async with httpx.AsyncClient(timeout=UPSTREAM_TIMEOUT, trust_env=False) as http:
            self.http = http
            try:
                yield
            finally:
                self.http = None

    async def forward(
        self,
        request: Request,
        caller: Caller,
        service: str,
        path: str,
        body: bytes | None,
        model: str | None = None,
    ) -> Response:
        """Ensure ``service`` under a lease of this request's own, then relay ``request``
        to its upstream + ``path``; the lease ends with the answer. Counted in the
        ``gpusm_proxy_*`` metrics; one that started, woke or stopped something is an
        audit event."""
        coordinator = _coordinator(self.state)
        config = coordinator.config.service(service)
        base = config.upstream_url()
        if base is None:
            raise HttpProblem(
                "config-error",
                f"service {service!r} has no upstream to proxy to: set "
                f"services.{service}.upstream, or give it an HTTP health check",
            )
        http = self.http
        if http is None:
            raise self.state.unavailable()
        query = request.url.query
        url = base + path + (f"?{query}" if query else "")
        client = f"proxy:{caller.key}:{secrets.token_hex(6)}"
        metrics = self.state.metrics
        inflight = metrics.proxy_inflight.labels(service)
        inflight.inc()
        released = False

        async def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            inflight.dec()
            with suppress(GpusmError):
                await anyio.to_thread.run_sync(partial(coordinator.end_client, client, True))

        try:
            result = await self._ensure(coordinator, service, client)
            metrics.proxy_wait.labels(service).observe(result.waited_s)
            if result.started or result.stopped:
                route = f"{request.method} {request.url.path}"
                await anyio.to_thread.run_sync(
                    coordinator.note_proxied, _audit(route, model, client, service, result)
                )
            upstream = await open_upstream(http, request, url, service, body)
        except BaseException as exc:
            code = str(exc.status) if isinstance(exc, HttpProblem) else "error"
            metrics.proxy_requests.labels(service, code).inc()
            with anyio.CancelScope(shield=True):
                await release()
            raise
        metrics.proxy_requests.labels(service, str(upstream.status_code)).inc()
        return Relay(upstream, service, release)

    async def _ensure(self, coordinator: Coordinator, service: str, client: str) -> PhaseResult:
        """Until ``service`` is healthy under ``client``'s lease; 503 after ``proxy.wait_s``.

        A lease revoked while it waited (a higher-priority request took the GPU) waits
        again, in the time that is left: to the client it is one queue.
        """
        wait_s = coordinator.config.proxy.wait_s
        deadline = time.monotonic() + wait_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise self._refusal(coordinator, service, wait_s, "its lease was revoked")
            ensure = partial(coordinator.ensure_service, service, client, left, None, quiet=True)
            try:
                result = await anyio.to_thread.run_sync(ensure)
            except (InsufficientVram, RequestTimeout) as exc:
                raise self._refusal(coordinator, service, wait_s, str(exc), exc) from exc
            if result.lease_revoked is None:
                return result
            _log.info("proxy lease %s revoked while waiting: %s", client, result.lease_revoked)

    @staticmethod
    def _refusal(
        coordinator: Coordinator,
        service: str,
        wait_s: float,
        why: str,
        exc: GpusmError | None = None,
    ) -> HttpProblem:
        extra: dict[str, Any] = {"service": service, "wait_s": wait_s}
        if isinstance(exc, InsufficientVram):
            extra |= {
                "need_mib": exc.need_mib,
                "free_mib": exc.free_mib,
                "foreign_mib": exc.foreign_mib,
                "blocked_by": list(exc.blocked_by),
            }
        return HttpProblem(
            "service-unavailable",
            f"service {service!r} could not be made ready within proxy.wait_s ({wait_s:g} s): "
            f"{why}",
            {"Retry-After": _retry_after(coordinator, service)},
            **extra,
        )


async def _read_bounded(request: Request) -> bytes:
    """The whole body, refused (413) beyond :data:`MODEL_BODY_LIMIT`."""
    too_large = HttpProblem(
        "content-too-large",
        f"the body is read to find its model, and may be at most {MODEL_BODY_LIMIT} bytes; "
        "send ?model= to have a larger body streamed unread",
        limit_bytes=MODEL_BODY_LIMIT,
    )
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > MODEL_BODY_LIMIT:
        raise too_large
    parts: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MODEL_BODY_LIMIT:
            raise too_large
        parts.append(chunk)
    return b"".join(parts)


def _has_body(request: Request) -> bool:
    length = request.headers.get("content-length")
    return "transfer-encoding" in request.headers or (length is not None and length != "0")


async def _route_by_model(state: ApiState, request: Request) -> tuple[str, bytes | None, str]:
    """The service the request's model maps to, the body if it was read for that, and
    the model."""
    coordinator = _coordinator(state)
    models = coordinator.config.models
    body: bytes | None = None
    model: str | None = None
    if _has_body(request) and names_model_in_body(request.headers.get("content-type")):
        body = await _read_bounded(request)
        model = model_in_body(body)
    model = model or request.query_params.get("model")
    if not model:
        raise HttpProblem(
            "invalid-request",
            'the request names no model: send it as "model" in a JSON body or as ?model=',
            known=list(models),
        )
    service = route_model(models, model)
    if service is None:
        raise UnknownName("model", model, list(models))
    return service, body, model


def _audit(
    route: str, model: str | None, client: str, service: str, result: PhaseResult
) -> dict[str, object]:
    """What the audit keeps of a proxied request that changed what runs."""
    return {
        "route": route,
        "model": model,
        "client": client,
        "service": service,
        "waited_s": result.waited_s,
        "started": list(result.started),
        "stopped": [
            {"service": s.service, "kind": s.kind, "action": s.action} for s in result.stopped
        ],
    }


def build_proxy_router(state: ApiState) -> APIRouter:
    """The proxy's routes, bound to ``state``; include it after the daemon's own routes
    (its lifespan opens and closes the upstream client)."""
    proxy = _Proxy(state)
    router = APIRouter(lifespan=proxy.lifespan)

    @router.get("/v1/models", include_in_schema=False)
    async def models(request: Request) -> Response:
        _caller(state, request)
        return JSONResponse(model_list(_coordinator(state).config.models))

    @router.api_route("/svc/{service}", methods=_METHODS, include_in_schema=False)
    @router.api_route("/svc/{service}/{path:path}", methods=_METHODS, include_in_schema=False)
    async def by_service(request: Request, service: str) -> Response:
        caller = _caller(state, request)
        # The raw path: the upstream gets exactly the bytes the client sent.
        raw = request.scope.get("raw_path") or request.url.path.encode()
        rest = raw.decode("latin-1").split("/", 3)
        upstream_path = "/" + (rest[3] if len(rest) > 3 else "")
        return await proxy.forward(request, caller, service, upstream_path, None)

    async def by_model(request: Request) -> Response:
        caller = _caller(state, request)
        service, body, model = await _route_by_model(state, request)
        raw = request.scope.get("raw_path") or request.url.path.encode()
        return await proxy.forward(request, caller, service, raw.decode("latin-1"), body, model)

    for prefix in ("/v1", "/api"):
        router.add_api_route(
            prefix + "/{path:path}", by_model, methods=_METHODS, include_in_schema=False
        )
    return router
