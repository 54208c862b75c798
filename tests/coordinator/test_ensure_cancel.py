"""A request whose requester stops waiting (a proxied client that hung up).

It ends with RequestCancelled, and a start that nobody holds or waits for any more is
drained; one that another request still waits for goes on.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from gpusm.domain.events import COORDINATOR_STREAM
from gpusm.domain.states import State
from gpusm.errors import InsufficientVram, RequestCancelled
from gpusm.results import PhaseResult
from tests.coordinator.fakes_helpers import World, fake_config, fake_service, open_world
from tests.support import eventually


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    services = {"a": fake_service(10000), "b": fake_service(10000, priority=5)}
    opened = open_world(fake_config(tmp_path, services))
    yield opened
    opened.coordinator.close()


@pytest.fixture
def loading(world: World) -> Iterator[threading.Event]:
    """Health probes block until the event is set: a service stays STARTING meanwhile."""
    loaded = threading.Event()
    probe = world.health.probe

    def blocked(health: Any, timeout_s: float | None = None) -> Any:
        assert loaded.wait(10), "the test never let the service finish loading"
        return probe(health, timeout_s)

    world.health.probe = blocked  # type: ignore[method-assign]
    yield loaded
    loaded.set()


def _ensure(
    pool: ThreadPoolExecutor, world: World, client: str, cancelled: threading.Event, **kw: Any
) -> Future[PhaseResult]:
    coordinator = world.coordinator
    return pool.submit(
        coordinator.ensure_service, "a", client, 30.0, None, quiet=True, cancelled=cancelled, **kw
    )


def test_a_cancelled_wait_drains_the_start_nobody_waits_for(
    world: World, loading: threading.Event
) -> None:
    cancelled = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        waiting = _ensure(pool, world, "proxy:admin:1", cancelled)
        eventually(lambda: world.state("a") is State.STARTING)
        world.coordinator.cancel(cancelled)
        with pytest.raises(RequestCancelled, match="stopped waiting"):
            waiting.result(timeout=10)
    world.coordinator.end_client("proxy:admin:1", True)
    loading.set()
    world.settle()
    assert world.state("a") is State.STOPPED
    drain = world.last("a", "DrainRequested")
    assert "stopped waiting before it was ready" in drain["reason"]
    assert drain["by"] == "proxy:admin:1"


def test_a_start_another_request_waits_for_goes_on(world: World, loading: threading.Event) -> None:
    first, second = threading.Event(), threading.Event()
    with ThreadPoolExecutor(2) as pool:
        one = _ensure(pool, world, "proxy:admin:1", first)
        eventually(lambda: world.state("a") is State.STARTING)
        two = _ensure(pool, world, "proxy:admin:2", second)
        eventually(lambda: "proxy:admin:2" in world.engine.leases)
        world.coordinator.cancel(first)
        with pytest.raises(RequestCancelled):
            one.result(timeout=10)
        world.coordinator.end_client("proxy:admin:1", True)
        assert world.state("a") is State.STARTING  # the second still waits for it
        loading.set()
        assert two.result(timeout=10).started == ()
    assert world.state("a") is State.HEALTHY
    assert "DrainRequested" not in world.types("a")


def test_an_explicit_priority_decides_preemption(world: World) -> None:
    # b (priority 5) holds the GPU; a request for a at priority 1 cannot preempt it...
    world.coordinator.ensure_service("b", "phase-worker")
    with ThreadPoolExecutor(1) as pool:
        low = pool.submit(
            world.coordinator.ensure_service, "a", "low", 0.5, None, quiet=True, priority=1
        )
        eventually(lambda: bool(world.coordinator._admission.waiting))
        world.clock.advance(1.0)  # past its deadline (the world's clock is manual)
        with pytest.raises(InsufficientVram, match="blocked by"):
            low.result(timeout=10)
    # The refusal is in the log (the timeline's out-of-memory marker).
    refused = world.last(COORDINATOR_STREAM, "AdmissionRefused")
    assert refused["for"] == ["a"]
    assert refused["by"] == "low"
    assert refused["blocked_by"] == ["b"]
    assert (refused["need_mib"], refused["free_mib"]) == (10000, 16384 - 10000)
    assert world.state("b") is State.HEALTHY
    # ...and one at priority 9 does: b is drained of its holder, then stopped.
    with ThreadPoolExecutor(1) as pool:
        high = pool.submit(
            world.coordinator.ensure_service, "a", "high", 10.0, None, quiet=True, priority=9
        )
        eventually(lambda: world.state("b") is State.DRAINING)
        world.coordinator.release("phase-worker")
        result = high.result(timeout=10)
    assert [(n.service, n.kind) for n in result.stopped] == [("b", "preempt")]
    assert world.state("a") is State.HEALTHY
