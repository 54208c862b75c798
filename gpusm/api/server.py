"""Running the API under uvicorn: bind ``HOST:PORT``, serve until told to stop.

Parsing ``HOST:PORT`` (:func:`gpusm.wire.parse_listen`) is shared with the client.

The app object exists before the port is bound, and recovery starts only once uvicorn
runs the app's lifespan, so the daemon answers ``/healthz`` (and 503 elsewhere) while
it recovers.
"""

from __future__ import annotations

import errno
import socket
from typing import TYPE_CHECKING

from gpusm.config import Config
from gpusm.errors import GpusmError
from gpusm.wire import Listen, parse_listen

if TYPE_CHECKING:
    from typing import TypeAlias

    import uvicorn
    from fastapi import FastAPI

    # The server type, for modules outside ``api/`` that hold one (``gpusm serve``).
    Server: TypeAlias = uvicorn.Server

__all__ = ["bind", "bind_listeners", "bound_port", "make_server"]


def bind(listen: Listen) -> socket.socket:
    """A listening socket on ``listen``; GpusmError saying who to blame if it is taken."""
    try:
        infos = socket.getaddrinfo(listen.host, listen.port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise GpusmError(f"cannot resolve listen host {listen.host!r}: {exc}") from exc
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise GpusmError(
                f"port {listen.port} on {listen.host} is in use (another gpusm serve?); "
                "stop it or choose another with --listen HOST:PORT / api.listen"
            ) from exc
        raise GpusmError(f"cannot listen on {listen.host}:{listen.port}: {exc}") from exc
    return sock


def bind_listeners(config: Config) -> list[socket.socket]:
    """A listening socket for each service's own ``listen`` address (the proxy's
    listeners, served by the same server as the API); none stays bound on failure."""
    bound: list[socket.socket] = []
    try:
        for address in config.listens():
            bound.append(bind(parse_listen(address, "listen")))
    except GpusmError:
        for sock in bound:
            sock.close()
        raise
    return bound


def make_server(app: FastAPI, log_level: str = "warning") -> uvicorn.Server:
    """A uvicorn server for ``app`` (no access log; bounded graceful shutdown)."""
    # Imported here: building the app (e.g. for its OpenAPI document) needs no uvicorn.
    import uvicorn

    from gpusm.api.app import state_of
    from gpusm.api.stream import close_streams

    class _Server(uvicorn.Server):
        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            # An event stream never ends by itself, and uvicorn waits for every open
            # response before it stops: end the streams first.
            if getattr(app.state, "gpusm", None) is not None:
                close_streams(state_of(app))
            await super().shutdown(sockets)

    config = uvicorn.Config(
        app,
        log_level=log_level,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=10,
        # The proxy's WebSocket pass-through; the sans-I/O implementation (the
        # default one is deprecated by the websockets library).
        ws="websockets-sansio",
        # The daemon is not behind a reverse proxy of its own: a client's
        # X-Forwarded-For is not who it is (the proxy passes it on, and appends the peer).
        proxy_headers=False,
    )
    return _Server(config)


def bound_port(sock: socket.socket) -> int:
    """The port a socket is bound to (useful after binding port 0)."""
    return int(sock.getsockname()[1])
