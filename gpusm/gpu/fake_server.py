"""A fake model server that holds simulated GPU memory, for tests and demos.

``gpusm sim service --vram-mib N --port P`` runs :func:`run_fake_server`: it answers
HTTP at once (``GET /health``: 503 while loading or stopping, 200 when ready; ``GET /``
or ``/info``: JSON), allocates its memory from the simulated GPU in a few chunks over
``load_s`` seconds, and then serves until told to stop. It never releases its memory
itself: the simulated GPU sees the process die and frees the memory after its lag,
exactly as a driver would.

Once ready it can also be *parked* (its model memory freed down to ``residual_mib`` plus
``leak_mib``) and woken (the memory allocated again after ``wake_s``) through the request
shapes of vLLM, SGLang, Ollama, ComfyUI and llama.cpp's router; :mod:`gpusm.gpu.fake_park`
lists them. ``/health`` stays 200 while parked or waking.

It also answers the requests of unmodified clients (OpenAI's ``/v1/chat/completions``,
``/v1/completions``, ``/v1/models``, ``/v1/embeddings``; Ollama's streamed ``/api/chat``
and ``/api/generate``; ComfyUI's ``/ws`` WebSocket) with tokens produced at
``tokens_per_s``; :mod:`gpusm.gpu.fake_openai` describes them.

It holds its memory on the simulated devices that ``CUDA_VISIBLE_DEVICES`` names (a
comma-separated list of device indices or UUIDs, as gpusm sets it; unset or blank:
device 0), ``vram_mib`` on each of them; ``/info`` lists them under ``devices``.

Exit codes: 0 after a SIGTERM/SIGINT stop, 1 for ``crash_after``, 3 for a simulated
OOM, 4 when the port cannot be bound, 5 when ``CUDA_VISIBLE_DEVICES`` names a device the
simulated GPU does not have (or one twice).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import parse_qs

from gpusm.errors import SimOutOfMemory
from gpusm.gpu.fake_openai import CLIENT_GET_ROUTES, CLIENT_POST_ROUTES, ClientRoutes
from gpusm.gpu.fake_park import (
    GET_ROUTES,
    POST_ROUTES,
    SERVING,
    NotServing,
    allocate_each,
)
from gpusm.gpu.sim import SimGpu, UnknownSimDevice, select_devices

__all__ = [
    "EXIT_CRASHED",
    "EXIT_DEVICE",
    "EXIT_OOM",
    "EXIT_PORT",
    "EXIT_STOPPED",
    "FakeServerOptions",
    "run_fake_server",
]

EXIT_STOPPED = 0
EXIT_CRASHED = 1
EXIT_OOM = 3
EXIT_PORT = 4
EXIT_DEVICE = 5

# Loading allocates in this many chunks, so a watcher sees usage grow before ready.
_CHUNKS = 4
# How often the main loop looks at the stop flag; signal handlers only set a flag.
_TICK_S = 0.02


@dataclass(frozen=True)
class FakeServerOptions:
    """How the fake server behaves; see ``gpusm sim service --help``."""

    vram_mib: int
    port: int
    sim_dir: Path
    host: str = "127.0.0.1"
    load_s: float = 0.0
    stop_s: float = 0.0
    ignore_sigterm: bool = False
    crash_after: float | None = None
    grow_mib: int = 0
    wake_s: float = 0.5
    residual_mib: int = 0
    leak_mib: int = 0
    async_free_s: float = 0.0
    model: str = "fake-model"
    # How fast completions produce tokens (gpusm.gpu.fake_openai); 0: at once.
    tokens_per_s: float = 50.0
    # The CUDA_VISIBLE_DEVICES value: device indices or UUIDs, comma-separated; None: 0.
    visible_devices: str | None = None


class _Server:
    """The running server's state, shared by the main thread and the HTTP threads."""

    def __init__(self, options: FakeServerOptions, sims: Sequence[SimGpu]) -> None:
        self.options = options
        self.sims = list(sims)
        self.state = "loading"
        self.held_mib = 0
        self.started = time.time()
        self.stop_requested = False
        # The memory held when awake; set when loading ends and again before each park.
        self.model_mib = 0
        # Serializes loading's end, parks and wakes: only one moves memory at a time.
        self.transition = threading.Lock()
        self.prompts = 0
        self.counter = threading.Lock()

    def info(self) -> dict[str, Any]:
        opts = asdict(self.options)
        opts["sim_dir"] = str(self.options.sim_dir)
        return {
            "state": self.state,
            "pid": os.getpid(),
            "vram_mib": self.held_mib,  # on each device
            "devices": [
                {"index": sim.index, "uuid": sim.uuid, "vram_mib": self.held_mib}
                for sim in self.sims
            ],
            "parked": self.state in ("parked", "waking"),
            "model": self.options.model,
            "uptime_s": round(time.time() - self.started, 3),
            "options": opts,
        }

    def log(self, message: str) -> None:
        print(f"fake server pid {os.getpid()}: {message}", file=sys.stderr, flush=True)

    def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; True if a stop was requested meanwhile."""
        deadline = time.monotonic() + seconds
        while not self.stop_requested:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(_TICK_S, left))
        return True


class _Handler(ClientRoutes, BaseHTTPRequestHandler):
    """HTTP for one server; :func:`_handler` makes a subclass bound to it."""

    fake: _Server
    sims: Sequence[SimGpu]
    # Keep-alive, as the real servers (uvicorn, Go's net/http) keep connections open:
    # every answer has a length, except the streams, which close their connection.
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        # An answer's headers and body are two writes: without NODELAY, a kept-alive
        # connection waits for the client's delayed ACK (40 ms) between them.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def reply(self, status: int, doc: Any = None) -> None:
        body = b"" if doc is None else json.dumps(doc).encode()
        self.send_response(status)
        if doc is not None:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        # Health probes arrive many times a second; logging them would flood the log file.
        return

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        route = _GET_ROUTES.get(path)
        if route is not None:
            route(self)
        elif path == "/health":
            self.reply(200 if self.fake.state in SERVING else 503, self.fake.info())
        else:
            self.reply(200 if path in ("/", "/info") else 404, self.fake.info())

    def do_POST(self) -> None:
        path, _, query = self.path.partition("?")
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length > 0 else b""
        if path == "/v1/audio/transcriptions":
            # OpenAI's upload shape (multipart: model, file): what arrived, in full.
            self.reply(200, {"text": f"{len(raw)} bytes", "bytes": len(raw)})
            return
        try:
            body = json.loads(raw) if raw.strip() else {}
        except ValueError:
            self.reply(400, {"error": "the request body is not JSON"})
            return
        route = _POST_ROUTES.get(path)
        if route is None:
            self.reply(404, {"error": f"no such endpoint: POST {path}"})
            return
        try:
            route(self, parse_qs(query), body if isinstance(body, dict) else {})
        except NotServing as exc:
            self.reply(503, {"error": f"the server is {exc}"})
        except SimOutOfMemory as exc:
            self.reply(503, {"error": f"out of memory: {exc}"})


_GET_ROUTES: dict[str, Callable[[_Handler], None]] = {**GET_ROUTES, **CLIENT_GET_ROUTES}
_POST_ROUTES: dict[str, Callable[[_Handler, dict[str, list[str]], dict[str, Any]], None]] = {
    **POST_ROUTES,
    **CLIENT_POST_ROUTES,  # its /api/generate streams, and hands fake_park's shapes on
}


class _Listener(ThreadingHTTPServer):
    # A real server's accept backlog (uvicorn's is 2048), not http.server's 5: a burst
    # of new connections (twenty clients once a model is up) is queued, not reset.
    request_queue_size = 1024


def _handler(server: _Server) -> type[BaseHTTPRequestHandler]:
    return type("Handler", (_Handler,), {"fake": server, "sims": server.sims})


def _install_signals(server: _Server) -> None:
    def on_stop(signum: int, frame: FrameType | None) -> None:
        server.stop_requested = True

    signal.signal(signal.SIGTERM, signal.SIG_IGN if server.options.ignore_sigterm else on_stop)
    signal.signal(signal.SIGINT, on_stop)


def _allocate(server: _Server, mib: int) -> None:
    allocate_each(server.sims, mib)
    server.held_mib += mib


def run_fake_server(options: FakeServerOptions, sim: SimGpu | Sequence[SimGpu]) -> int:
    """Serve until stopped, crashed or out of memory; returns the process exit code.

    ``sim`` is the simulated device, or every device of the sim; the server holds memory
    on those ``options.visible_devices`` names (device 0 when None).
    """
    try:
        sims = select_devices(sim, options.visible_devices)
    except UnknownSimDevice as exc:
        print(f"fake server pid {os.getpid()}: {exc}", file=sys.stderr, flush=True)
        return EXIT_DEVICE
    server = _Server(options, sims)
    _install_signals(server)
    try:
        httpd = _Listener((options.host, options.port), _handler(server))
    except OSError as exc:
        server.log(f"cannot listen on {options.host}:{options.port}: {exc.strerror}")
        return EXIT_PORT
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05})
    thread.daemon = True
    thread.start()
    try:
        return _lifecycle(server)
    finally:
        httpd.shutdown()
        httpd.server_close()


def _lifecycle(server: _Server) -> int:
    options = server.options
    where = ", ".join(f"{sim.index} ({sim.uuid})" for sim in server.sims)
    server.log(
        f"listening on {options.host}:{options.port}; loading {options.vram_mib} MiB "
        f"over {options.load_s}s on device(s) {where}"
    )
    chunks = _split(options.vram_mib, _CHUNKS)
    try:
        for chunk in chunks or [0]:
            if server.wait(options.load_s / max(len(chunks), 1)):
                return _stop(server)
            if chunk:
                _allocate(server, chunk)
        with server.transition:  # no park before growing is done
            server.state = "ready"
            server.log(f"ready, holding {server.held_mib} MiB")
            if options.grow_mib > 0:
                _allocate(server, options.grow_mib)
                server.log(f"grew to {server.held_mib} MiB")
            server.model_mib = server.held_mib
    except SimOutOfMemory as exc:
        server.state = "oom"
        server.log(f"out of memory: {exc}")
        return EXIT_OOM
    if server.wait(float("inf") if options.crash_after is None else options.crash_after):
        return _stop(server)
    server.state = "crashed"
    server.log(f"crashing {options.crash_after}s after ready, as asked")
    return EXIT_CRASHED


def _stop(server: _Server) -> int:
    server.state = "stopping"  # a park or wake in progress sees the stop flag and gives up
    server.log(f"stop requested; stopping in {server.options.stop_s}s")
    time.sleep(server.options.stop_s)
    server.log("stopped")
    return EXIT_STOPPED


def _split(total: int, parts: int) -> list[int]:
    """``total`` in at most ``parts`` positive chunks (nothing for 0)."""
    parts = max(1, min(parts, total))
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)] if total > 0 else []
