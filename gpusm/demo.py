"""``gpusm demo``: the original plan's pipeline on a simulated 24 GiB GPU, with real processes.

It writes a config into a demo folder (four fake model servers at the plan's sizes and
priorities, load times scaled down), runs crawl → analysis → tts → video → render for a
few items through a real :class:`~gpusm.engine.coordinator.Coordinator`, samples the simulated
GPU the whole time, and returns a summary. The database stays for ``gpusm events``.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpusm.config import to_yaml
from gpusm.engine.coordinator import Coordinator
from gpusm.ports import EventQuery
from gpusm.results import PhaseResult
from gpusm.wiring import open_sim

__all__ = ["DemoSummary", "run_demo", "write_demo_config"]

# name: (VRAM MiB, priority, load seconds) — the plan's sizes, loads scaled down.
SERVICES = {
    "comfyui": (20480, 100, 1.5),
    "cosyvoice": (4096, 50, 0.6),
    "vidi": (4096, 40, 0.6),
    "ollama": (18432, 10, 0.8),
}
PIPELINE = ["crawl", "analysis", "tts", "video", "render"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_demo_config(folder: Path) -> Path:
    """Write ``folder/gpusm.yaml`` for the demo (fresh ports each time) and return its path."""
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
            ],
            "vram_mib": vram,
            "priority": priority,
            "health": {"http": f"http://127.0.0.1:{port}/health", "timeout_s": 60},
            "stop_timeout_s": 5,
        }
    doc = {
        "state_dir": "./state",
        "gpu": {
            "backend": "sim",
            "reserve_mib": 0,
            "settle_timeout_s": 5,
            "sim": {"total_mib": 24576, "reclaim_lag_s": 0.2},
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
    peak_used_mib: int = 0
    total_mib: int = 0
    ooms: int = 0
    max_reclaim_s: float = 0.0
    wall_s: float = 0.0
    config: Path = Path()


class _Sampler(threading.Thread):
    """Reads the simulated GPU every 20 ms and keeps the peak."""

    def __init__(self, used_mib: Callable[[], int]) -> None:
        super().__init__(name="gpusm-demo-sampler", daemon=True)
        self.used_mib = used_mib
        self.peak = 0
        self.stop_flag = threading.Event()

    def run(self) -> None:
        while not self.stop_flag.wait(0.02):
            self.peak = max(self.peak, self.used_mib())


def run_demo(
    folder: Path,
    items: int = 3,
    work_s: float = 0.3,
    on_phase: Callable[[int, str, PhaseResult, Coordinator], None] | None = None,
) -> DemoSummary:
    """Run the pipeline ``items`` times; ``on_phase`` is called after each phase is ready."""
    config = write_demo_config(folder)
    summary = DemoSummary(items=items, config=config)
    began = time.monotonic()
    with Coordinator.from_config(config) as coordinator:
        sim = open_sim(coordinator.config)
        ooms_before = len(sim.ooms())
        newest = coordinator.events(EventQuery(newest_first=True, limit=1))
        after = newest[0].seq if newest else 0
        sampler = _Sampler(lambda: sim.snapshot().used_mib)
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
            elif event.type == "Stopped":
                summary.max_reclaim_s = max(summary.max_reclaim_s, event.data.get("reclaim_s", 0))
        summary.peak_used_mib = sampler.peak
        summary.total_mib = sim.total_mib
        summary.ooms = len(sim.ooms()) - ooms_before
    summary.wall_s = time.monotonic() - began
    return summary
