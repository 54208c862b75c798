"""The parked tier end to end: real fake model servers, parked and woken through each preset.

Two services on a simulated GPU too small for both: ``a`` can park (through the preset
under test, speaking to a ``gpusm sim service`` process that answers that server's
requests), ``b`` cannot. Entering ``b``'s phase parks ``a`` (its process stays, holding
its residual); entering ``a``'s phase again stops ``b`` and wakes ``a``. Everything goes
through a real :class:`~gpusm.Coordinator`: HTTP park/wake requests, the GPU verified by
reading the simulated GPU, no OOM on it at any point.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from gpusm import Coordinator
from gpusm.domain.events import RecordedEvent
from gpusm.gpu.sim import SimGpu
from gpusm.ports import EventQuery
from tests.seed_helpers import fake_service, free_port, sim_of, write_config

Open = Callable[..., Coordinator]

TOTAL = 1000
FULL = 600
RESIDUAL = 50
TOLERANCE = 64
WAKE_S = 0.1


@dataclass(frozen=True)
class Case:
    """One preset: its ``park:`` keys, the fake server's flags that go with them, and the
    lines the fake server prints for the requests it got (in order)."""

    park: dict[str, Any]
    flags: tuple[str, ...]
    said: tuple[str, ...]


CASES = {
    "vllm-level-1": Case(
        {"preset": "vllm"},
        (),
        ("parked (vllm sleep level=1)", "awake (vllm wake_up)"),
    ),
    "vllm-level-2": Case(
        {"preset": "vllm", "level": 2},
        (),
        (
            "parked (vllm sleep level=2)",
            "awake (vllm wake_up tags=weights)",
            "reload_weights (vllm collective_rpc)",
        ),
    ),
    "sglang": Case(
        {"preset": "sglang", "tags": ["weights", "kv_cache"]},
        (),
        (
            "parked (sglang release_memory_occupation tags=['weights', 'kv_cache'])",
            "awake (sglang resume_memory_occupation tags=['weights', 'kv_cache'])",
        ),
    ),
    "ollama": Case(
        {"preset": "ollama", "model": "llama3"},
        ("--model", "llama3"),
        ("parked (ollama keep_alive=0)", "awake (ollama keep_alive=-1)"),
    ),
    "llamacpp": Case(
        {"preset": "llamacpp", "model": "qwen"},
        ("--model", "qwen"),
        ("parked (llama.cpp models/unload)", "awake (llama.cpp models/load)"),
    ),
}


def said(coordinator: Coordinator, name: str) -> list[str]:
    """What ``name``'s fake server printed about parks and wakes, oldest first."""
    log = coordinator.config.state_dir / "logs" / f"{name}.log"
    marker = f"fake server pid {pid_of(coordinator, name)}: "
    return [line.split(marker, 1)[1] for line in log.read_text().splitlines() if marker in line]


def park_lines(lines: list[str]) -> list[str]:
    """The park, wake and reload lines, without the numbers after the colon."""
    kinds = ("parked", "awake", "reload_weights")
    return [line.split(":", 1)[0] for line in lines if line.startswith(kinds)]


def parking_config(
    tmp_path: Path, park: dict[str, Any], *flags: str, settle_timeout_s: float = 5.0
) -> Path:
    """``a`` (parkable with ``park``) and ``b`` (not), FULL MiB each on a TOTAL MiB GPU."""
    server = ("--residual-mib", str(RESIDUAL), "--wake-s", str(WAKE_S), *flags)
    entry = {
        "residual_mib": RESIDUAL,
        "tolerance_mib": TOLERANCE,
        "settle_timeout_s": settle_timeout_s,
        **park,
    }
    doc = {
        "state_dir": str(tmp_path / "state"),
        "gpu": {
            "backend": "sim",
            "reserve_mib": 0,
            "settle_timeout_s": 5,
            "sim": {"total_mib": TOTAL, "reclaim_lag_s": 0.05},
        },
        "services": {
            "a": fake_service(FULL, 10, 0.2, free_port(), *server, park=entry),
            "b": fake_service(FULL, 10, 0.2, free_port()),
        },
        "phases": {"pa": ["a"], "pb": ["b"]},
    }
    return write_config(tmp_path, doc)


def since(coordinator: Coordinator, name: str, first: str) -> list[RecordedEvent]:
    """``name``'s events from its last ``first`` on, measurements left out."""
    events = [e for e in coordinator.events(EventQuery(stream=name)) if e.type != "VramObserved"]
    starts = [i for i, e in enumerate(events) if e.type == first]
    assert starts, f"{name} never recorded {first}: {[e.type for e in events]}"
    return events[starts[-1] :]


def state(coordinator: Coordinator, name: str) -> str:
    return {s.name: s.state for s in coordinator.status().services}[name]


def pid_of(coordinator: Coordinator, name: str) -> int:
    pid = coordinator.instances()[name].pid
    assert pid is not None
    return pid


def healthy(coordinator: Coordinator, name: str) -> bool:
    url = coordinator.config.services[name].health.http
    assert url is not None
    return httpx.get(url, timeout=2, trust_env=False).status_code == 200


@dataclass(frozen=True)
class Parked:
    pid: int
    events: list[RecordedEvent]


def park_a(coordinator: Coordinator, sim: SimGpu) -> Parked:
    """Start ``a``, then enter ``b``'s phase, which parks ``a``; check the park."""
    coordinator.enter_phase("pa", client="w")
    pid = pid_of(coordinator, "a")
    assert sim.holders()[pid] == FULL
    result = coordinator.enter_phase("pb", client="w")
    assert [(n.service, n.kind, n.action) for n in result.stopped] == [("a", "evict", "park")]
    assert coordinator.wait_settled(10)
    events = since(coordinator, "a", "ParkRequested")
    assert [e.type for e in events] == ["ParkRequested", "Parked"]
    parked = events[-1].data
    assert parked["held_mib"] <= RESIDUAL + TOLERANCE, parked
    assert parked["held_mib"] == RESIDUAL  # what the fake keeps, as the GPU shows it
    assert state(coordinator, "a") == "parked"
    # The same process, alive, holding its residual on the GPU; b has its full memory.
    assert pid_of(coordinator, "a") == pid
    assert psutil.pid_exists(pid)
    assert healthy(coordinator, "a")
    holders = sim.holders()
    assert holders[pid] == RESIDUAL
    assert holders[pid_of(coordinator, "b")] == FULL
    return Parked(pid, events)


def wake_a(coordinator: Coordinator, sim: SimGpu, pid: int) -> list[RecordedEvent]:
    """Enter ``a``'s phase again: ``b`` is stopped, ``a`` woken; returns a's wake events."""
    result = coordinator.enter_phase("pa", client="w")
    assert result.started == ("a",)
    assert [(n.service, n.action) for n in result.stopped] == [("b", "stop")]
    events = since(coordinator, "a", "WakeRequested")
    assert [e.type for e in events] == ["WakeRequested", "Woken"]
    assert state(coordinator, "a") == "healthy"
    assert pid_of(coordinator, "a") == pid  # woken, not restarted
    assert healthy(coordinator, "a")
    stopped = since(coordinator, "b", "Evicted")[-1]
    assert stopped.type == "Stopped"
    assert stopped.data["vram_reclaimed"] is True
    return events


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_a_preset_parks_the_idle_service_and_wakes_it_in_place(
    tmp_path: Path, open_coordinator: Open, case: Case
) -> None:
    path = parking_config(tmp_path, case.park, *case.flags)
    coordinator = open_coordinator(path)
    sim = sim_of(path)
    parked = park_a(coordinator, sim)
    assert parked.events[-1].data["park_s"] < 2.0  # synchronous: verified at once
    woken = wake_a(coordinator, sim, parked.pid)
    assert woken[-1].data["wake_s"] >= WAKE_S * 0.9  # the wake request waited for memory
    assert sim.holders() == {parked.pid: FULL}
    assert sim.ooms() == []
    # The preset's requests reached the server in the shapes it answers.
    assert park_lines(said(coordinator, "a")) == list(case.said)


def test_a_park_that_leaks_more_than_the_tolerance_is_stopped_instead(
    tmp_path: Path, open_coordinator: Open
) -> None:
    leak = 3 * TOLERANCE
    park = {"preset": "vllm"}
    path = parking_config(tmp_path, park, "--leak-mib", str(leak), settle_timeout_s=0.5)
    coordinator = open_coordinator(path)
    sim = sim_of(path)
    coordinator.enter_phase("pa", client="w")
    pid = pid_of(coordinator, "a")
    coordinator.enter_phase("pb", client="w")
    assert coordinator.wait_settled(10)
    events = since(coordinator, "a", "ParkRequested")
    assert [e.type for e in events] == ["ParkRequested", "ParkFailed", "Stopped"]
    failed = events[1].data
    assert failed["held_mib"] == RESIDUAL + leak, failed
    assert failed["residual_mib"] == RESIDUAL
    assert failed["tolerance_mib"] == TOLERANCE
    assert "still holding" in failed["reason"]
    assert events[2].data["vram_reclaimed"] is True, events[2].data
    assert state(coordinator, "a") == "stopped"
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert "a" not in coordinator.instances()
    assert pid not in sim.holders()
    assert sim.holders() == {pid_of(coordinator, "b"): FULL}
    assert sim.ooms() == []


@pytest.fixture
def watch() -> Iterator[Callable[[Callable[[], None]], None]]:
    """Runs a check every 10 ms in a thread until the test ends; its failures fail the test."""
    stop = threading.Event()
    failures: list[BaseException] = []
    threads: list[threading.Thread] = []

    def start(check: Callable[[], None]) -> None:
        def loop() -> None:
            while not stop.wait(0.01):
                try:
                    check()
                except BaseException as exc:  # re-raised in the test's thread below
                    failures.append(exc)
                    return

        thread = threading.Thread(target=loop, daemon=True)
        thread.start()
        threads.append(thread)

    yield start
    stop.set()
    for thread in threads:
        thread.join(5)
    if failures:
        raise failures[0]


def test_comfyui_async_free_is_waited_for_and_the_next_prompt_reloads(
    tmp_path: Path, open_coordinator: Open, watch: Callable[[Callable[[], None]], None]
) -> None:
    free_s = 1.0
    path = parking_config(tmp_path, {"preset": "comfyui"}, "--async-free-s", str(free_s))
    coordinator = open_coordinator(path)
    sim = sim_of(path)
    coordinator.enter_phase("pa", client="w")
    pid = pid_of(coordinator, "a")
    seen: list[str] = []

    def parked_only_once_freed() -> None:
        # The log first, then the GPU: memory only goes down while parking, so a Parked
        # already logged while the GPU still shows the full model was recorded too early.
        # Only the first sighting counts: the wake below brings the memory back.
        if seen:
            return
        logged = coordinator.events(EventQuery(stream="a", types=["Parked"]))
        held = sim.holders().get(pid, 0)
        if logged:
            assert held <= RESIDUAL, f"Parked recorded while a still held {held} MiB"
            seen.append("parked")

    watch(parked_only_once_freed)
    parked = park_a(coordinator, sim)
    assert parked.events[-1].data["park_s"] >= free_s * 0.9, parked.events[-1].data
    assert parked.events[-1].at - parked.events[0].at >= _seconds(free_s * 0.9)
    time.sleep(0.05)
    assert seen, "the watcher never saw the Parked event"

    # No wake request: Woken once healthy (it already is), the memory not yet back...
    wake_a(coordinator, sim, parked.pid)
    assert sim.holders() == {pid: RESIDUAL}
    # ...but admitted: the next prompt reloads the model into the room the wake reserved.
    status = {s.name: s for s in coordinator.status().services}["a"]
    assert status.reservation_mib == FULL
    url = f"http://127.0.0.1:{_port(coordinator)}/prompt"
    assert httpx.post(url, json={"prompt": {}}, trust_env=False).status_code == 200
    deadline = time.monotonic() + 5
    while sim.holders().get(pid) != FULL and time.monotonic() < deadline:
        time.sleep(0.02)
    assert sim.holders() == {pid: FULL}
    assert sim.ooms() == []


def _port(coordinator: Coordinator) -> int:
    url = coordinator.config.services["a"].health.http
    assert url is not None
    return int(url.rsplit(":", 1)[1].split("/", 1)[0])


def _seconds(s: float) -> timedelta:
    return timedelta(seconds=s)
