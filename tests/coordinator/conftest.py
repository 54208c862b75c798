"""Fixtures: a real coordinator on a simulated GPU, with `gpusm sim service` processes."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gpusm import Coordinator
from tests.seed_helpers import seed_config, write_config


@pytest.fixture
def seed_path(tmp_path: Path) -> Path:
    """The seed config written to a file."""
    return write_config(tmp_path, seed_config(tmp_path))


@pytest.fixture
def open_coordinator() -> Iterator[Callable[..., Coordinator]]:
    """Opens coordinators and, at the end, stops every service they started."""
    opened: list[Coordinator] = []

    def factory(path: Path, **kwargs: Any) -> Coordinator:
        coordinator = Coordinator.from_config(path, **kwargs)
        opened.append(coordinator)
        return coordinator

    yield factory
    for coordinator in opened:
        if not coordinator.closed:
            coordinator.close(stop_services=True)
