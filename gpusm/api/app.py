"""The FastAPI application of ``gpusm serve``.

``create_app(config, token=...)`` builds the app; nothing is opened until its lifespan
starts, which begins recovery in a background thread. Until recovery has finished,
every endpoint but ``/healthz`` answers 503 with ``Retry-After``. Requests whose
``Host`` is not local are refused with 421 before anything else happens. Errors are
JSON problem details (RFC 9457, ``application/problem+json``); see
:mod:`gpusm.wire` for the types and status codes.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from http import HTTPStatus
from typing import Any

import anyio.to_thread
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from gpusm.api.problems import HttpProblem, problem_response
from gpusm.api.proxy import Proxy
from gpusm.api.proxy_routes import ProxyRoutes, listener_ports
from gpusm.api.routes import build_router
from gpusm.api.security import HostGuard
from gpusm.api.state import ApiState, CoordinatorFactory
from gpusm.api.ui import build_ui_router
from gpusm.config import Config
from gpusm.errors import GpusmError
from gpusm.version import VERSION as __version__
from gpusm.wire import PROBLEM_MEDIA_TYPE, problem_for_error

__all__ = ["create_app", "state_of"]

_log = logging.getLogger("gpusm.api")
# Phase requests block a worker thread each; status readers must not queue behind them.
_THREADS = 256
_DESCRIPTION = (
    "Keeps several GPU services on one GPU without running out of VRAM. Every POST "
    "needs `Authorization: Bearer <token>`; errors are RFC 9457 problem details."
)


class _Gate:
    """ASGI middleware: refuse a non-local ``Host`` (421), and everything but /healthz
    while there is no recovered coordinator (503)."""

    def __init__(self, app: ASGIApp, state: ApiState, guard: HostGuard) -> None:
        self.app = app
        self.state = state
        self.guard = guard

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        problem = self._refusal(scope) if kind in ("http", "websocket") else None
        if problem is None:
            await self.app(scope, receive, send)
        elif kind == "websocket":
            # A WebSocket handshake is refused by closing it (the client sees a 403).
            await send({"type": "websocket.close", "code": 1008})
        else:
            response = problem_response(problem.status, problem.body(), problem.headers)
            await response(scope, receive, send)

    def _refusal(self, scope: Scope) -> HttpProblem | None:
        host = Headers(scope=scope).get("host")
        if not self.guard.allows(host):
            return HttpProblem(
                "misdirected-request",
                f"Host {host!r} is not this machine; gpusm answers only requests "
                "addressed to 127.0.0.1, localhost, [::1] or its listen address",
            )
        if scope["path"] != "/healthz" and self.state.coordinator is None:
            return self.state.unavailable()
        return None


def _install_handlers(app: FastAPI, state: ApiState) -> None:
    async def gpusm_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, GpusmError)
        status, body = problem_for_error(exc)
        if status == 409:
            state.metrics.refuse(body["type"].rpartition(":")[2])
        return problem_response(status, body)

    async def http_problem(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HttpProblem)
        return problem_response(exc.status, exc.body(), exc.headers)

    async def invalid(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        unparsable = next((e for e in exc.errors() if e.get("type") == "json_invalid"), None)
        if unparsable is not None:
            # Not JSON at all: 400, like any other body that cannot be parsed (a body that
            # parses but does not match the schema is a 422 below).
            loc = tuple(unparsable.get("loc", ()))
            at = f" at character {loc[1]}" if len(loc) > 1 and isinstance(loc[1], int) else ""
            why = str((unparsable.get("ctx") or {}).get("error", "")) or "JSON decode error"
            body = {
                "type": "about:blank",
                "title": HTTPStatus.BAD_REQUEST.phrase,
                "status": HTTPStatus.BAD_REQUEST.value,
                "detail": f"the request body is not valid JSON ({why}{at})",
            }
            return problem_response(HTTPStatus.BAD_REQUEST.value, body)
        errors = [
            {
                "loc": [str(p) for p in e.get("loc", ())],
                "msg": str(e.get("msg", "")),
                "type": str(e.get("type", "")),
            }
            for e in exc.errors()
        ]
        where = "; ".join(f"{'.'.join(e['loc'])}: {e['msg']}" for e in errors[:3])
        problem = HttpProblem("invalid-request", where or "invalid request", errors=errors)
        return problem_response(422, problem.body())

    async def http_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        phrase = HTTPStatus(exc.status_code).phrase
        body = {
            "type": "about:blank",
            "title": phrase,
            "status": exc.status_code,
            "detail": str(exc.detail),
        }
        return problem_response(exc.status_code, body, dict(exc.headers or {}))

    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        _log.error("unexpected error", exc_info=exc)
        body = HttpProblem(
            "internal-error", f"internal error ({type(exc).__name__}); see the daemon's log"
        ).body()
        return problem_response(500, body)

    app.add_exception_handler(GpusmError, gpusm_error)
    app.add_exception_handler(HttpProblem, http_problem)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema, with problem responses under ``application/problem+json``."""
    if app.openapi_schema is None:
        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        for item in schema.get("paths", {}).values():
            for operation in item.values():
                for code, response in operation.get("responses", {}).items():
                    content = response.get("content", {})
                    if code.isdigit() and int(code) >= 400 and "application/json" in content:
                        content[PROBLEM_MEDIA_TYPE] = content.pop("application/json")
                    if code == "503":
                        response["headers"] = {
                            "Retry-After": {
                                "description": "Seconds to wait while recovering",
                                "schema": {"type": "integer"},
                            }
                        }
        app.openapi_schema = schema
    return app.openapi_schema


def create_app(
    config: Config,
    *,
    token: str,
    factory: CoordinatorFactory | None = None,
    on_fatal: Callable[[BaseException], None] | None = None,
    stop_services_on_exit: bool = False,
    extra_hosts: Iterable[str] = (),
) -> FastAPI:
    """The API app for ``config``; recovery starts with its lifespan (see module docstring).

    ``factory`` opens the coordinator (default :func:`gpusm.wiring.open_coordinator`); ``on_fatal``
    is called from the recovery thread if that fails; ``extra_hosts`` are further
    ``Host`` names to accept (the configured listen host always is).
    """
    state = ApiState(
        config,
        token,
        factory=factory,
        on_fatal=on_fatal,
        stop_services_on_exit=stop_services_on_exit,
    )

    proxy = Proxy(state)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        anyio.to_thread.current_default_thread_limiter().total_tokens = _THREADS
        state.start_recovery()
        try:
            async with proxy.running():
                yield
        finally:
            await anyio.to_thread.run_sync(state.close)

    app = FastAPI(title="gpusm", version=__version__, description=_DESCRIPTION, lifespan=lifespan)
    app.state.gpusm = state
    app.include_router(build_router(state))
    app.include_router(build_ui_router(state))  # /ui, /gpu/timeline
    _install_handlers(app, state)
    # In front of the router, inside the gate: the proxy's paths and the services' own
    # listeners have the same Host check and 503s while recovering.
    app.add_middleware(ProxyRoutes, proxy=proxy, ports=listener_ports(config))
    hosts = [h.rpartition(":")[0] for h in (config.api.listen, *config.listens())]
    app.add_middleware(_Gate, state=state, guard=HostGuard([*hosts, *extra_hosts]))
    if config.api.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(config.api.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def state_of(app: FastAPI) -> ApiState:
    """The :class:`ApiState` of an app made by :func:`create_app`."""
    state = app.state.gpusm
    assert isinstance(state, ApiState)
    return state
