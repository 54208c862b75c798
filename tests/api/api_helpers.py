"""Helpers for API tests: the seed config on a simulated GPU, with fake model servers."""

from __future__ import annotations

import socket
import sys
from pathlib import Path
from typing import Any

import yaml

TOKEN = "test-token-0123456789"

SEED = {
    # name: (vram MiB, priority, load seconds)
    "comfyui": (20480, 100, 0.4),
    "cosyvoice": (4096, 50, 0.2),
    "vidi": (4096, 40, 0.2),
    "ollama": (18432, 10, 0.2),
}


def free_port() -> int:
    """A TCP port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fake_service(vram: int, priority: int, load_s: float, port: int) -> dict[str, Any]:
    """A native service entry running gpusm's fake model server."""
    command = [sys.executable, "-m", "gpusm", "sim", "service", "--vram-mib", str(vram)]
    command += ["--port", str(port), "--load-s", str(load_s), "--stop-s", "0.05"]
    return {
        "command": command,
        "vram_mib": vram,
        "priority": priority,
        "health": {"http": f"http://127.0.0.1:{port}/health", "timeout_s": 20},
        "stop_timeout_s": 2,
        "drain_timeout_s": 2,
    }


def seed_config(tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    """Four services and six phases on a simulated 24 GiB GPU; the API on a free port."""
    doc: dict[str, Any] = {
        "state_dir": str(tmp_path / "state"),
        "gpu": {
            "backend": "sim",
            "reserve_mib": 0,
            "settle_timeout_s": 5,
            "sim": {"total_mib": 24576, "reclaim_lag_s": 0.05},
        },
        "services": {
            name: fake_service(vram, prio, load, free_port())
            for name, (vram, prio, load) in SEED.items()
        },
        "phases": {
            "crawl": {"services": [], "release": True},
            "analysis": ["vidi"],
            "tts": ["cosyvoice"],
            "video": ["comfyui"],
            "render": {"services": [], "release": True},
            "chat": ["ollama"],
            "both": ["comfyui", "ollama"],
        },
        "pipeline": ["crawl", "analysis", "tts", "video", "render"],
        "api": {"listen": f"127.0.0.1:{free_port()}"},
    }
    doc.update(overrides)
    return doc


def write_config(tmp_path: Path, doc: dict[str, Any]) -> Path:
    """``doc`` as ``tmp_path/gpusm.yaml``."""
    path = tmp_path / "gpusm.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path
