"""The fake model server parks and wakes through the request shapes of real servers."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from gpusm.gpu import SimGpu
from tests.gpu.sim_helpers import Spawner, free_port
from tests.support import eventually

FULL = 400
WAKE_S = 0.3


@dataclass
class Served:
    proc: subprocess.Popen[str]
    port: int
    log: Path

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def post(self, path: str, doc: Any = None) -> httpx.Response:
        return httpx.post(self.url(path), json=doc, timeout=10.0, trust_env=False)

    def get(self, path: str) -> httpx.Response:
        return httpx.get(self.url(path), timeout=10.0, trust_env=False)

    def lines(self, word: str) -> list[str]:
        return [line for line in self.log.read_text().splitlines() if word in line]


Start = Callable[..., tuple[Served, SimGpu]]


@pytest.fixture
def start(spawner: Spawner, sim_dir: Path, tmp_path: Path) -> Start:
    """Start a ready ``gpusm sim service`` of FULL MiB with the given flags."""

    def _start(*flags: str) -> tuple[Served, SimGpu]:
        sim = SimGpu(sim_dir, total_mib=1000, reclaim_lag_s=0.0)
        port = free_port()
        log = tmp_path / f"server-{port}.log"
        argv = [sys.executable, "-m", "gpusm", "sim", "service", "--sim-dir", str(sim_dir)]
        argv += ["--vram-mib", str(FULL), "--port", str(port), "--wake-s", str(WAKE_S), *flags]
        with log.open("w") as out:
            proc = spawner.popen(argv, stdout=out, stderr=subprocess.DEVNULL)
        served = Served(proc, port, log)

        def ready() -> bool:
            assert proc.poll() is None, f"server exited with {proc.returncode}"
            try:
                return served.get("/health").status_code == 200
            except httpx.TransportError:
                return False

        eventually(ready, timeout_s=20, what="the fake server to be ready")
        assert sim.holders() == {proc.pid: FULL}
        return served, sim

    return _start


def held(sim: SimGpu, served: Served) -> int:
    return sim.holders().get(served.proc.pid, 0)


def timed_wake(served: Served, path: str, doc: Any = None) -> httpx.Response:
    """A synchronous wake: it answers only once the memory is back, about WAKE_S later."""
    began = time.monotonic()
    response = served.post(path, doc)
    assert time.monotonic() - began >= WAKE_S * 0.9
    return response


def test_vllm_sleep_wake_and_is_sleeping(start: Start) -> None:
    served, sim = start("--residual-mib", "20")
    assert served.get("/is_sleeping").json() == {"is_sleeping": False}
    assert served.post("/sleep?level=1").status_code == 200
    assert held(sim, served) == 20
    assert served.get("/is_sleeping").json() == {"is_sleeping": True}
    assert served.get("/health").status_code == 200  # alive while parked
    assert served.post("/sleep?level=2").status_code == 200  # idempotent
    assert held(sim, served) == 20
    assert len(served.lines("parked")) == 1
    assert timed_wake(served, "/wake_up").status_code == 200
    assert held(sim, served) == FULL
    assert served.get("/is_sleeping").json() == {"is_sleeping": False}
    began = time.monotonic()
    assert served.post("/wake_up").status_code == 200  # already awake: at once
    assert time.monotonic() - began < WAKE_S
    assert held(sim, served) == FULL
    assert len(served.lines("awake")) == 1


def test_sglang_release_and_resume_keeping_the_leak(start: Start) -> None:
    served, sim = start("--residual-mib", "20", "--leak-mib", "30")
    tags = {"tags": ["weights", "kv_cache"]}
    assert served.post("/release_memory_occupation", tags).status_code == 200
    assert held(sim, served) == 50  # residual + leak
    assert served.get("/info").json()["parked"] is True
    assert served.post("/release_memory_occupation").status_code == 200  # no body, idempotent
    assert held(sim, served) == 50
    assert timed_wake(served, "/resume_memory_occupation", tags).status_code == 200
    assert held(sim, served) == FULL
    assert served.post("/resume_memory_occupation").status_code == 200
    assert held(sim, served) == FULL


def test_ollama_keep_alive_unloads_and_loads(start: Start) -> None:
    served, sim = start("--model", "llama3", "--residual-mib", "10")
    wrong = served.post("/api/generate", {"model": "mistral", "keep_alive": 0})
    assert wrong.status_code == 404
    assert "not found" in wrong.json()["error"]
    assert held(sim, served) == FULL
    [loaded] = served.get("/api/ps").json()["models"]
    assert (loaded["name"], loaded["size_vram"]) == ("llama3", FULL * 1024 * 1024)
    unload = served.post("/api/generate", {"model": "llama3", "keep_alive": 0})
    assert unload.status_code == 200
    assert unload.json() | {"created_at": None} == {
        "model": "llama3",
        "created_at": None,
        "response": "",
        "done": True,
        "done_reason": "unload",
    }
    assert held(sim, served) == 10
    assert served.get("/api/ps").json() == {"models": []}
    again = served.post("/api/generate", {"model": "llama3", "keep_alive": 0})
    assert again.json()["done_reason"] == "unload"
    load = timed_wake(served, "/api/generate", {"model": "llama3", "keep_alive": -1})
    assert (load.json()["done_reason"], load.json()["done"]) == ("load", True)
    assert held(sim, served) == FULL
    assert served.get("/api/ps").json()["models"][0]["name"] == "llama3"


def test_comfyui_free_answers_before_the_memory_moves_and_prompt_reloads(start: Start) -> None:
    served, sim = start("--async-free-s", "0.5", "--residual-mib", "5")
    free = {"unload_models": True, "free_memory": True}
    assert served.post("/free", free).status_code == 200
    assert held(sim, served) == FULL  # freed later, in the background
    assert served.post("/free", free).status_code == 200  # idempotent while freeing
    eventually(lambda: held(sim, served) == 5, what="ComfyUI's memory to be freed")
    assert served.post("/free", free).status_code == 200  # idempotent once freed
    assert held(sim, served) == 5
    assert len(served.lines("parked")) == 1
    first = served.post("/prompt", {"prompt": {}})
    assert first.status_code == 200
    assert first.json()["number"] == 1
    assert len(first.json()["prompt_id"]) == 36
    eventually(lambda: held(sim, served) == FULL, what="ComfyUI to reload its model")
    second = served.post("/prompt", {"prompt": {}})
    assert second.json()["number"] == 2
    assert second.json()["prompt_id"] != first.json()["prompt_id"]
    assert held(sim, served) == FULL


def test_llama_cpp_router_unload_and_load(start: Start) -> None:
    served, sim = start("--residual-mib", "15")
    wrong = served.post("/models/unload", {"model": "other"})
    assert wrong.status_code == 404
    assert wrong.json()["error"]["code"] == 404
    assert served.post("/models/unload", {"model": "fake-model"}).json() == {"success": True}
    assert held(sim, served) == 15
    assert served.get("/models").json()["data"][0]["status"]["value"] == "unloaded"
    assert served.post("/models/unload", {"model": "fake-model"}).status_code == 200
    load = timed_wake(served, "/models/load", {"model": "fake-model"})
    assert load.json() == {"success": True}
    assert held(sim, served) == FULL
    assert served.post("/models/load", {"model": "fake-model"}).status_code == 200
    assert held(sim, served) == FULL


def test_wake_refused_by_the_gpu_stays_parked(start: Start, spawner: Spawner) -> None:
    served, sim = start()
    assert served.post("/sleep").status_code == 200
    assert held(sim, served) == 0
    spawner.holder(sim.directory, 800)  # someone takes the memory meanwhile
    refused = served.post("/wake_up")
    assert refused.status_code == 503
    assert "out of memory" in refused.json()["error"]
    assert served.get("/is_sleeping").json() == {"is_sleeping": True}
    assert sim.ooms()[-1]["pid"] == served.proc.pid


def test_ollama_prompt_loads_answers_and_unloads_with_keep_alive_zero(start: Start) -> None:
    served, sim = start("--model", "llama3")
    assert served.post("/api/generate", {"model": "llama3", "keep_alive": "0s"}).status_code == 200
    assert held(sim, served) == 0
    doc = {"model": "llama3", "prompt": "hi", "keep_alive": "0"}
    answer = timed_wake(served, "/api/generate", doc).json()
    assert (answer["done_reason"], answer["response"]) == ("stop", "ok")
    assert held(sim, served) == 0  # loaded for the answer, unloaded after it
    assert len(served.lines("awake")) == 1
    assert len(served.lines("parked")) == 2


def test_vllm_level_2_wake_weights_then_reload_then_kv_cache(start: Start) -> None:
    served, sim = start("--residual-mib", "20")
    assert served.post("/sleep?level=2").status_code == 200
    assert held(sim, served) == 20
    # The weights are gone: reloading them before waking is refused.
    refused = served.post("/collective_rpc", {"method": "reload_weights"})
    assert refused.status_code == 503
    assert "parked" in refused.json()["error"]
    # The three requests the vllm preset sends for level 2, in its order.
    assert timed_wake(served, "/wake_up?tags=weights").status_code == 200
    assert held(sim, served) == FULL
    assert served.get("/is_sleeping").json() == {"is_sleeping": False}
    reload = served.post("/collective_rpc", {"method": "reload_weights"})
    assert (reload.status_code, reload.json()) == (200, {"results": [None]})
    began = time.monotonic()
    assert served.post("/wake_up?tags=kv_cache").status_code == 200  # awake: a no-op
    assert time.monotonic() - began < WAKE_S
    assert held(sim, served) == FULL
    assert len(served.lines("awake")) == 1
    assert len(served.lines("reload_weights")) == 1


def test_vllm_wake_up_with_any_tags_wakes_it_all(start: Start) -> None:
    served, sim = start("--residual-mib", "20")
    assert served.post("/sleep?level=1").status_code == 200
    assert timed_wake(served, "/wake_up?tags=kv_cache&tags=weights").status_code == 200
    assert held(sim, served) == FULL
    [awake] = served.lines("awake")
    assert "vllm wake_up tags=kv_cache,weights" in awake


def test_vllm_collective_rpc_refuses_what_vllm_refuses(start: Start) -> None:
    served, sim = start()
    missing = served.post("/collective_rpc", {"args": []})
    assert missing.status_code == 400
    assert "method" in missing.json()["detail"]
    unknown = served.post("/collective_rpc", {"method": "no_such_method"})
    assert unknown.status_code == 500
    assert "no_such_method" in unknown.json()["error"]
    assert held(sim, served) == FULL
