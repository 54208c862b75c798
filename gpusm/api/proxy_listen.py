"""Services' own listeners (``services.NAME.listen``): gpusm owns a service's
well-known port, the service runs on an internal one, and an unmodified client needs
no change at all.

The daemon's server listens on every such port as well as the API's; a request that
came in on a listener's port (the ASGI scope's ``server``) is relayed, whatever its
path, to that service's upstream through :meth:`Proxy.forward` — the same lease,
admission, queue and audit as ``/svc/NAME/...``. A listener needs a key (``api.keys``
or the daemon's token) unless it is ``auth: none``, which the config allows only on a
loopback address; such requests are the key ``listen-NAME``, for that service only.
"""

from __future__ import annotations

from collections.abc import Mapping

from fastapi.responses import JSONResponse
from starlette.requests import HTTPConnection, Request
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocket

from gpusm.api.problems import HttpProblem
from gpusm.api.proxy import Proxy, rest_of_path
from gpusm.api.proxy_keys import Caller
from gpusm.config import Config, split_listen
from gpusm.errors import GpusmError
from gpusm.wire import PROBLEM_MEDIA_TYPE, problem_for_error

__all__ = ["Listeners", "listener_ports"]


def listener_ports(config: Config) -> dict[int, str]:
    """Port -> the service whose own listener it is."""
    ports: dict[int, str] = {}
    for name, svc in config.services.items():
        address = split_listen(svc.listen) if svc.listen else None
        if address is not None:
            ports[address[1]] = name
    return ports


class Listeners:
    """ASGI middleware: what arrives on a listener's port goes to its service."""

    def __init__(self, app: ASGIApp, proxy: Proxy, ports: Mapping[int, str]) -> None:
        self.app = app
        self.proxy = proxy
        self.ports = dict(ports)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        server = scope.get("server")
        service = self.ports.get(server[1]) if server and scope["type"] != "lifespan" else None
        if service is None:
            await self.app(scope, receive, send)
        elif scope["type"] == "websocket":
            await self._websocket(WebSocket(scope, receive, send), service)
        else:
            await self._http(scope, receive, send, service)

    def _caller(self, connection: HTTPConnection, service: str) -> Caller:
        coordinator = self.proxy.state.coordinator
        svc = coordinator.config.services.get(service) if coordinator is not None else None
        if svc is not None and svc.auth == "none":
            return Caller(f"listen-{service}", None, frozenset({service}))
        return self.proxy.caller(connection)

    async def _http(self, scope: Scope, receive: Receive, send: Send, service: str) -> None:
        request = Request(scope, receive)
        try:
            caller = self._caller(request, service)
            path = rest_of_path(scope, 0).partition("?")[0]
            response = await self.proxy.forward(request, caller, service, path, None)
        except HttpProblem as problem:
            response = _problem(problem.status, problem.body(), problem.headers)
        except GpusmError as exc:
            status, body = problem_for_error(exc)
            response = _problem(status, body, {})
        await response(scope, receive, send)

    async def _websocket(self, websocket: WebSocket, service: str) -> None:
        try:
            caller = self._caller(websocket, service)
        except (HttpProblem, GpusmError):
            await websocket.close(1008)
            return
        await self.proxy.forward_websocket(
            websocket, caller, service, rest_of_path(websocket.scope, 0)
        )


def _problem(status: int, body: dict[str, object], headers: Mapping[str, str]) -> JSONResponse:
    return JSONResponse(
        body, status_code=status, headers=dict(headers), media_type=PROBLEM_MEDIA_TYPE
    )
