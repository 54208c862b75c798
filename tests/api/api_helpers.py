"""Helpers for API tests: the seed config on a simulated GPU, with fake model servers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.seed_helpers import free_port, write_config
from tests.seed_helpers import seed_config as base_seed_config

__all__ = ["TOKEN", "free_port", "seed_config", "write_config"]

TOKEN = "test-token-0123456789"


def seed_config(tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    """The shared seed config with loads a third shorter, a phase needing two services,
    and the API on a free port."""
    doc = base_seed_config(tmp_path, load_scale=2 / 3)
    doc["phases"]["both"] = ["comfyui", "ollama"]
    doc["api"] = {"listen": f"127.0.0.1:{free_port()}"}
    doc.update(overrides)
    return doc
