"""The seed config (the plan's four services) on a simulated GPU, with fake model servers.

Shared by the coordinator and API tests (``tests/`` is on the import path).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

from gpusm.gpu.sim import SimGpu
from tests.support.ports import free_port

SEED = {
    # name: (vram MiB, priority, load seconds)
    "comfyui": (20480, 100, 0.6),
    "cosyvoice": (4096, 50, 0.3),
    "vidi": (4096, 40, 0.3),
    "ollama": (18432, 10, 0.3),
}


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


def parkable(
    service: dict[str, Any],
    preset: str,
    residual_mib: int = 512,
    wake_s: float = 0.1,
    *flags: str,
    **park: Any,
) -> dict[str, Any]:
    """``service`` (a :func:`fake_service` entry) able to park through ``preset``'s requests.

    Its fake server keeps ``residual_mib`` while parked and takes ``wake_s`` to wake
    (``flags`` are more ``gpusm sim service`` options, e.g. ``--async-free-s``); ``park``
    adds to or replaces keys of its ``park:`` entry.
    """
    command = [*service["command"], "--residual-mib", str(residual_mib), "--wake-s", str(wake_s)]
    entry: dict[str, Any] = {"preset": preset, "residual_mib": residual_mib, "settle_timeout_s": 5}
    if preset in ("ollama", "llamacpp"):
        entry["model"] = "fake-model"  # the fake server's default --model
    return {**service, "command": [*command, *flags], "park": {**entry, **park}}


def with_parking(doc: dict[str, Any], presets: dict[str, str], **options: Any) -> dict[str, Any]:
    """``doc`` (e.g. :func:`seed_config`'s) with the services named in ``presets`` able to
    park through that preset; ``options`` go to :func:`parkable`."""
    services = dict(doc["services"])
    for name, preset in presets.items():
        services[name] = parkable(services[name], preset, **options)
    return {**doc, "services": services}


def write_config(tmp_path: Path, doc: dict[str, Any]) -> Path:
    """``doc`` as ``tmp_path/gpusm.yaml``."""
    path = tmp_path / "gpusm.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def sim_of(path: Path) -> SimGpu:
    """The simulated GPU of the config at ``path``."""
    doc = yaml.safe_load(path.read_text())
    return SimGpu(Path(doc["state_dir"]) / "simgpu")
