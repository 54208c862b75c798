"""``gpusm demo``: the original plan's pipeline on simulated 24 GiB GPUs, with real processes.

It writes a config into a demo folder (four fake model servers at the plan's sizes and
priorities, load times scaled down), runs crawl → analysis → tts → video → render for a
few items through a real :class:`~gpusm.engine.coordinator.Coordinator`, samples the simulated
GPU the whole time, writes the run's VRAM timeline (``timeline.html``) and returns a
summary. The database stays for ``gpusm events``.

With ``devices`` > 1 the simulated GPU has that many devices of the same size, the
services may run on any (``gpu: auto``, placed by binpack), and the summary keeps each
device's peak as well.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from gpusm.config import Config, to_yaml
from gpusm.domain.events import RecordedEvent
from gpusm.engine.coordinator import Coordinator
from gpusm.ports import EventQuery
from gpusm.results import PhaseResult
from gpusm.timeline import build_timeline, render_html
from gpusm.wiring import open_sims

__all__ = ["DemoSummary", "run_demo", "write_demo_config"]

# name: (VRAM MiB, priority, load seconds) — the plan's sizes, loads scaled down.
SERVICES = {
    "comfyui": (20480, 100, 1.5),
    "cosyvoice": (4096, 50, 0.6),
    "vidi": (4096, 40, 0.6),
    "ollama": (18432, 10, 0.8),
}
PIPELINE = ["crawl", "analysis", "tts", "video", "render"]
# The services that sleep instead of stopping (the parked tier), as their real servers do.
PARKABLE = {"comfyui": "comfyui", "vidi": "vllm"}
# What a parked fake keeps (its "CUDA context"), and how long it takes to wake.
RESIDUAL_MIB = 512
WAKE_FRACTION = 0.1
DEVICE_MIB = 24576


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_demo_config(folder: Path, devices: int = 1) -> Path:
    """Write ``folder/gpusm.yaml`` for the demo (fresh ports each time) on ``devices``
    simulated GPUs of 24 GiB each, and return its path."""
    folder.mkdir(parents=True, exist_ok=True)
    services: dict[str, Any] = {}
    for name, (vram, priority, load) in SERVICES.items():
        port = _free_port()
        services[name] = {
            "command": [
                "{python}",
                "-m",
                "gpusm",
                "sim",
                "service",
                "--vram-mib",
                str(vram),
                "--port",
                str(port),
                "--load-s",
                str(load),
                "--stop-s",
                "0.1",
                "--residual-mib",
                str(RESIDUAL_MIB),
                "--wake-s",
                str(round(load * WAKE_FRACTION, 3)),
            ],
            "vram_mib": vram,
            "priority": priority,
            "health": {"http": f"http://127.0.0.1:{port}/health", "timeout_s": 60},
            "stop_timeout_s": 5,
        }
        if name in PARKABLE:
            park: dict[str, Any] = {"preset": PARKABLE[name], "residual_mib": RESIDUAL_MIB}
            if PARKABLE[name] == "comfyui":
                # ComfyUI reloads on its next prompt: warm it up with one, as a user would.
                prompt = {"url": f"http://127.0.0.1:{port}/prompt", "json": {"prompt": {}}}
                park["warmup"] = [{"http": prompt}]
            services[name]["park"] = park
        if devices > 1:
            services[name]["gpu"] = "auto"
    sim: dict[str, Any] = {"total_mib": DEVICE_MIB, "reclaim_lag_s": 0.2}
    if devices > 1:
        sim = {"devices": devices, **sim}
    doc = {
        "state_dir": "./state",
        "gpu": {
            "backend": "sim",
            "reserve_mib": 0,
            "settle_timeout_s": 5,
            "sim": sim,
        },
        "services": services,
        "phases": {
            "crawl": {"services": [], "release": True},
            "analysis": ["vidi"],
            "tts": ["cosyvoice"],
            "video": ["comfyui"],
            "render": {"services": [], "release": True},
        },
        "pipeline": PIPELINE,
    }
    path = folder / "gpusm.yaml"
    path.write_text("# Written by `gpusm demo`.\n" + to_yaml(doc))
    return path


@dataclass
class DemoSummary:
    """What the demo measured."""

    items: int
    phase_seconds: dict[str, list[float]] = field(default_factory=dict)
    evictions: int = 0
    preemptions: int = 0
    releases: int = 0
    starts: int = 0
    parks: int = 0
    wakes: int = 0
    # All devices together (one device: that device).
    peak_used_mib: int = 0
    total_mib: int = 0
    # Per device, device 0 first.
    device_peak_mib: list[int] = field(default_factory=list)
    device_total_mib: list[int] = field(default_factory=list)
    ooms: int = 0
    max_reclaim_s: float = 0.0
    wall_s: float = 0.0
    config: Path = Path()
    # The run's VRAM timeline (a self-contained HTML page), written at its end.
    timeline: Path = Path()


class _Sampler(threading.Thread):
    """Reads the simulated devices every 20 ms and keeps the peaks: of their sum, and of each."""

    def __init__(self, used_mib: Callable[[], list[int]]) -> None:
        super().__init__(name="gpusm-demo-sampler", daemon=True)
        self.used_mib = used_mib
        self.peak = 0
        self.peaks: list[int] = []
        self.stop_flag = threading.Event()

    def run(self) -> None:
        while not self.stop_flag.wait(0.02):
            used = self.used_mib()
            self.peak = max(self.peak, sum(used))
            self.peaks = [
                max(a, b) for a, b in zip(self.peaks or [0] * len(used), used, strict=True)
            ]


def run_demo(
    folder: Path,
    items: int = 3,
    work_s: float = 0.3,
    on_phase: Callable[[int, str, PhaseResult, Coordinator], None] | None = None,
    devices: int = 1,
) -> DemoSummary:
    """Run the pipeline ``items`` times on ``devices`` simulated GPUs; ``on_phase`` is
    called after each phase is ready."""
    config = write_demo_config(folder, devices)
    summary = DemoSummary(items=items, config=config)
    began = time.monotonic()
    with Coordinator.from_config(config) as coordinator:
        sims = open_sims(coordinator.config)
        ooms_before = sum(len(sim.ooms()) for sim in sims)
        newest = coordinator.events(EventQuery(newest_first=True, limit=1))
        after = newest[0].seq if newest else 0
        sampler = _Sampler(lambda: [sim.snapshot().used_mib for sim in sims])
        sampler.start()
        try:
            for item in range(1, items + 1):
                for phase in PIPELINE:
                    result = coordinator.enter_phase(phase, client="demo-worker")
                    summary.phase_seconds.setdefault(phase, []).append(result.waited_s)
                    if on_phase is not None:
                        on_phase(item, phase, result, coordinator)
                    time.sleep(work_s)  # the worker's own (CPU) work in this phase
            coordinator.release_all(by="demo")
            coordinator.wait_settled(30)
            events = coordinator.events(EventQuery(after_seq=after))
        finally:
            sampler.stop_flag.set()
            sampler.join()
            coordinator.close(stop_services=True)
        for event in events:
            if event.type == "Evicted":
                summary.evictions += 1
            elif event.type == "Preempted":
                summary.preemptions += 1
            elif event.type == "DrainRequested":
                summary.releases += 1
            elif event.type == "StartRequested":
                summary.starts += 1
            elif event.type == "Parked":
                summary.parks += 1
            elif event.type == "Woken":
                summary.wakes += 1
            elif event.type == "Stopped":
                summary.max_reclaim_s = max(summary.max_reclaim_s, event.data.get("reclaim_s", 0))
        summary.peak_used_mib = sampler.peak
        summary.device_peak_mib = sampler.peaks or [0] * len(sims)
        summary.device_total_mib = [sim.total_mib for sim in sims]
        summary.total_mib = sum(summary.device_total_mib)
        summary.ooms = sum(len(sim.ooms()) for sim in sims) - ooms_before
        summary.timeline = write_timeline(folder, events, coordinator.config, items)
    summary.wall_s = time.monotonic() - began
    return summary


def write_timeline(folder: Path, events: list[RecordedEvent], config: Config, items: int) -> Path:
    """The run's VRAM timeline as ``folder/timeline.html`` (self-contained); its path."""
    now = datetime.now(UTC)
    declared = {name: svc.vram_mib for name, svc in config.services.items()}
    timeline = build_timeline(events, now=now, declared=declared)
    path = folder / "timeline.html"
    title = f"gpusm demo: {items} item(s) through {' → '.join(PIPELINE)}"
    path.write_text(render_html(timeline, now=now, names=list(config.services), title=title))
    return path
