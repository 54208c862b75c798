"""The seed config, and a coordinator on it with two clients already in their phases.

The seed config is the original plan's (``examples/mcn-rtx4090.yaml``) as the tests run
it (``tests/seed_helpers.py``'s ``seed_config``): the four services comfyui, cosyvoice,
vidi and ollama as real fake model servers (``gpusm sim service``) on a simulated
24 GiB GPU, the five phases plus ``chat``, and ``pipeline:`` on, so every
``enter_phase`` also looks at the next GPU phase to prefetch it. Two clients hold
``analysis`` (vidi) and ``tts`` (cosyvoice): a no-op ``enter_phase`` of either one
changes nothing, but goes through the whole pipelined path. Figures 3 and 8 use it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from benchmarks.common import Ctx, fake_service_entry, free_port, write_config
from gpusm import Coordinator
from gpusm.ports import EventQuery

__all__ = ["HOLDERS", "PIPELINE", "SEED", "SeedNoop", "seed_doc"]

# name: (vram MiB, priority, load s), as tests/seed_helpers.py
SEED = {
    "comfyui": (20480, 100, 0.6),
    "cosyvoice": (4096, 50, 0.3),
    "vidi": (4096, 40, 0.3),
    "ollama": (18432, 10, 0.3),
}
PIPELINE = ["crawl", "analysis", "tts", "video", "render"]
# client -> the phase it holds
HOLDERS = {"worker-analysis": "analysis", "worker-tts": "tts"}
STOP_S = 0.05


def seed_doc(folder: Path, api_port: int | None = None) -> dict[str, Any]:
    """The seed config (state under ``folder``), with ``api:`` when ``api_port`` is given."""
    services = {
        name: fake_service_entry(vram, prio, load, STOP_S, free_port())
        for name, (vram, prio, load) in SEED.items()
    }
    doc: dict[str, Any] = {
        "state_dir": str(folder / "state"),
        "gpu": {
            "backend": "sim",
            "reserve_mib": 0,
            "settle_timeout_s": 5,
            "sim": {"total_mib": 24576, "reclaim_lag_s": 0.05},
        },
        "services": services,
        "phases": {
            "crawl": {"services": [], "release": True},
            "analysis": ["vidi"],
            "tts": ["cosyvoice"],
            "video": ["comfyui"],
            "render": {"services": [], "release": True},
            "chat": ["ollama"],
        },
        "pipeline": PIPELINE,
    }
    if api_port is not None:
        doc["api"] = {"listen": f"127.0.0.1:{api_port}"}
    return doc


class SeedNoop:
    """An in-process coordinator (monitor on) on the seed config, both holders in place.

    ``calls(n)`` times ``n`` no-op ``enter_phase`` calls, alternating the two clients,
    and fails if one started or stopped anything. ``close()`` stops the services.
    """

    def __init__(self, ctx: Ctx, name: str) -> None:
        folder = ctx.folder(name)
        self.coordinator = Coordinator.from_config(write_config(folder, seed_doc(folder)))
        try:
            for client, phase in HOLDERS.items():
                self.coordinator.enter_phase(phase, client=client, timeout=60)
            if not self.coordinator.wait_settled(timeout=60):
                raise RuntimeError("the seed services did not settle")
            self.calls(20)  # warm-up
            self._starts = self.starts()
        except BaseException:
            self.close()
            raise

    def starts(self) -> int:
        """How many service starts the log holds (prefetches included)."""
        return len(self.coordinator.events(EventQuery(types=["StartRequested"])))

    def calls(self, n: int) -> list[float]:
        """Time ``n`` no-op calls (seconds each), the two holders in turn."""
        clients = list(HOLDERS.items())
        times: list[float] = []
        for i in range(n):
            client, phase = clients[i % len(clients)]
            began = time.perf_counter()
            result = self.coordinator.enter_phase(phase, client=client)
            times.append(time.perf_counter() - began)
            if result.started or result.stopped:
                raise RuntimeError(f"a no-op call started or stopped something: {result}")
        return times

    def check_no_starts(self) -> None:
        """Fail if anything (a prefetch, say) started since the warm-up."""
        if self.starts() != self._starts:
            raise RuntimeError("a service started during the no-op calls")

    def close(self) -> None:
        """Close the coordinator and stop its services."""
        self.coordinator.close(stop_services=True)
