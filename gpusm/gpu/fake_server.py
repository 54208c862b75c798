"""A fake model server that holds simulated GPU memory, for tests and demos.

``gpusm sim service --vram-mib N --port P`` runs :func:`run_fake_server`: it answers
HTTP at once (``GET /health``: 503 while loading or stopping, 200 when ready; ``GET /``
or ``/info``: JSON), allocates its memory from the simulated GPU in a few chunks over
``load_s`` seconds, and then serves until told to stop. It never releases its memory
itself: the simulated GPU sees the process die and frees the memory after its lag,
exactly as a driver would.

Once ready it can also be *parked* (its model memory freed down to ``residual_mib`` plus
``leak_mib``) and woken (the memory allocated again after ``wake_s``) through the request
shapes of real servers, so that parking can be exercised without them:

* vLLM (``--enable-sleep-mode``): ``POST /sleep?level=1|2`` parks, ``POST /wake_up``
  wakes, ``GET /is_sleeping`` answers ``{"is_sleeping": bool}``.
* SGLang: ``POST /release_memory_occupation`` parks, ``POST /resume_memory_occupation``
  wakes (JSON body ``{"tags": [...]}`` optional; any tags free everything).
* Ollama: ``POST /api/generate`` ``{"model": M, "keep_alive": 0}`` parks (``done_reason``
  ``"unload"``); without a prompt and any other ``keep_alive`` it wakes (``"load"``); with a
  prompt it wakes, answers a tiny completion, and parks afterwards if ``keep_alive`` is 0.
  ``GET /api/ps`` lists the model while it is loaded. Another model name: 404.
* ComfyUI: ``POST /free`` ``{"unload_models": true, "free_memory": true}`` answers 200 at
  once and parks ``async_free_s`` later, in the background (the only asynchronous free);
  ``POST /prompt`` answers ``{"prompt_id", "number", "node_errors"}`` at once and wakes in
  the background, like a queued prompt.
* llama.cpp router: ``POST /models/unload`` / ``POST /models/load`` ``{"model": M}`` park /
  wake and answer ``{"success": true}``; ``GET /models`` lists the model. Another model: 404.

Parking and waking are synchronous (the answer comes when the memory has moved) except
for ComfyUI's, idempotent (200 when already parked/awake), serialized (a wake asked while
parking waits for the park to finish, and the other way round), and answered 503 while
loading or stopping. ``/health`` stays 200 while parked or waking. A wake that the
simulated GPU refuses records an OOM there, leaves the server parked and answers 503.
Each finished park or wake prints one line to stdout.

Exit codes: 0 after a SIGTERM/SIGINT stop, 1 for ``crash_after``, 3 for a simulated
OOM, 4 when the port cannot be bound.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import parse_qs

from gpusm.errors import SimOutOfMemory
from gpusm.gpu.sim import SimGpu

__all__ = [
    "EXIT_CRASHED",
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


class _Server:
    """The running server's state, shared by the main thread and the HTTP threads."""

    def __init__(self, options: FakeServerOptions) -> None:
        self.options = options
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
            "vram_mib": self.held_mib,
            "parked": self.state in ("parked", "waking"),
            "model": self.options.model,
            "uptime_s": round(time.time() - self.started, 3),
            "options": opts,
        }

    def log(self, message: str) -> None:
        print(f"fake server pid {os.getpid()}: {message}", file=sys.stderr, flush=True)


# States in which the process is alive and serving: /health answers 200.
_SERVING = ("ready", "parking", "parked", "waking")


class _NotServing(Exception):
    """A park or wake asked while loading or stopping; answered 503."""


def _park(server: _Server, sim: SimGpu, how: str, delay_s: float = 0.0) -> None:
    """Free the model memory down to residual + leak; no-op when already parked."""
    with server.transition:
        if server.state == "parked":
            return
        if server.state != "ready" or server.stop_requested:
            raise _NotServing(server.state)
        opts = server.options
        if delay_s > 0:
            server.state = "parking"
            if _wait(server, delay_s):
                return
        server.model_mib = server.held_mib
        keep = min(server.held_mib, opts.residual_mib + opts.leak_mib)
        if server.held_mib > keep:
            sim.release(server.held_mib - keep)
        server.held_mib = keep
        server.state = "parked"
        _say(f"parked ({how}): holding {keep} MiB of {server.model_mib} MiB")


def _wake(server: _Server, sim: SimGpu, how: str) -> None:
    """Allocate the model memory again after ``wake_s``; no-op when already awake.

    Raises SimOutOfMemory (the server stays parked) or _NotServing.
    """
    with server.transition:
        if server.state == "ready":
            return
        if server.state != "parked" or server.stop_requested:
            raise _NotServing(server.state)
        server.state = "waking"
        if _wait(server, server.options.wake_s):
            return
        missing = server.model_mib - server.held_mib
        try:
            if missing > 0:
                sim.allocate(missing)
        except SimOutOfMemory as exc:
            server.state = "parked"
            _say(f"wake failed ({how}): out of memory: {exc}")
            raise
        server.held_mib = server.model_mib
        server.state = "ready"
        _say(f"awake ({how}): holding {server.held_mib} MiB")


def _say(message: str) -> None:
    print(f"fake server pid {os.getpid()}: {message}", flush=True)


def _in_background(target: Any, *args: Any) -> None:
    def run() -> None:
        try:
            target(*args)
        except (_NotServing, SimOutOfMemory):
            return  # already said, or nothing to do while loading or stopping

    threading.Thread(target=run, daemon=True).start()


def _unloads(keep_alive: Any) -> bool:
    """Whether an Ollama ``keep_alive`` asks to unload now (0, "0", "0s", "0m"…)."""
    if isinstance(keep_alive, bool):
        return False
    if isinstance(keep_alive, int | float):
        return keep_alive == 0
    if isinstance(keep_alive, str):
        digits = keep_alive.strip().rstrip("hms")
        try:
            return float(digits) == 0
        except ValueError:
            return False
    return False


_NOT_FOUND_LLAMA = {"code": 404, "message": "model not found", "type": "not_found_error"}


class _Handler(BaseHTTPRequestHandler):
    """HTTP for one server; :func:`_handler` makes a subclass bound to it."""

    fake: _Server
    sim: SimGpu

    # -------------------------------------------------------------- plumbing
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

    def is_model(self, name: Any) -> bool:
        model = self.fake.options.model
        return name in (model, f"{model}:latest")

    def loaded(self) -> bool:
        return self.fake.state in ("ready", "parking")

    def park(self, how: str) -> None:
        _park(self.fake, self.sim, how)

    def wake(self, how: str) -> None:
        _wake(self.fake, self.sim, how)

    # -------------------------------------------------------------- GET
    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        model = self.fake.options.model
        if path == "/is_sleeping":
            self.reply(200, {"is_sleeping": not self.loaded()})
        elif path == "/api/ps":
            size = self.fake.held_mib * 1024 * 1024
            entry = {"name": model, "model": model, "size": size, "size_vram": size}
            self.reply(200, {"models": [entry] if self.loaded() else []})
        elif path == "/models":
            status = {"value": "loaded" if self.loaded() else "unloaded"}
            self.reply(200, {"data": [{"id": model, "object": "model", "status": status}]})
        elif path == "/health":
            self.reply(200 if self.fake.state in _SERVING else 503, self.fake.info())
        else:
            self.reply(200 if path in ("/", "/info") else 404, self.fake.info())

    # -------------------------------------------------------------- POST
    def do_POST(self) -> None:
        path, _, query = self.path.partition("?")
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length > 0 else b""
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
        except _NotServing as exc:
            self.reply(503, {"error": f"the server is {exc}"})
        except SimOutOfMemory as exc:
            self.reply(503, {"error": f"out of memory: {exc}"})

    def vllm_sleep(self, query: dict[str, list[str]], body: dict[str, Any]) -> None:
        self.park(f"vllm sleep level={query.get('level', ['1'])[0]}")
        self.reply(200)

    def vllm_wake_up(self, query: dict[str, list[str]], body: dict[str, Any]) -> None:
        self.wake("vllm wake_up")
        self.reply(200)

    def sglang_release(self, query: dict[str, list[str]], body: dict[str, Any]) -> None:
        self.park(f"sglang release_memory_occupation tags={body.get('tags')}")
        self.reply(200, {"success": True, "message": "released"})

    def sglang_resume(self, query: dict[str, list[str]], body: dict[str, Any]) -> None:
        self.wake(f"sglang resume_memory_occupation tags={body.get('tags')}")
        self.reply(200, {"success": True, "message": "resumed"})

    def ollama_generate(self, query: dict[str, list[str]], body: dict[str, Any]) -> None:
        name = body.get("model")
        if not self.is_model(name):
            self.reply(404, {"error": f"model '{name}' not found"})
            return
        keep_alive = body.get("keep_alive")
        unload = _unloads(keep_alive)
        answer = {"model": name, "created_at": _now(), "response": "", "done": True}
        if body.get("prompt"):
            self.wake("ollama generate")
            if unload:
                self.park("ollama generate keep_alive=0")
            self.reply(200, {**answer, "response": "ok", "done_reason": "stop"})
        elif unload:
            self.park("ollama keep_alive=0")
            self.reply(200, {**answer, "done_reason": "unload"})
        else:
            self.wake(f"ollama keep_alive={keep_alive}")
            self.reply(200, {**answer, "done_reason": "load"})

    def comfyui_free(self, query: dict[str, list[str]], body: dict[str, Any]) -> None:
        if body.get("unload_models") or body.get("free_memory"):
            if self.fake.state not in _SERVING:
                raise _NotServing(self.fake.state)
            delay = self.fake.options.async_free_s
            _in_background(_park, self.fake, self.sim, "comfyui free", delay)
        self.reply(200)

    def comfyui_prompt(self, query: dict[str, list[str]], body: dict[str, Any]) -> None:
        if self.fake.state not in _SERVING:
            raise _NotServing(self.fake.state)
        with self.fake.counter:
            self.fake.prompts += 1
            number = self.fake.prompts
        _in_background(_wake, self.fake, self.sim, "comfyui prompt")
        self.reply(200, {"prompt_id": str(uuid.uuid4()), "number": number, "node_errors": {}})

    def llama_load(self, query: dict[str, list[str]], body: dict[str, Any]) -> None:
        if not self.is_model(body.get("model")):
            self.reply(404, {"error": _NOT_FOUND_LLAMA})
            return
        self.wake("llama.cpp models/load")
        self.reply(200, {"success": True})

    def llama_unload(self, query: dict[str, list[str]], body: dict[str, Any]) -> None:
        if not self.is_model(body.get("model")):
            self.reply(404, {"error": _NOT_FOUND_LLAMA})
            return
        self.park("llama.cpp models/unload")
        self.reply(200, {"success": True})


_POST_ROUTES: dict[str, Callable[[_Handler, dict[str, list[str]], dict[str, Any]], None]] = {
    "/sleep": _Handler.vllm_sleep,
    "/wake_up": _Handler.vllm_wake_up,
    "/release_memory_occupation": _Handler.sglang_release,
    "/resume_memory_occupation": _Handler.sglang_resume,
    "/api/generate": _Handler.ollama_generate,
    "/free": _Handler.comfyui_free,
    "/prompt": _Handler.comfyui_prompt,
    "/models/load": _Handler.llama_load,
    "/models/unload": _Handler.llama_unload,
}


def _handler(server: _Server, sim: SimGpu) -> type[BaseHTTPRequestHandler]:
    return type("Handler", (_Handler,), {"fake": server, "sim": sim})


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _install_signals(server: _Server) -> None:
    def on_stop(signum: int, frame: FrameType | None) -> None:
        server.stop_requested = True

    signal.signal(signal.SIGTERM, signal.SIG_IGN if server.options.ignore_sigterm else on_stop)
    signal.signal(signal.SIGINT, on_stop)


def _wait(server: _Server, seconds: float) -> bool:
    """Sleep up to ``seconds``; True if a stop was requested meanwhile."""
    deadline = time.monotonic() + seconds
    while not server.stop_requested:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(_TICK_S, left))
    return True


def _allocate(server: _Server, sim: SimGpu, mib: int) -> None:
    sim.allocate(mib)
    server.held_mib += mib


def run_fake_server(options: FakeServerOptions, sim: SimGpu) -> int:
    """Serve until stopped, crashed or out of memory; returns the process exit code."""
    server = _Server(options)
    _install_signals(server)
    try:
        httpd = ThreadingHTTPServer((options.host, options.port), _handler(server, sim))
    except OSError as exc:
        server.log(f"cannot listen on {options.host}:{options.port}: {exc.strerror}")
        return EXIT_PORT
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05})
    thread.daemon = True
    thread.start()
    try:
        return _lifecycle(server, sim)
    finally:
        httpd.shutdown()
        httpd.server_close()


def _lifecycle(server: _Server, sim: SimGpu) -> int:
    options = server.options
    server.log(
        f"listening on {options.host}:{options.port}; loading {options.vram_mib} MiB "
        f"over {options.load_s}s"
    )
    chunks = _split(options.vram_mib, _CHUNKS)
    try:
        for chunk in chunks or [0]:
            if _wait(server, options.load_s / max(len(chunks), 1)):
                return _stop(server)
            if chunk:
                _allocate(server, sim, chunk)
        with server.transition:  # no park before growing is done
            server.state = "ready"
            server.log(f"ready, holding {server.held_mib} MiB")
            if options.grow_mib > 0:
                _allocate(server, sim, options.grow_mib)
                server.log(f"grew to {server.held_mib} MiB")
            server.model_mib = server.held_mib
    except SimOutOfMemory as exc:
        server.state = "oom"
        server.log(f"out of memory: {exc}")
        return EXIT_OOM
    if _wait(server, float("inf") if options.crash_after is None else options.crash_after):
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
