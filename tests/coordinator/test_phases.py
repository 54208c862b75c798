"""Phases on a real coordinator: admission, eviction, release, foreign usage, the seed pipeline."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from gpusm import Coordinator
from gpusm.domain.states import State
from gpusm.errors import CoordinatorBusy, InsufficientVram, ServiceStartFailed, UnknownName
from gpusm.ports import EventQuery
from tests.coordinator.invariants import assert_prefetch_evictions_were_for_something
from tests.seed_helpers import seed_config, sim_of, write_config
from tests.support import eventually, state_of

Open = Callable[..., Coordinator]
DRAINS = {"DrainRequested", "Evicted", "Preempted"}


def healthy_answers(coordinator: Coordinator, names: list[str]) -> None:
    for name in names:
        url = coordinator.config.services[name].health.http
        assert url is not None
        assert httpx.get(url, timeout=2).status_code == 200, name


def test_seed_pipeline_runs_three_items_without_oom(
    seed_path: Path, open_coordinator: Open
) -> None:
    coordinator = open_coordinator(seed_path)
    phases = coordinator.config.pipeline
    for _ in range(3):
        for phase in phases:
            result = coordinator.enter_phase(phase, client="worker")
            needed = coordinator.config.phases[phase].services
            healthy_answers(coordinator, needed)
            assert set(result.started) | set(result.kept) == set(needed)
    sim = sim_of(seed_path)
    assert sim.ooms() == []
    assert coordinator.wait_settled(30)
    events = coordinator.events()
    prefetch_evictions = [e for e in events if e.type == "Evicted" and e.data.get("prefetch")]
    assert prefetch_evictions, "the seed pipeline makes room for a prefetch"
    assert_prefetch_evictions_were_for_something(events)
    # One worker: nothing competes for the room a prefetch made, so it always starts.
    assert [e.data for e in events if e.type == "PrefetchAbandoned"] == []
    stops = [e for e in events if e.type == "Stopped"]
    assert stops, "the pipeline must have stopped something"
    by_stream: dict[str, list[str]] = {}
    for event in events:
        if event.type == "Stopped":
            stream = [e for e in events if e.stream == event.stream]
            before = [e for e in stream if e.version == event.version - 1]
            assert before[0].type in DRAINS, f"{event.stream} stopped without a recorded cause"
            assert before[0].data["reason"]
            assert event.data["vram_reclaimed"] is True
            assert event.data["reclaim_s"] <= 5.0
        by_stream.setdefault(event.stream, []).append(event.type)
    assert "Evicted" in by_stream["vidi"], "video must evict the idle analysis service"


def test_entering_a_phase_evicts_idle_services_lowest_priority_first(
    tmp_path: Path, open_coordinator: Open
) -> None:
    # Without a pipeline nothing is prefetched, so the states below are all ours.
    coordinator = open_coordinator(write_config(tmp_path, seed_config(tmp_path, pipeline=[])))
    coordinator.enter_phase("analysis", client="a")
    coordinator.enter_phase("tts", client="b")
    coordinator.release("a")
    coordinator.release("b")
    result = coordinator.enter_phase("video", client="c")
    assert result.started == ("comfyui",)
    # vidi (priority 40) goes first, and its 4 GiB are enough: cosyvoice stays warm,
    # even though the re-plan runs while vidi is still draining.
    stopped = [(s.service, s.kind) for s in result.stopped]
    assert stopped == [("vidi", "evict")]
    states = {s.name: s.state for s in coordinator.status().services}
    assert states == {
        "comfyui": "healthy",
        "vidi": "stopped",
        "cosyvoice": "healthy",
        "ollama": "stopped",
    }
    evicted = coordinator.events(EventQuery(types=["Evicted"]))
    assert "to make room for comfyui" in evicted[0].data["reason"]
    assert evicted[0].data["by"] == "c"
    assert "free_mib" in evicted[0].data


def test_a_release_phase_stops_everything_and_the_vram_comes_back(
    tmp_path: Path, open_coordinator: Open
) -> None:
    path = write_config(tmp_path, seed_config(tmp_path, pipeline=[]))
    coordinator = open_coordinator(path)
    coordinator.enter_phase("analysis", client="w")
    coordinator.enter_phase("tts", client="other")
    coordinator.release("other")
    result = coordinator.enter_phase("render", client="w")
    assert sorted(s.service for s in result.stopped) == ["cosyvoice", "vidi"]
    assert {s.kind for s in result.stopped} == {"release"}
    assert result.free_after_mib == 24576
    assert sim_of(path).snapshot().used_mib == 0


def test_idle_services_stay_warm_and_are_kept(tmp_path: Path, open_coordinator: Open) -> None:
    coordinator = open_coordinator(write_config(tmp_path, seed_config(tmp_path, pipeline=[])))
    first = coordinator.enter_phase("analysis", client="w")
    coordinator.enter_phase("tts", client="w")
    again = coordinator.enter_phase("analysis", client="w")
    assert first.started == ("vidi",)
    assert again.started == ()
    assert again.kept == ("vidi",)
    assert again.stopped == ()


def test_foreign_usage_refuses_a_phase_that_cannot_fit_and_stops_nothing(
    tmp_path: Path, seed_path: Path, open_coordinator: Open
) -> None:
    coordinator = open_coordinator(seed_path)
    coordinator.enter_phase("analysis", client="w")
    sim = sim_of(seed_path)
    argv = [sys.executable, "-m", "gpusm", "sim", "hog", "--mib", "10240"]
    hog = subprocess.Popen([*argv, "--sim-dir", str(sim.directory)], stdout=subprocess.DEVNULL)
    try:
        eventually(
            lambda: hog.pid in sim.holders() or hog.poll() is not None, 20, "the hog's memory"
        )
        assert sim.holders().get(hog.pid) == 10240
        with pytest.raises(InsufficientVram) as info:
            coordinator.enter_phase("video", client="w", timeout=1.0)
        assert info.value.foreign_mib == 10240
        assert "10240 MiB held by processes gpusm does not own" in str(info.value)
    finally:
        hog.terminate()
        hog.wait(timeout=10)
    assert coordinator.events(EventQuery(types=sorted(DRAINS))) == []
    assert {s.name: s.state for s in coordinator.status().services}["vidi"] == "healthy"


def test_unknown_phase_is_refused_with_the_known_ones(
    seed_path: Path, open_coordinator: Open
) -> None:
    coordinator = open_coordinator(seed_path)
    with pytest.raises(UnknownName, match="unknown phase 'paint'; known: analysis, chat"):
        coordinator.enter_phase("paint")


def test_a_second_coordinator_on_the_same_state_dir_fails_naming_the_holder(
    seed_path: Path, open_coordinator: Open
) -> None:
    open_coordinator(seed_path)
    with pytest.raises(CoordinatorBusy, match=r"owned by coordinator pid \d+"):
        Coordinator.from_config(seed_path)


def test_plan_phase_is_a_dry_run(seed_path: Path, open_coordinator: Open) -> None:
    coordinator = open_coordinator(seed_path)
    coordinator.enter_phase("chat", client="w")
    coordinator.release("w")
    plan = coordinator.plan_phase("video")
    assert plan.fits
    assert [v.name for v in plan.victims] == ["ollama"]
    assert state_of(coordinator, "ollama") == State.HEALTHY.value


def test_a_service_that_cannot_start_fails_the_phase_with_its_reason(
    tmp_path: Path, open_coordinator: Open
) -> None:
    doc = seed_config(tmp_path)
    doc["services"]["vidi"]["command"] = [sys.executable, "-c", "import sys; sys.exit(3)"]
    coordinator = open_coordinator(write_config(tmp_path, doc))
    with pytest.raises(ServiceStartFailed, match="vidi") as info:
        coordinator.enter_phase("analysis", client="w", timeout=15)
    assert "exit code 3" in str(info.value)
    assert state_of(coordinator, "vidi") == State.STOPPED.value
    failed = coordinator.events(EventQuery(stream="vidi", types=["StartFailed"]))
    assert failed[-1].data["exit_code"] == 3
