"""A Docker service parks in place too: the containerised fake model server, on the real engine.

``a`` runs ``gpusm sim service`` in the local test image (host network and pid namespace,
see :mod:`tests.coordinator.docker_coord_helpers`) and parks through the vllm preset;
``b`` is a native fake server. Entering ``b``'s phase parks ``a`` with its container still
running; entering ``a``'s phase again wakes the same container.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gpusm import Coordinator
from gpusm.ports import EventQuery
from gpusm.wiring import build_runtimes
from tests.coordinator.docker_coord_helpers import (
    container_ids,
    docker_service,
    is_running,
    remove_deployment_containers,
    require_test_images,
)
from tests.seed_helpers import fake_service, free_port, sim_of, write_config

pytestmark = pytest.mark.docker

Open = Callable[..., Coordinator]

TOTAL = 1000
FULL = 600
RESIDUAL = 50
TOLERANCE = 64


@pytest.fixture
def docker_config(docker_engine: None, tmp_path: Path) -> Iterator[Path]:
    """The two services' config; at the end every container of its deployment is removed.

    Ask for it before ``open_coordinator`` so that this teardown runs last.
    """
    require_test_images()
    state_dir = tmp_path / "state"
    parked = docker_service("a", FULL, 10, 0.2, state_dir / "simgpu")
    parked["command"] = [*parked["command"], "--residual-mib", str(RESIDUAL), "--wake-s", "0.1"]
    parked["park"] = {
        "preset": "vllm",
        "residual_mib": RESIDUAL,
        "tolerance_mib": TOLERANCE,
        "settle_timeout_s": 5,
    }
    doc: dict[str, Any] = {
        "state_dir": str(state_dir),
        "gpu": {
            "backend": "sim",
            "reserve_mib": 0,
            "settle_timeout_s": 5,
            "sim": {"total_mib": TOTAL, "reclaim_lag_s": 0.05},
        },
        "services": {"a": parked, "b": fake_service(FULL, 10, 0.2, free_port())},
        "phases": {"pa": ["a"], "pb": ["b"]},
    }
    path = write_config(tmp_path, doc)
    yield path
    remove_deployment_containers(path)


def types_since(coordinator: Coordinator, name: str, first: str) -> list[str]:
    types = [e.type for e in coordinator.events(EventQuery(stream=name))]
    types = [t for t in types if t != "VramObserved"]
    return types[len(types) - 1 - types[::-1].index(first) :]


def test_a_container_parks_with_its_container_running_and_wakes_in_place(
    docker_config: Path, open_coordinator: Open
) -> None:
    coordinator = open_coordinator(docker_config)
    sim = sim_of(docker_config)
    coordinator.enter_phase("pa", client="w", timeout=60)
    handle = coordinator.instances()["a"]
    container = handle.container_id
    assert container is not None
    pids = build_runtimes(coordinator.config)["docker"].pids_of(handle)

    def held() -> int:
        return sum(sim.holders().get(pid, 0) for pid in pids)

    assert held() == FULL

    result = coordinator.enter_phase("pb", client="w", timeout=60)
    assert [(n.service, n.action) for n in result.stopped] == [("a", "park")]
    assert coordinator.wait_settled(30)
    assert types_since(coordinator, "a", "ParkRequested") == ["ParkRequested", "Parked"]
    parked = coordinator.events(EventQuery(stream="a", types=["Parked"]))[-1].data
    assert parked["held_mib"] == RESIDUAL <= RESIDUAL + TOLERANCE, parked
    status = {s.name: s for s in coordinator.status().services}["a"]
    assert (status.state, status.container_id) == ("parked", container)
    assert is_running(container)
    assert container_ids(docker_config, running_only=True) == [container]
    assert held() == RESIDUAL
    url = coordinator.config.services["a"].health.http
    assert url is not None
    assert httpx.get(url, timeout=2, trust_env=False).status_code == 200

    result = coordinator.enter_phase("pa", client="w", timeout=60)
    assert result.started == ("a",)
    assert types_since(coordinator, "a", "WakeRequested") == ["WakeRequested", "Woken"]
    assert coordinator.instances()["a"].container_id == container  # woken, not recreated
    assert is_running(container)
    assert held() == FULL
    assert set(sim.holders()) <= pids  # b was stopped and its memory reclaimed
    assert sim.ooms() == []
