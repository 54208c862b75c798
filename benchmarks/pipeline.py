"""Figure 6: pipeline makespan — gpusm's default policy against the original plan's.

The original plan's pipeline (crawl → analysis → tts → video → render) on a simulated
24 GiB GPU with its four services (comfyui 20 GiB, ollama 18 GiB, vidi and cosyvoice
4 GiB each), each a real fake model server whose loads take comfyui 6 s, vidi 3 s,
cosyvoice 2 s, ollama 3 s; the worker's own work in each phase is a 1-2 s sleep (the
same pseudo-random draws for every policy). Loads, stops and work are scaled down by a
common factor to keep the run short; Python start-up (part of every real load) is not.
One worker runs every item through every phase; the makespan is its wall time.

- gpusm: the default policy — services stay warm until their room is needed, and the
  config's ``pipeline:`` lets gpusm prefetch the next phase's services;
- baseline: the original plan — ``release_all()`` in the CPU phases (crawl and render
  ``release: true``), no pipeline, hence no prefetch;
- lower bound: the work itself plus the loads no schedule can hide, from the services'
  own load times ``L`` measured standalone in this run. Before the first analysis,
  ``L(vidi)`` less the first crawl's work. Then, in every item, comfyui (20 GiB) cannot
  be resident beside both vidi and cosyvoice (24 GiB in all): either comfyui stays
  and cosyvoice loads only once analysis has released vidi (``L(cosyvoice)`` exposed),
  or comfyui loads after analysis, beside cosyvoice, hidden only by the tts work
  (``L(comfyui) - work(tts)`` exposed). So each item adds at least the smaller of the two.

Goals (the performance issue's): makespan ≤ 0.7x the eager plan's and ≤ 1.3x the lower
bound. Cold starts per item (``StartRequested`` events, prefetches included, over the
items) are reported for both policies, without a goal.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

from benchmarks.common import (
    Ctx,
    Row,
    fake_service_argv,
    fake_service_entry,
    free_port,
    http_client,
    median,
    spawn_service,
    wait_http_ok,
    write_config,
)
from gpusm import Coordinator
from gpusm.gpu.sim import SimGpu
from gpusm.ports import EventQuery

__all__ = ["GOAL_VS_BOUND", "GOAL_VS_EAGER", "lower_bound", "run"]

# name: (vram MiB, priority, load s)
SERVICES = {
    "comfyui": (20480, 100, 6.0),
    "vidi": (4096, 40, 3.0),
    "cosyvoice": (4096, 50, 2.0),
    "ollama": (18432, 10, 3.0),
}
PIPELINE = ["crawl", "analysis", "tts", "video", "render"]
STOP_S = 0.5
LAG_S = 0.2
WORK_S = (1.0, 2.0)
GOAL_VS_EAGER = 0.7
GOAL_VS_BOUND = 1.3


def base_doc(folder: Path, scale: float, *, release: bool, pipelined: bool) -> dict[str, Any]:
    """The figure's config: its services as fakes on a 24 GiB sim, its phases (crawl and
    render releasing the GPU when ``release``), and ``pipeline:`` when ``pipelined``."""
    services = {
        n: fake_service_entry(vram, prio, round(load * scale, 3), STOP_S * scale, free_port())
        for n, (vram, prio, load) in SERVICES.items()
    }
    doc: dict[str, Any] = {
        "state_dir": str(folder / "state"),
        "gpu": {
            "backend": "sim",
            "reserve_mib": 0,
            "settle_timeout_s": 10,
            "sim": {"total_mib": 24576, "reclaim_lag_s": LAG_S * scale},
        },
        "services": services,
        "phases": {
            "crawl": {"services": [], "release": release},
            "analysis": ["vidi"],
            "tts": ["cosyvoice"],
            "video": ["comfyui"],
            "render": {"services": [], "release": release},
            "chat": ["ollama"],
        },
    }
    if pipelined:
        doc["pipeline"] = PIPELINE
    return doc


def _doc(ctx: Ctx, name: str, scale: float, eager: bool) -> dict[str, Any]:
    folder = ctx.folder(f"pipeline-{name}")
    doc = base_doc(folder, scale, release=eager, pipelined=not eager)
    doc["_folder"] = folder
    return doc


def _run_pipeline(doc: dict[str, Any], work: list[dict[str, float]]) -> dict[str, Any]:
    folder = doc.pop("_folder")
    path = write_config(folder, doc)
    coordinator = Coordinator.from_config(path)
    try:
        began = time.perf_counter()
        waited = 0.0
        for item in work:
            for phase in PIPELINE:
                result = coordinator.enter_phase(phase, client="worker", timeout=120)
                waited += result.waited_s
                time.sleep(item[phase])
        makespan = time.perf_counter() - began
        coordinator.release("worker")
        starts = len(coordinator.events(EventQuery(types=["StartRequested"])))
        oom = SimGpu(folder / "state" / "simgpu").ooms()
    finally:
        coordinator.close(stop_services=True)
    if oom:
        raise RuntimeError(f"the simulated GPU recorded OOMs: {oom}")
    return {"makespan_s": makespan, "waited_s": waited, "service_starts": starts}


def _own_loads(ctx: Ctx, scale: float, reps: int) -> dict[str, float]:
    """Each pipeline service's own load time, standalone: spawn to first 200, 5 ms polls."""
    sim = SimGpu(ctx.folder("pipeline-own") / "sim", 24576, 0.0)
    times: dict[str, list[float]] = {n: [] for n in ("vidi", "cosyvoice", "comfyui")}
    with http_client() as client:
        for _ in range(reps):
            for name, sink in times.items():
                vram, _, load = SERVICES[name]
                port = free_port()
                argv = fake_service_argv(vram, port, round(load * scale, 3), 0.0, sim.directory)
                began = time.perf_counter()
                proc = spawn_service(ctx.guard, argv)
                ready = wait_http_ok(
                    client,
                    f"http://127.0.0.1:{port}/health",
                    poll_s=0.005,
                    timeout_s=60,
                    alive=lambda p=proc: p.poll() is None,  # type: ignore[misc]
                )
                sink.append(ready - began)
                ctx.guard.stop(proc)
    return {name: median(values) for name, values in times.items()}


def lower_bound(work: list[dict[str, float]], own: dict[str, float]) -> float:
    """The makespan no schedule can beat (see the module docstring)."""
    bound = sum(sum(item.values()) for item in work)
    bound += max(0.0, own["vidi"] - work[0]["crawl"])
    for item in work:
        bound += min(own["cosyvoice"], max(0.0, own["comfyui"] - item["tts"]))
    return bound


def run(ctx: Ctx) -> list[Row]:
    """Both policies over the same items, then the lower bound."""
    items, scale = (2, 0.1) if ctx.quick else (10, 0.15)
    rng = random.Random(20260201)
    work = [{p: round(rng.uniform(*WORK_S) * scale, 4) for p in PIPELINE} for _ in range(items)]
    total_work = sum(sum(item.values()) for item in work)
    ctx.log(f"  gpusm default policy, {items} items")
    ours = _run_pipeline(_doc(ctx, "gpusm", scale, eager=False), work)
    ctx.log(f"  eager release (the original plan), {items} items")
    eager = _run_pipeline(_doc(ctx, "eager", scale, eager=True), work)
    own = _own_loads(ctx, scale, 1 if ctx.quick else 2)
    bound = lower_bound(work, own)
    label = f"{items} items, loads and work x {scale:g}"
    vs_eager = ours["makespan_s"] / eager["makespan_s"]
    vs_bound = ours["makespan_s"] / bound
    ours_per_item = ours["service_starts"] / items
    eager_per_item = eager["service_starts"] / items
    details = {
        "items": items,
        "scale": scale,
        "total_work_s": total_work,
        "own_load_s": own,
        "lower_bound_s": bound,
        "gpusm": ours,
        "eager_release": eager,
        "eager_over_lower_bound": eager["makespan_s"] / bound,
        "gpusm_starts_per_item": ours_per_item,
        "eager_starts_per_item": eager_per_item,
    }
    return [
        Row(
            figure=f"6. Pipeline makespan vs. eager release ({label})",
            gpusm=f"{ours['makespan_s']:.2f} s ({ours['service_starts']} starts)",
            baseline=(
                f"release_all in CPU phases: {eager['makespan_s']:.2f} s "
                f"({eager['service_starts']} starts)"
            ),
            ratio=vs_eager,
            goal=f"≤ {GOAL_VS_EAGER:g}x",
            met=vs_eager <= GOAL_VS_EAGER,
            details=details,
        ),
        Row(
            figure=f"6. Pipeline makespan vs. lower bound ({label})",
            gpusm=f"{ours['makespan_s']:.2f} s",
            baseline=(
                f"work {total_work:.2f} s + loads no schedule can hide → {bound:.2f} s "
                f"(eager: {eager['makespan_s'] / bound:.2f}x)"
            ),
            ratio=vs_bound,
            goal=f"≤ {GOAL_VS_BOUND:g}x (1 is ideal)",
            met=vs_bound <= GOAL_VS_BOUND,
        ),
        Row(
            figure=f"6. Cold starts per item, StartRequested / items ({label})",
            gpusm=f"{ours_per_item:.2f} ({ours['service_starts']} starts)",
            baseline=(
                f"release_all in CPU phases: {eager_per_item:.2f} "
                f"({eager['service_starts']} starts)"
            ),
            ratio=ours_per_item / eager_per_item if eager_per_item else None,
            goal="—",
            met=None,
        ),
    ]
