"""Where the proxy's requests come in: its paths on the API's port, and the services'
own listeners. Answered here, in front of the daemon's router (the proxy's hot path
pays for no route table, no dependency solving, no exception middleware).

* On the API's port: ``/svc/NAME[/PATH]`` (HTTP and WebSocket) goes to service NAME;
  ``/v1/...`` and ``/api/...`` go to the service serving the model the request names;
  ``GET /v1/models`` lists the configured models. Every other path is the daemon's.
* A service's own listener (``services.NAME.listen``): gpusm owns the service's
  well-known port, the service runs on an internal one, and every path that arrives
  there (the ASGI scope's ``server`` port tells which) goes to that service, so an
  unmodified client needs no change at all. A listener needs a key (``api.keys`` or
  the daemon's token) unless it is ``auth: none``, which the config allows only on a
  loopback address; such requests are the key ``listen-NAME``, for that service only.

Errors are problem documents (RFC 9457) like the daemon's own; a WebSocket that is
refused is closed before it is accepted.
"""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import unquote

from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect, HTTPConnection, Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocket

from gpusm.api.problems import HttpProblem, problem_response
from gpusm.api.proxy import CLIENT_GONE, Proxy, rest_of_path, route_by_model
from gpusm.api.proxy_keys import Caller
from gpusm.api.proxy_models import model_list
from gpusm.config import Config, split_listen
from gpusm.errors import GpusmError
from gpusm.wire import problem_for_error

__all__ = ["ProxyRoutes", "listener_ports"]

_BY_MODEL = ("/v1/", "/api/")


def listener_ports(config: Config) -> dict[int, str]:
    """Port -> the service whose own listener it is."""
    ports: dict[int, str] = {}
    for name, svc in config.services.items():
        address = split_listen(svc.listen) if svc.listen else None
        if address is not None:
            ports[address[1]] = name
    return ports


def _service_in_path(scope: Scope) -> str | None:
    """NAME of ``/svc/NAME`` or ``/svc/NAME/...``; None for any other path.

    Taken from the raw path and decoded once, like the rest of the path the upstream
    gets: ``/svc/a%2Fb/x`` is service ``a/b`` (unknown), never ``a`` with ``/b/x``.
    """
    if not str(scope["path"]).startswith("/svc/"):
        return None
    raw = scope.get("raw_path") or str(scope["path"]).encode()
    name = raw.decode("latin-1").partition("?")[0][5:].partition("/")[0]
    return unquote(name) or None


class ProxyRoutes:
    """ASGI middleware: the proxy's requests (see the module docstring); the rest goes on
    to ``app``."""

    def __init__(self, app: ASGIApp, proxy: Proxy, ports: Mapping[int, str]) -> None:
        self.app = app
        self.proxy = proxy
        self.ports = dict(ports)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        server = scope.get("server")
        listener = self.ports.get(server[1]) if server else None
        path: str = scope["path"]
        service = listener or _service_in_path(scope)
        skip = 0 if listener else 2
        if kind == "websocket":
            if service is None:
                await self.app(scope, receive, send)
            else:
                await self._websocket(WebSocket(scope, receive, send), service, skip, listener)
            return
        if service is None and not path.startswith(_BY_MODEL):
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive)
        try:
            response = await self._http(request, service, skip, listener)
        except HttpProblem as problem:
            response = problem_response(problem.status, problem.body(), problem.headers)
        except GpusmError as exc:
            status, body = problem_for_error(exc)
            response = problem_response(status, body)
        except ClientDisconnect:
            # The client hung up while its body was being read or sent on: nobody to
            # answer (the lease, if any, was released on the way out).
            response = Response(status_code=CLIENT_GONE)
        await response(scope, receive, send)

    async def _http(
        self, request: Request, service: str | None, skip: int, listener: str | None
    ) -> Response:
        proxy = self.proxy
        caller = self._caller(request, listener)
        if service is not None:
            path = rest_of_path(request.scope, skip).partition("?")[0]
            return await proxy.forward(request, caller, service, path, None)
        if request.method == "GET" and request.scope["path"] == "/v1/models":
            return JSONResponse(model_list(proxy.config().models))
        service, body, model = await route_by_model(proxy.config(), request)
        path = rest_of_path(request.scope, 0).partition("?")[0]
        return await proxy.forward(request, caller, service, path, body, model)

    def _caller(self, connection: HTTPConnection, listener: str | None) -> Caller:
        if listener is not None:
            svc = self.proxy.config().services.get(listener)
            if svc is not None and svc.auth == "none":
                return Caller(f"listen-{listener}", None, frozenset({listener}))
        return self.proxy.caller(connection)

    async def _websocket(
        self, websocket: WebSocket, service: str, skip: int, listener: str | None
    ) -> None:
        try:
            caller = self._caller(websocket, listener)
        except (HttpProblem, GpusmError):
            await websocket.close(1008)
            return
        path = rest_of_path(websocket.scope, skip)
        await self.proxy.forward_websocket(websocket, caller, service, path)
