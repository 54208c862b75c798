"""Parking and waking the fake model server, through the request shapes of real servers.

A ready fake server can be *parked* (its model memory freed down to ``residual_mib`` plus
``leak_mib``) and woken (the memory allocated again after ``wake_s``), so that parking
can be exercised without the real servers:

* vLLM (``--enable-sleep-mode``): ``POST /sleep?level=1|2`` parks, ``POST /wake_up``
  wakes (``?tags=weights`` or ``?tags=kv_cache``, as after a level 2 sleep, wake it all:
  awake, ``tags=kv_cache`` is the no-op 200 that follows the weights),
  ``GET /is_sleeping`` answers ``{"is_sleeping": bool}``, and ``POST /collective_rpc``
  ``{"method": "reload_weights"}`` answers ``{"results": [null]}`` when awake (503
  otherwise; 400 without ``method``; 500 for a method the fake does not know).
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

A server that spans several simulated devices (``CUDA_VISIBLE_DEVICES`` names more
than one) holds the same memory on each; a park frees it on each, a wake takes it back on
each (all or nothing: a wake refused on one device gives back what it took on the others).

Parking and waking are synchronous (the answer comes when the memory has moved) except
for ComfyUI's, idempotent (200 when already parked/awake), serialized (a wake asked while
parking waits for the park to finish, and the other way round), and answered 503 while
loading or stopping. A wake that the simulated GPU refuses records an OOM there, leaves
the server parked and answers 503. Each finished park or wake prints one line to stdout.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from gpusm.errors import SimOutOfMemory
from gpusm.gpu.sim import SimGpu

if TYPE_CHECKING:
    from gpusm.gpu.fake_server import FakeServerOptions

__all__ = [
    "GET_ROUTES",
    "POST_ROUTES",
    "SERVING",
    "NotServing",
    "Parkable",
    "ParkRoutes",
    "allocate_each",
    "release_each",
]

# States in which the process is alive and serving: /health answers 200.
SERVING = ("ready", "parking", "parked", "waking")

# The collective_rpc methods the fake answers (vLLM calls them on every worker).
_RPC_METHODS = ("reload_weights",)

_NOT_FOUND_LLAMA = {"code": 404, "message": "model not found", "type": "not_found_error"}


class Parkable(Protocol):
    """The server state that parking and waking move (the fake server's)."""

    options: FakeServerOptions
    state: str
    held_mib: int
    # The memory held when awake; set when loading ends and again before each park.
    model_mib: int
    stop_requested: bool
    # Serializes loading's end, parks and wakes: only one moves memory at a time.
    transition: threading.Lock
    prompts: int
    counter: threading.Lock

    def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; True if a stop was requested meanwhile."""
        ...


class NotServing(Exception):
    """A park or wake asked while loading or stopping; answered 503."""


def allocate_each(sims: Sequence[SimGpu], mib: int) -> None:
    """Allocate ``mib`` MiB on every device, or on none: SimOutOfMemory gives back the rest."""
    taken: list[SimGpu] = []
    try:
        for sim in sims:
            sim.allocate(mib)
            taken.append(sim)
    except SimOutOfMemory:
        for sim in taken:
            sim.release(mib)
        raise


def release_each(sims: Sequence[SimGpu], mib: int) -> None:
    """Free ``mib`` MiB on every device."""
    for sim in sims:
        sim.release(mib)


def park(server: Parkable, sims: Sequence[SimGpu], how: str, delay_s: float = 0.0) -> None:
    """Free the model memory down to residual + leak; no-op when already parked."""
    with server.transition:
        if server.state == "parked":
            return
        if server.state != "ready" or server.stop_requested:
            raise NotServing(server.state)
        opts = server.options
        if delay_s > 0:
            server.state = "parking"
            if server.wait(delay_s):
                return
        server.model_mib = server.held_mib
        keep = min(server.held_mib, opts.residual_mib + opts.leak_mib)
        if server.held_mib > keep:
            release_each(sims, server.held_mib - keep)
        server.held_mib = keep
        server.state = "parked"
        _say(f"parked ({how}): holding {keep} MiB of {server.model_mib} MiB{_each(sims)}")


def wake(server: Parkable, sims: Sequence[SimGpu], how: str) -> None:
    """Allocate the model memory again after ``wake_s``; no-op when already awake.

    Raises SimOutOfMemory (the server stays parked) or NotServing.
    """
    with server.transition:
        if server.state == "ready":
            return
        if server.state != "parked" or server.stop_requested:
            raise NotServing(server.state)
        server.state = "waking"
        if server.wait(server.options.wake_s):
            return
        missing = server.model_mib - server.held_mib
        try:
            if missing > 0:
                allocate_each(sims, missing)
        except SimOutOfMemory as exc:
            server.state = "parked"
            _say(f"wake failed ({how}): out of memory: {exc}")
            raise
        server.held_mib = server.model_mib
        server.state = "ready"
        _say(f"awake ({how}): holding {server.held_mib} MiB{_each(sims)}")


def _each(sims: Sequence[SimGpu]) -> str:
    return "" if len(sims) == 1 else f" on each of devices {', '.join(str(s.index) for s in sims)}"


def _say(message: str) -> None:
    print(f"fake server pid {os.getpid()}: {message}", flush=True)


def _in_background(target: Callable[..., None], *args: Any) -> None:
    def run() -> None:
        try:
            target(*args)
        except (NotServing, SimOutOfMemory):
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


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


Query = dict[str, list[str]]


class ParkRoutes:
    """The park and wake endpoints, mixed into the fake server's request handler.

    A POST route is called as ``route(handler, query, body)`` and raises NotServing or
    SimOutOfMemory for a 503; a GET route as ``route(handler)``.
    """

    fake: Parkable
    # The devices the server holds memory on (CUDA_VISIBLE_DEVICES), the same on each.
    sims: Sequence[SimGpu]

    def reply(self, status: int, doc: Any = None) -> None:
        raise NotImplementedError  # the handler's

    def is_model(self, name: Any) -> bool:
        model = self.fake.options.model
        return name in (model, f"{model}:latest")

    def loaded(self) -> bool:
        return self.fake.state in ("ready", "parking")

    def park(self, how: str) -> None:
        park(self.fake, self.sims, how)

    def wake(self, how: str) -> None:
        wake(self.fake, self.sims, how)

    # -------------------------------------------------------------- GET
    def vllm_is_sleeping(self) -> None:
        self.reply(200, {"is_sleeping": not self.loaded()})

    def ollama_ps(self) -> None:
        model = self.fake.options.model
        size = self.fake.held_mib * len(self.sims) * 1024 * 1024
        entry = {"name": model, "model": model, "size": size, "size_vram": size}
        self.reply(200, {"models": [entry] if self.loaded() else []})

    def llama_models(self) -> None:
        status = {"value": "loaded" if self.loaded() else "unloaded"}
        model = self.fake.options.model
        self.reply(200, {"data": [{"id": model, "object": "model", "status": status}]})

    # -------------------------------------------------------------- vLLM
    def vllm_sleep(self, query: Query, body: dict[str, Any]) -> None:
        self.park(f"vllm sleep level={query.get('level', ['1'])[0]}")
        self.reply(200)

    def vllm_wake_up(self, query: Query, body: dict[str, Any]) -> None:
        # Any tags wake it all; awake, the second step of a level 2 wake is a no-op.
        tags = query.get("tags")
        self.wake("vllm wake_up" + (f" tags={','.join(tags)}" if tags else ""))
        self.reply(200)

    def vllm_collective_rpc(self, query: Query, body: dict[str, Any]) -> None:
        method = body.get("method")
        if method is None:
            self.reply(400, {"detail": "Missing 'method' in request body"})
            return
        if method not in _RPC_METHODS:
            self.reply(500, {"error": f"the fake worker has no method {method!r}"})
            return
        with self.fake.transition:  # after any park or wake in progress
            if self.fake.state != "ready":
                raise NotServing(f"{self.fake.state}; wake it before {method}")
            _say(f"{method} (vllm collective_rpc)")
        self.reply(200, {"results": [None]})  # one result per worker; the fake has one

    # -------------------------------------------------------------- SGLang
    def sglang_release(self, query: Query, body: dict[str, Any]) -> None:
        self.park(f"sglang release_memory_occupation tags={body.get('tags')}")
        self.reply(200, {"success": True, "message": "released"})

    def sglang_resume(self, query: Query, body: dict[str, Any]) -> None:
        self.wake(f"sglang resume_memory_occupation tags={body.get('tags')}")
        self.reply(200, {"success": True, "message": "resumed"})

    # -------------------------------------------------------------- Ollama
    def ollama_generate(self, query: Query, body: dict[str, Any]) -> None:
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

    # -------------------------------------------------------------- ComfyUI
    def comfyui_free(self, query: Query, body: dict[str, Any]) -> None:
        if body.get("unload_models") or body.get("free_memory"):
            if self.fake.state not in SERVING:
                raise NotServing(self.fake.state)
            delay = self.fake.options.async_free_s
            _in_background(park, self.fake, self.sims, "comfyui free", delay)
        self.reply(200)

    def comfyui_prompt(self, query: Query, body: dict[str, Any]) -> None:
        if self.fake.state not in SERVING:
            raise NotServing(self.fake.state)
        with self.fake.counter:
            self.fake.prompts += 1
            number = self.fake.prompts
        _in_background(wake, self.fake, self.sims, "comfyui prompt")
        self.reply(200, {"prompt_id": str(uuid.uuid4()), "number": number, "node_errors": {}})

    # -------------------------------------------------------------- llama.cpp
    def llama_load(self, query: Query, body: dict[str, Any]) -> None:
        if not self.is_model(body.get("model")):
            self.reply(404, {"error": _NOT_FOUND_LLAMA})
            return
        self.wake("llama.cpp models/load")
        self.reply(200, {"success": True})

    def llama_unload(self, query: Query, body: dict[str, Any]) -> None:
        if not self.is_model(body.get("model")):
            self.reply(404, {"error": _NOT_FOUND_LLAMA})
            return
        self.park("llama.cpp models/unload")
        self.reply(200, {"success": True})


GET_ROUTES: dict[str, Callable[[ParkRoutes], None]] = {
    "/is_sleeping": ParkRoutes.vllm_is_sleeping,
    "/api/ps": ParkRoutes.ollama_ps,
    "/models": ParkRoutes.llama_models,
}

POST_ROUTES: dict[str, Callable[[ParkRoutes, Query, dict[str, Any]], None]] = {
    "/sleep": ParkRoutes.vllm_sleep,
    "/wake_up": ParkRoutes.vllm_wake_up,
    "/collective_rpc": ParkRoutes.vllm_collective_rpc,
    "/release_memory_occupation": ParkRoutes.sglang_release,
    "/resume_memory_occupation": ParkRoutes.sglang_resume,
    "/api/generate": ParkRoutes.ollama_generate,
    "/free": ParkRoutes.comfyui_free,
    "/prompt": ParkRoutes.comfyui_prompt,
    "/models/load": ParkRoutes.llama_load,
    "/models/unload": ParkRoutes.llama_unload,
}
