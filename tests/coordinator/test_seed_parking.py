"""The seed pipeline with ComfyUI and Vidi parkable, on real fake-server processes.

ComfyUI parks through the ``comfyui`` preset (``POST /free``, which answers at once and
frees ``--async-free-s`` later, so the park is verified on the GPU, not trusted) and has
no wake request: like a real worker, the video phase sends it a ``POST /prompt`` and
waits until it holds its model again. Vidi parks through vLLM's sleep mode. The same
pipeline runs twice in each test, once with ``park:`` and once without, the fake servers
started with the same options both times.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from gpusm import Coordinator
from gpusm.ports import EventQuery
from tests.coordinator.invariants import assert_consistent, wait_quiet
from tests.seed_helpers import parkable, seed_config, sim_of, write_config

Open = Callable[..., Coordinator]
ITEMS = 4
LOAD_SCALE = 0.3
COMFYUI_RESIDUAL_MIB = 1024
VIDI_RESIDUAL_MIB = 512
COSYVOICE_LOAD_S = 1.0


def pipeline_doc(folder: Path, park: bool, release: bool) -> dict[str, Any]:
    """The seed config, its fakes able to park; ``park``: with the ``park:`` entries;
    ``release``: crawl and render release the GPU (as in the seed), else they keep it
    (as figure 6's pipeline does)."""
    doc = seed_config(folder, load_scale=LOAD_SCALE)
    services = doc["services"]
    # Vidi and CosyVoice load equally fast in the seed: whether a prefetch of Vidi may
    # evict CosyVoice (not dearer to start again than the load it hides) is then a coin
    # flip on measured load times, and so is every later decision. A slower CosyVoice
    # makes each run take the same path.
    command = services["cosyvoice"]["command"]
    command[command.index("--load-s") + 1] = str(COSYVOICE_LOAD_S)
    services["comfyui"] = parkable(
        services["comfyui"], "comfyui", COMFYUI_RESIDUAL_MIB, 0.1, "--async-free-s", "0.1"
    )
    services["vidi"] = parkable(services["vidi"], "vllm", VIDI_RESIDUAL_MIB, 0.1)
    if not park:
        for service in services.values():
            service.pop("park", None)
    if not release:
        for phase in ("crawl", "render"):
            doc["phases"][phase] = {"services": [], "release": False}
    return doc


def prompt(client: httpx.Client, url: str, timeout_s: float = 30.0) -> None:
    """``POST /prompt`` to the fake ComfyUI and wait until it holds its model again."""
    client.post(f"{url}/prompt", json={"prompt": {}}, timeout=10).raise_for_status()
    deadline = time.monotonic() + timeout_s
    while client.get(f"{url}/info", timeout=10).json()["state"] != "ready":
        assert time.monotonic() < deadline, "ComfyUI did not reload its model after a prompt"
        time.sleep(0.01)


def run_pipeline(
    tmp_path: Path, open_coordinator: Open, *, park: bool, release: bool, items: int = ITEMS
) -> Counter[str]:
    """``items`` items of the pipeline by one worker; the log's event counts."""
    folder = tmp_path / ("park" if park else "stop")
    folder.mkdir()
    doc = pipeline_doc(folder, park, release)
    config = write_config(folder, doc)
    comfyui = str(doc["services"]["comfyui"]["health"]["http"]).removesuffix("/health")
    coordinator = open_coordinator(config)
    with httpx.Client() as client:
        for _ in range(items):
            for phase in coordinator.config.pipeline:
                coordinator.enter_phase(phase, client="worker", timeout=30)
                if phase == "video":
                    prompt(client, comfyui)
                # The phase's work: long enough for its prefetch to finish, so that each
                # run takes the same decisions (they do not race the worker's next phase).
                wait_quiet(coordinator, quiet_s=0.1)
    wait_quiet(coordinator)
    sim = sim_of(config)
    assert sim.ooms() == []
    assert_consistent(coordinator, sim)
    counts = Counter(e.type for e in coordinator.events())
    if park:
        residuals = {"comfyui": COMFYUI_RESIDUAL_MIB, "vidi": VIDI_RESIDUAL_MIB}
        for event in coordinator.events(EventQuery(types=["Parked"])):
            # Verified on the GPU: within the residual plus the default tolerance.
            assert event.data["held_mib"] <= residuals[event.stream] + 256, event.data
    coordinator.close(stop_services=True)
    return counts


@pytest.mark.slow
def test_parking_saves_cold_starts_in_the_seed_pipeline_without_an_oom(
    tmp_path: Path, open_coordinator: Open
) -> None:
    # crawl and render keep the GPU, so what the worker parked is still there to wake.
    parked = run_pipeline(tmp_path, open_coordinator, park=True, release=False)
    plain = run_pipeline(tmp_path, open_coordinator, park=False, release=False)

    assert parked["StartRequested"] < plain["StartRequested"], (parked, plain)
    assert parked["Woken"] >= 1, parked
    assert parked["ParkFailed"] == parked["WakeFailed"] == 0, parked
    assert plain["ParkRequested"] == plain["WakeRequested"] == 0, plain


@pytest.mark.slow
def test_parking_saves_cold_starts_when_the_seed_pipeline_releases_the_gpu(
    tmp_path: Path, open_coordinator: Open
) -> None:
    # crawl and render release the GPU (the seed as it is): a release parks what can
    # park and stops the rest, so the next item wakes ComfyUI and Vidi instead of
    # starting them cold.
    parked = run_pipeline(tmp_path, open_coordinator, park=True, release=True, items=2)
    plain = run_pipeline(tmp_path, open_coordinator, park=False, release=True, items=2)

    assert parked["StartRequested"] < plain["StartRequested"], (parked, plain)
    assert parked["Woken"] >= 1, parked
    assert parked["ParkFailed"] == parked["WakeFailed"] == 0, parked
