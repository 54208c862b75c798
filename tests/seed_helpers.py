"""The seed config (the plan's four services) on a simulated GPU, with fake model servers.

Shared by the coordinator and API tests (``tests/`` is on the import path).
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path
from typing import Any

import yaml

from gpusm.gpu.sim import SimGpu

SEED = {
    # name: (vram MiB, priority, load seconds)
    "comfyui": (20480, 100, 0.6),
    "cosyvoice": (4096, 50, 0.3),
    "vidi": (4096, 40, 0.3),
    "ollama": (18432, 10, 0.3),
}


def free_port() -> int:
    """A TCP port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fake_service(
    vram: int, priority: int, load_s: float, port: int, *flags: str, **extra: Any
) -> dict[str, Any]:
    """A native service entry running gpusm's fake model server."""
    command = [sys.executable, "-m", "gpusm", "sim", "service", "--vram-mib", str(vram)]
    command += ["--port", str(port), "--load-s", str(load_s), "--stop-s", "0.05", *flags]
    return {
        "command": command,
        "vram_mib": vram,
        "priority": priority,
        "health": {"http": f"http://127.0.0.1:{port}/health", "timeout_s": 20},
        "stop_timeout_s": 2,
        "drain_timeout_s": 2,
        **extra,
    }


def seed_config(tmp_path: Path, load_scale: float = 1.0, **overrides: Any) -> dict[str, Any]:
    """The original plan's four services and five phases (plus chat) on a simulated 24 GiB GPU.

    ``load_scale`` multiplies every service's load time; ``overrides`` replace top-level keys.
    """
    services = {
        name: fake_service(vram, prio, round(load * load_scale, 3), free_port())
        for name, (vram, prio, load) in SEED.items()
    }
    doc: dict[str, Any] = {
        "state_dir": str(tmp_path / "state"),
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
        "pipeline": ["crawl", "analysis", "tts", "video", "render"],
    }
    doc.update(overrides)
    return doc


def write_config(tmp_path: Path, doc: dict[str, Any]) -> Path:
    """``doc`` as ``tmp_path/gpusm.yaml``."""
    path = tmp_path / "gpusm.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def sim_of(path: Path) -> SimGpu:
    """The simulated GPU of the config at ``path``."""
    doc = yaml.safe_load(path.read_text())
    return SimGpu(Path(doc["state_dir"]) / "simgpu")
