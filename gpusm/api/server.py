"""Running the API under uvicorn: parse ``HOST:PORT``, bind, serve until told to stop.

The app object exists before the port is bound, and recovery starts only once uvicorn
runs the app's lifespan, so the daemon answers ``/healthz`` (and 503 elsewhere) while
it recovers.
"""

from __future__ import annotations

import errno
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gpusm.errors import ConfigError, GpusmError

if TYPE_CHECKING:
    import uvicorn
    from fastapi import FastAPI

__all__ = ["Listen", "bind", "bound_port", "make_server", "parse_listen"]


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
    """``HOST:PORT`` or ``[IPv6]:PORT``; ConfigError naming ``source`` if malformed."""
    text = value.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest.removeprefix(":") if rest.startswith(":") else ""
    else:
        host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(
            source, "", f"{value!r} is not HOST:PORT", "write e.g. 127.0.0.1:7723 or [::1]:7723"
        )
    return Listen(host, int(port))


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


def make_server(app: FastAPI, log_level: str = "warning") -> uvicorn.Server:
    """A uvicorn server for ``app`` (no access log; bounded graceful shutdown)."""
    # Imported here: workers that only parse addresses (gpusm.Client) never load uvicorn.
    import uvicorn

    config = uvicorn.Config(
        app,
        log_level=log_level,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=10,
    )
    return uvicorn.Server(config)


def bound_port(sock: socket.socket) -> int:
    """The port a socket is bound to (useful after binding port 0)."""
    return int(sock.getsockname()[1])
