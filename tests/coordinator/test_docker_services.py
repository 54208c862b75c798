"""The coordinator runs Docker services exactly as native ones, against the real engine.

cosyvoice and ollama run as containers (the containerised fake model server), vidi and
comfyui as native processes, all on one simulated GPU: the seed pipeline, a stop that
must escalate to SIGKILL, and recovery that finds a container by its labels after the
coordinator died between the spawn and its record.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from gpusm import Coordinator
from gpusm.config import load_config
from gpusm.crashpoints import CRASH_EXIT_CODE
from gpusm.domain.states import State
from gpusm.ports import EventQuery
from gpusm.wiring import build_runtimes
from tests.coordinator.docker_coord_helpers import (
    LOOKALIKE,
    container_ids,
    docker_cli,
    is_running,
    mixed_seed_config,
    remove_deployment_containers,
    require_test_images,
    run_lookalike,
    wait_http,
)
from tests.coordinator.invariants import assert_consistent
from tests.seed_helpers import sim_of, write_config
from tests.support import eventually, state_of

pytestmark = pytest.mark.docker

Open = Callable[..., Coordinator]
WriteConfig = Callable[[Path, dict[str, Any]], Path]
DRIVER = Path(__file__).with_name("crash_driver.py")
RUNTIMES = {"cosyvoice": "docker", "ollama": "docker", "vidi": "native", "comfyui": "native"}


@pytest.fixture
def docker_config(docker_engine: None) -> Iterator[WriteConfig]:
    """Writes a config; at the end removes every container of its deployment.

    Ask for it before ``open_coordinator`` so that this teardown runs last and sweeps
    whatever the coordinators' own clean stop left (or a failed test left running).
    """
    require_test_images()
    written: list[Path] = []

    def write(tmp_path: Path, doc: dict[str, Any]) -> Path:
        path = write_config(tmp_path, doc)
        written.append(path)
        return path

    yield write
    for path in written:
        remove_deployment_containers(path)


@pytest.fixture
def lookalike(docker_engine: None) -> Iterator[str]:
    """An unlabelled container named like one of ours, removed at the end; yields its id."""
    require_test_images()
    container = run_lookalike()
    yield container
    docker_cli("rm", "-f", LOOKALIKE, check=False)


def health_url_of(config: Path, name: str) -> str:
    url = load_config(config).services[name].health.http
    assert url is not None
    return url


def stream_types(coordinator: Coordinator, name: str) -> list[str]:
    return [e.type for e in coordinator.events(EventQuery(stream=name))]


def test_seed_pipeline_with_containers_and_native_services_never_ooms_and_reclaims_every_stop(
    tmp_path: Path, docker_config: WriteConfig, open_coordinator: Open
) -> None:
    config = docker_config(tmp_path, mixed_seed_config(tmp_path))
    coordinator = open_coordinator(config)
    cfg = coordinator.config
    assert {n: s.runtime for n, s in cfg.services.items()} == RUNTIMES
    # "chat" (ollama) after each item, so the second container also starts and stops.
    phases = [*cfg.pipeline, "chat"]
    for _ in range(2):
        for phase in phases:
            result = coordinator.enter_phase(phase, client="worker", timeout=60)
            needed = cfg.phases[phase].services
            assert set(result.started) | set(result.kept) == set(needed), phase
            status = {s.name: s for s in coordinator.status().services}
            for name in needed:
                answer = httpx.get(health_url_of(config, name), timeout=2)
                assert answer.status_code == 200, f"{name} not healthy after {phase}"
                # Memory is attributed to the container's host pids like a native one's.
                assert status[name].used_mib == cfg.services[name].vram_mib, name
                is_container = status[name].container_id is not None
                assert is_container == (RUNTIMES[name] == "docker"), name
    assert coordinator.wait_settled(30)
    assert sim_of(config).ooms() == []
    stopped = coordinator.events(EventQuery(types=["Stopped"]))
    assert {e.stream for e in stopped} == set(RUNTIMES)
    for event in stopped:
        assert event.data["vram_reclaimed"] is True, (event.stream, event.data)
        assert event.data["reclaim_s"] <= 5.0, (event.stream, event.data)
    # Every stopped container was removed: only the healthy docker services still run.
    healthy = [s for s in coordinator.status().services if s.state == "healthy"]
    running = {s.container_id for s in healthy if s.container_id is not None}
    assert set(container_ids(config)) == running


def test_docker_service_ignoring_sigterm_is_killed_after_its_grace_and_vram_comes_back(
    tmp_path: Path, docker_config: WriteConfig, open_coordinator: Open
) -> None:
    docker = {"cosyvoice": {"ignore_sigterm": True, "stop_timeout_s": 1.0}}
    config = docker_config(tmp_path, mixed_seed_config(tmp_path, docker, pipeline=[]))
    coordinator = open_coordinator(config)
    coordinator.ensure_service("cosyvoice", client="worker", timeout=60)
    handle = coordinator.instances()["cosyvoice"]
    pids = build_runtimes(coordinator.config)["docker"].pids_of(handle)
    sim = sim_of(config)
    assert sum(sim.holders().get(pid, 0) for pid in pids) == 4096

    note = coordinator.stop_service("cosyvoice", by="test")

    assert note.service == "cosyvoice"
    assert state_of(coordinator, "cosyvoice") == State.STOPPED.value
    event = coordinator.events(EventQuery(stream="cosyvoice", types=["Stopped"]))[-1]
    assert event.data["escalated"] is True, event.data
    assert event.data["already_dead"] is False
    # SIGKILL comes only once the whole grace period has passed.
    assert event.data["stop_s"] >= 1.0, event.data
    assert event.data["vram_reclaimed"] is True, event.data
    assert not set(sim.holders()) & pids
    assert sim.snapshot().used_mib == 0
    assert container_ids(config) == []
    assert_consistent(coordinator, sim)


def _crash_after_spawn(config: Path, phase: str) -> None:
    """Run the crash driver until it dies between the spawn and ProcessLaunched."""
    env = {k: v for k, v in os.environ.items() if k != "GPUSM_CRASH_AT"}
    env["GPUSM_CRASH_AT"] = "after_spawn"
    driver = subprocess.Popen(
        [sys.executable, str(DRIVER), str(config), phase],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        _, err = driver.communicate(timeout=60)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.communicate()
    assert driver.returncode == CRASH_EXIT_CODE, err.decode()[-2000:]
    assert "crash point after_spawn reached" in err.decode()


@dataclass(frozen=True)
class Recovered:
    """A coordinator opened after a crash between a container's spawn and its record."""

    coordinator: Coordinator
    config: Path
    container: str
    instance: str


def _crash_and_recover(
    tmp_path: Path, write: WriteConfig, open_coordinator: Open, healthy: bool
) -> Recovered:
    # A loading server (long load) still answers 503 when the new coordinator looks at it.
    docker = {"cosyvoice": {"load_s": 0.3 if healthy else 60.0}}
    config = write(tmp_path, mixed_seed_config(tmp_path, docker, pipeline=[]))
    _crash_after_spawn(config, "tts")
    (container,) = container_ids(config, running_only=True)
    label = '{{index .Config.Labels "gpusm.instance"}}'
    instance = docker_cli("inspect", "-f", label, container).strip()
    wait_http(health_url_of(config, "cosyvoice"), 200 if healthy else 503)
    coordinator = open_coordinator(config)
    assert coordinator.recovered
    return Recovered(coordinator, config, container, instance)


BRANCHES = pytest.mark.parametrize("healthy", [True, False], ids=["healthy", "loading"])


@BRANCHES
def test_container_started_before_a_crash_is_adopted_if_healthy_else_reaped(
    tmp_path: Path,
    docker_config: WriteConfig,
    lookalike: str,
    open_coordinator: Open,
    healthy: bool,
) -> None:
    rec = _crash_and_recover(tmp_path, docker_config, open_coordinator, healthy)
    coordinator, config = rec.coordinator, rec.config
    types = stream_types(coordinator, "cosyvoice")
    assert "ProcessLaunched" not in types, "the crash came before the launch was recorded"
    assert_consistent(coordinator, sim_of(config))
    if healthy:
        adopted = coordinator.events(EventQuery(stream="cosyvoice", types=["Adopted"]))
        assert [e.data["instance"] for e in adopted] == [rec.instance]
        assert state_of(coordinator, "cosyvoice") == State.HEALTHY.value
        assert is_running(rec.container)
        # The adopted container serves the phase (nothing new starts) and stops cleanly.
        result = coordinator.enter_phase("tts", client="retry", timeout=60)
        assert (result.started, result.kept) == ((), ("cosyvoice",))
        assert container_ids(config) == [rec.container]
        coordinator.stop_service("cosyvoice", by="test")
        stopped = coordinator.events(EventQuery(stream="cosyvoice", types=["Stopped"]))[-1]
        assert stopped.data["vram_reclaimed"] is True, stopped.data
    else:
        assert "Adopted" not in types
        assert types[:2] == ["StartRequested", "StartFailed"]
        reaped = coordinator.events(EventQuery(stream="cosyvoice", types=["OrphanReaped"]))
        assert reaped, types
        assert {e.data["instance"] for e in reaped} == {rec.instance}
    # Either way the container is gone now and its simulated VRAM came back.
    assert state_of(coordinator, "cosyvoice") == State.STOPPED.value
    assert not is_running(rec.container)
    assert container_ids(config) == []
    sim = sim_of(config)
    eventually(lambda: sim.snapshot().used_mib == 0, 10, "the simulated GPU to be empty")
    # Same-looking name, but no labels: not ours, never touched.
    assert is_running(lookalike)
    assert_consistent(coordinator, sim_of(config))


@BRANCHES
def test_recovery_records_exactly_one_event_naming_the_container(
    tmp_path: Path, docker_config: WriteConfig, open_coordinator: Open, healthy: bool
) -> None:
    rec = _crash_and_recover(tmp_path, docker_config, open_coordinator, healthy)
    coordinator = rec.coordinator
    outcome = ["Adopted"] if healthy else ["StartFailed", "OrphanReaped"]
    assert stream_types(coordinator, "cosyvoice") == ["StartRequested", *outcome]
    event = coordinator.events(EventQuery(stream="cosyvoice"))[-1]
    assert event.data["container_id"] == rec.container, event.data
    assert event.data["instance"] == rec.instance
    if healthy:
        status = {s.name: s for s in coordinator.status().services}
        assert status["cosyvoice"].container_id == rec.container


def test_native_runtime_never_reports_a_containers_processes_as_its_orphans(
    tmp_path: Path, docker_config: WriteConfig, open_coordinator: Open
) -> None:
    config = docker_config(tmp_path, mixed_seed_config(tmp_path, pipeline=[]))
    coordinator = open_coordinator(config)
    coordinator.ensure_service("cosyvoice", client="worker", timeout=60)
    handle = coordinator.instances()["cosyvoice"]
    assert handle.container_id is not None
    assert handle.kind == "docker"
    native = build_runtimes(coordinator.config)["native"].find_orphans()
    assert [h for h in native if h.instance == handle.instance] == []


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"


def test_a_service_switched_between_native_and_docker_leaves_nothing_behind(
    tmp_path: Path, docker_config: WriteConfig, open_coordinator: Open
) -> None:
    native_doc = mixed_seed_config(tmp_path, docker={}, pipeline=[])
    docker_doc = {**native_doc, "services": dict(native_doc["services"])}
    docker_doc["services"]["cosyvoice"] = mixed_seed_config(
        tmp_path, docker={"cosyvoice": {}}, pipeline=[]
    )["services"]["cosyvoice"]
    sim = None

    def reopen(doc: dict[str, Any]) -> Coordinator:
        return open_coordinator(docker_config(tmp_path, doc))

    # native -> docker across a daemon restart (closed without stopping services)
    first = reopen(native_doc)
    first.enter_phase("tts", client="w", timeout=60)
    pid = first.instances()["cosyvoice"].pid
    assert pid is not None
    first.close()
    assert _alive(pid)
    second = reopen(docker_doc)
    path = docker_config(tmp_path, docker_doc)
    sim = sim_of(path)
    assert not _alive(pid), "the native instance is stopped through the native runtime"
    eventually(lambda: sim.snapshot().used_mib == 0, 10, "its VRAM back")
    assert second.enter_phase("tts", client="w", timeout=60).started == ("cosyvoice",)
    container = second.instances()["cosyvoice"].container_id
    assert container is not None
    assert container_ids(path) == [container]

    # docker -> native across a restart: the container is stopped and removed by Docker
    second.close()
    third = reopen(native_doc)
    assert container_ids(path) == []
    eventually(lambda: sim.snapshot().used_mib == 0, 10, "its VRAM back")
    assert third.enter_phase("tts", client="w", timeout=60).started == ("cosyvoice",)
    assert third.instances()["cosyvoice"].kind == "native"

    # native -> docker by a reload: it keeps serving w, then restarts as a container
    docker_config(tmp_path, docker_doc)
    assert third.reload(by="test").changed == ("cosyvoice",)
    native_pid = third.instances()["cosyvoice"].pid
    assert native_pid is not None
    third.release("w")
    eventually(lambda: not _alive(native_pid), 20, "the native instance stopped")
    assert third.enter_phase("tts", client="w", timeout=60).started == ("cosyvoice",)
    assert third.instances()["cosyvoice"].kind == "docker"
    assert len(container_ids(path)) == 1
    assert sim.ooms() == []
