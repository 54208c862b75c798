"""``gpusm serve``: the daemon (FastAPI + uvicorn) that owns the GPU services.

Order of events: load the config, load or create the token, build the app, bind the
port (a taken port fails here, before anything is recovered), then serve; recovery
runs in the background and the API answers 503 until it has finished. SIGINT or
SIGTERM stop it gracefully; the services keep running (the next ``gpusm serve``
adopts them) unless ``--stop-on-exit`` is given. Under systemd (``Type=notify``) it
sends ``READY=1`` once recovered and serving, and ``STOPPING=1`` when shutdown begins.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING, Annotated

import typer

from gpusm.cli import sd_notify
from gpusm.cli.common import (
    EXIT_CONFIG,
    EXIT_ERROR,
    ConfigOption,
    console,
    err_console,
    fail,
    friendly_errors,
    load,
)
from gpusm.errors import GpusmError
from gpusm.results import ReloadResult

if TYPE_CHECKING:
    from gpusm.api.server import Server

__all__ = ["register", "serve"]

_LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
# How often the systemd watcher looks at recovery and shutdown (only under systemd).
_NOTIFY_POLL_S = 0.05


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
    from gpusm.api.app import create_app, state_of
    from gpusm.api.proxy_keys import load_keys
    from gpusm.api.security import load_or_create_token
    from gpusm.api.server import bind, bind_listeners, bound_port, make_server
    from gpusm.wire import TOKEN_ENV, parse_listen

    cfg = load(config)
    with friendly_errors():
        where = parse_listen(listen, "--listen") if listen else parse_listen(cfg.api.listen)
        token = load_or_create_token(cfg.token_path)
        load_keys(cfg)  # a key whose token file cannot be read stops the start, named
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
        # The services' own listeners (services.NAME.listen): the same server answers.
        listeners = bind_listeners(cfg)
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
    # SIGHUP (`systemctl reload`): read the config file again, off the signal handler.
    reload = state_of(app).reload
    previous_hup = signal.signal(signal.SIGHUP, lambda signum, frame: _reload_soon(reload))
    served = threading.Event()
    watcher = None
    if sd_notify.claim():
        watcher = threading.Thread(
            target=_tell_systemd,
            args=(server, lambda: state_of(app).phase == "ok", served, bound_port(sock)),
            name="gpusm-sd-notify",
            daemon=True,
        )
        watcher.start()
    try:
        server.run(sockets=[sock, *listeners])
    except KeyboardInterrupt:
        pass
    finally:
        served.set()
        if watcher is not None:
            watcher.join()
        signal.signal(signal.SIGHUP, previous_hup)
        signal.signal(signal.SIGTERM, previous)
        sock.close()
        for listener in listeners:
            listener.close()
    if fatal:
        if isinstance(fatal[0], GpusmError):
            with friendly_errors():
                raise fatal[0]
        fail(f"recovery failed: {fatal[0]!r}; see the log above", EXIT_ERROR)
    console.print("gpusm stopped", markup=False)


def _tell_systemd(
    server: Server, recovered: Callable[[], bool], served: threading.Event, port: int
) -> None:
    """``READY=1`` once recovered and serving, then ``STOPPING=1`` once shutdown begins."""
    # Polled: recovery runs in the app's own thread, and uvicorn has no callbacks for
    # "started" or "told to exit"; both flags are plain attributes.
    while not served.wait(_NOTIFY_POLL_S) and not server.should_exit:
        if server.started and recovered():
            sd_notify.ready(f"recovered; serving on port {port}")
            break
    while not served.wait(_NOTIFY_POLL_S) and not server.should_exit:
        pass
    sd_notify.stopping("shutting down")


def _reload_soon(reload: Callable[[str], ReloadResult]) -> None:
    # A Python handler, not SIG_IGN: an ignored SIGHUP would be inherited by the services.
    threading.Thread(target=_reload, args=(reload,), name="gpusm-reload", daemon=True).start()


def _reload(reload: Callable[[str], ReloadResult]) -> None:
    with sd_notify.reloading():
        try:
            result = reload("SIGHUP")
        except GpusmError as exc:
            err_console.print(f"reload refused: {exc}", markup=False, soft_wrap=True)
            return
    changed = ", ".join(result.changed) or "none"
    added = ", ".join(result.added) or "none"
    removed = ", ".join(result.removed) or "none"
    console.print(
        f"config reloaded ({result.config_hash}): changed {changed}; added {added}; "
        f"removed {removed}",
        markup=False,
        soft_wrap=True,
    )


def register(app: typer.Typer) -> None:
    """Add ``serve`` to ``app``."""
    app.command("serve")(serve)
