"""``gpusm serve``: the daemon (FastAPI + uvicorn) that owns the GPU services.

Order of events: load the config, load or create the token, build the app, bind the
port (a taken port fails here, before anything is recovered), then serve; recovery
runs in the background and the API answers 503 until it has finished. SIGINT or
SIGTERM stop it gracefully; the services keep running (the next ``gpusm serve``
adopts them) unless ``--stop-on-exit`` is given.
"""

from __future__ import annotations

import os
import signal
from types import FrameType
from typing import TYPE_CHECKING, Annotated

import typer

from gpusm.cli.common import (
    EXIT_CONFIG,
    EXIT_ERROR,
    ConfigOption,
    console,
    fail,
    friendly_errors,
    load,
)
from gpusm.errors import GpusmError

if TYPE_CHECKING:
    from gpusm.api.server import Server

__all__ = ["register", "serve"]

_LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


def serve(
    config: ConfigOption = None,
    listen: Annotated[
        str | None,
        typer.Option(help="HOST:PORT to listen on (default: the config's api.listen)."),
    ] = None,
    stop_on_exit: Annotated[
        bool, typer.Option(help="Stop every service when the daemon exits.")
    ] = False,
    log_level: Annotated[
        str, typer.Option(help="uvicorn log level: critical, error, warning, info, debug.")
    ] = "warning",
) -> None:
    """Run the daemon: HTTP API, metrics, and the coordinator (recovers in the background)."""
    from gpusm.api.app import create_app
    from gpusm.api.security import load_or_create_token
    from gpusm.api.server import bind, bound_port, make_server
    from gpusm.wire import TOKEN_ENV, parse_listen

    cfg = load(config)
    with friendly_errors():
        where = parse_listen(listen, "--listen") if listen else parse_listen(cfg.api.listen)
        token = load_or_create_token(cfg.token_path)
    if log_level not in _LOG_LEVELS:
        fail(f"--log-level: {log_level!r} is not a log level", EXIT_CONFIG)
    fatal: list[BaseException] = []
    servers: list[Server] = []

    def on_fatal(exc: BaseException) -> None:
        # Called from the recovery thread: record why, and make uvicorn shut down.
        fatal.append(exc)
        for server in servers:
            server.should_exit = True

    app = create_app(
        cfg,
        token=token,
        on_fatal=on_fatal,
        stop_services_on_exit=stop_on_exit,
        extra_hosts=[where.host],
    )
    # The app exists; only now is the port bound.
    with friendly_errors():
        sock = bind(where)
    server = make_server(app, log_level)
    servers.append(server)

    def stop(signum: int, frame: FrameType | None) -> None:
        # Until uvicorn installs its handlers, and when it re-raises the signal it handled.
        server.should_exit = True

    from_env = bool(os.environ.get(TOKEN_ENV, "").strip())
    console.print(
        f"gpusm serving on {type(where)(where.host, bound_port(sock)).url} "
        f"(token: {'$' + TOKEN_ENV if from_env else cfg.token_path}); recovering in the background",
        markup=False,
        soft_wrap=True,
    )
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        sock.close()
    if fatal:
        if isinstance(fatal[0], GpusmError):
            with friendly_errors():
                raise fatal[0]
        fail(f"recovery failed: {fatal[0]!r}; see the log above", EXIT_ERROR)
    console.print("gpusm stopped", markup=False)


def register(app: typer.Typer) -> None:
    """Add ``serve`` to ``app``."""
    app.command("serve")(serve)
