"""Fixtures for the GPU probe tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.gpu.sim_helpers import Spawner


@pytest.fixture(autouse=True)
def no_ambient_cuda_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    """A CUDA_VISIBLE_DEVICES from the shell must not choose the fake servers' sim devices."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


@pytest.fixture
def spawner() -> Iterator[Spawner]:
    """Starts helper processes; every one still alive is killed and reaped at teardown."""
    spawner = Spawner()
    yield spawner
    spawner.close()


@pytest.fixture
def sim_dir(tmp_path: Path) -> Path:
    """Where a test's simulated GPU lives (not created yet)."""
    return tmp_path / "simgpu"
