"""The Docker runtime against a real engine: container settings, the containerised fake
model server and its simulated VRAM, orphans, and clear errors."""

from __future__ import annotations

import json
import socket
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gpusm.config import HealthConfig
from gpusm.errors import ServiceRuntimeError, ServiceStartFailed
from gpusm.gpu.sim import SimGpu
from gpusm.ports import Handle, Placement
from gpusm.runtimes.docker import LABEL_INSTANCE, LABEL_SERVICE, DockerRuntime, container_name
from tests.runtimes.docker_helpers import (
    BUSYBOX_IMAGE,
    busybox_service,
    docker_cli,
    fake_server_service,
    free_tcp_port,
    labels_for,
    remove_test_containers,
    require_test_images,
)
from tests.support import eventually

pytestmark = pytest.mark.docker

SLEEP = "echo ready; exec sleep 1000"


@pytest.fixture
def run_id(docker_engine: None) -> Iterator[str]:
    """A label value for this test's containers; every one of them is removed after."""
    require_test_images()
    rid = uuid.uuid4().hex
    yield rid
    remove_test_containers(rid)


@pytest.fixture
def rt(run_id: str) -> Iterator[DockerRuntime]:
    runtime = DockerRuntime(
        extra_labels=labels_for(run_id), extra_env={"FROM_RUNTIME": "1", "SHARED": "runtime"}
    )
    yield runtime
    runtime.close()


@pytest.fixture
def plain_container(docker_engine: None) -> Iterator[Callable[..., str]]:
    """Runs a busybox container by plain ``docker run`` (no labels unless given); removed after."""
    names: list[str] = []

    def run(name: str, *labels: str) -> str:
        names.append(name)
        flags = [arg for label in labels for arg in ("--label", label)]
        return docker_cli(
            "run", "-d", "--network", "host", "--name", name, *flags, BUSYBOX_IMAGE, "sleep", "1000"
        ).strip()

    yield run
    if names:
        docker_cli("rm", "-f", *names, check=False)


def inspect(container_id: str) -> dict[str, Any]:
    data: list[dict[str, Any]] = json.loads(docker_cli("inspect", container_id))
    return data[0]


def our_containers(run_id: str) -> list[str]:
    return docker_cli("ps", "-aq", "--filter", f"label=gpusm.test={run_id}").split()


def name() -> str:
    return f"svc-{uuid.uuid4().hex[:8]}"


def wait_ready(rt: DockerRuntime, handle: Handle) -> None:
    eventually(lambda: "ready" in rt.log_tail(handle), 15, "container ready")


# ---------------------------------------------------------------- container settings
def test_container_carries_markers_env_ports_volumes_and_no_restart_policy(
    rt: DockerRuntime, tmp_path: Path
) -> None:
    (tmp_path / "hello").write_text("mounted\n")
    port = free_tcp_port()
    svc = busybox_service(
        name(),
        'cat /data/hello; echo "env=$GPUSM_SERVICE/$GPUSM_INSTANCE/$SHARED/$FROM_RUNTIME"; '
        + SLEEP,
        network_mode=None,
        ports=[f"{port}:80", f"0.0.0.0:{port}:81/udp"],
        volumes=[f"{tmp_path}:/data:ro"],
        env={"SHARED": "service"},
    )
    handle = rt.start(svc, "inst-0123456789")
    wait_ready(rt, handle)
    logs = rt.log_tail(handle)
    assert "mounted" in logs
    assert f"env={svc.name}/inst-0123456789/service/1" in logs
    assert handle.container_id is not None
    info = inspect(handle.container_id)
    assert info["Name"] == f"/gpusm-{svc.name}-inst-012"
    assert info["Config"]["Labels"][LABEL_SERVICE] == svc.name
    assert info["Config"]["Labels"][LABEL_INSTANCE] == "inst-0123456789"
    host = info["HostConfig"]
    assert host["RestartPolicy"]["Name"] == "no"
    assert host["Init"] is True
    assert host["Binds"] == [f"{tmp_path}:/data:ro"]
    assert host["PortBindings"] == {
        "80/tcp": [{"HostIp": "127.0.0.1", "HostPort": str(port)}],
        "81/udp": [{"HostIp": "0.0.0.0", "HostPort": str(port)}],
    }
    assert info["State"]["Pid"] == handle.pid


# ---------------------------------------------------------------- devices
def _env_of(info: dict[str, Any]) -> dict[str, str]:
    return dict(entry.split("=", 1) for entry in info["Config"]["Env"])


def test_real_gpus_create_a_container_with_a_device_request_for_the_placement(
    run_id: str,
) -> None:
    # Created, never started: this engine has no NVIDIA runtime to start it with.
    rt = DockerRuntime(extra_labels=labels_for(run_id), gpu_requests=True)
    svc = busybox_service(
        name(), "serve --devices={gpus}", env={"DEVICE": "cuda:{gpu}", "CUDA_VISIBLE_DEVICES": "7"}
    )
    placement = Placement(indices=(2, 0), uuids=("GPU-1111", "GPU-2222"))
    container_id = rt.create(svc, "devices01", placement)
    try:
        info = inspect(container_id)
        [request] = info["HostConfig"]["DeviceRequests"]
        assert request["DeviceIDs"] == ["GPU-1111", "GPU-2222"]
        assert request["Capabilities"] == [["gpu"]]
        assert request["Driver"] == "nvidia"
        env = _env_of(info)
        assert env["CUDA_VISIBLE_DEVICES"] == "GPU-1111,GPU-2222"
        assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
        assert env["DEVICE"] == "cuda:2"
        assert info["Config"]["Cmd"] == ["sh", "-c", "serve --devices=2,0"]
        assert info["State"]["Running"] is False
    finally:
        docker_cli("rm", "-f", container_id)
        rt.close()


def test_sim_gpu_container_gets_the_cuda_env_and_no_device_request(rt: DockerRuntime) -> None:
    svc = busybox_service(
        name(),
        'echo "seen=$CUDA_VISIBLE_DEVICES/$CUDA_DEVICE_ORDER/$DEVICE"; ' + SLEEP,
        env={"DEVICE": "{gpus}"},
    )
    handle = rt.start(svc, "devices02", Placement(indices=(1, 3)))
    wait_ready(rt, handle)
    assert "seen=1,3/PCI_BUS_ID/1,3" in rt.log_tail(handle)
    assert handle.container_id is not None
    info = inspect(handle.container_id)
    assert not info["HostConfig"].get("DeviceRequests")
    assert _env_of(info)["CUDA_VISIBLE_DEVICES"] == "1,3"
    rt.stop(handle, 1.0)


# ---------------------------------------------------------------- the fake model server
def _start_fake(rt: DockerRuntime, tmp_path: Path, **flags: Any) -> tuple[SimGpu, Handle, int]:
    sim = SimGpu(tmp_path / "sim", total_mib=1000, reclaim_lag_s=0.2)
    port = free_tcp_port()
    handle = rt.start(fake_server_service(name(), port, 300, sim.directory, **flags), "fake01")

    def healthy() -> bool:
        assert rt.is_alive(handle), rt.log_tail(handle)
        try:
            return httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    eventually(healthy, 30, "fake server healthy")
    return sim, handle, port


def test_fake_server_holds_sim_vram_under_its_host_pid_and_frees_it_after_a_clean_stop(
    rt: DockerRuntime, tmp_path: Path
) -> None:
    sim, handle, _ = _start_fake(rt, tmp_path)
    # The simulated GPU sees the container's process under its host pid, as NVML would.
    assert sim.holders() == {handle.pid: 300}
    assert handle.pid in rt.pids_of(handle)
    result = rt.stop(handle, 10.0)
    assert not result.escalated
    assert not result.already_dead
    eventually(lambda: sim.snapshot().free_mib == 1000, 10, "simulated VRAM back")
    assert sim.ooms() == []


def test_fake_server_ignoring_sigterm_is_killed_after_grace_and_its_vram_comes_back(
    rt: DockerRuntime, tmp_path: Path, run_id: str
) -> None:
    sim, handle, port = _start_fake(rt, tmp_path, ignore_sigterm=True)
    result = rt.stop(handle, 1.0)
    assert result.escalated
    assert result.duration_s >= 0.95
    assert our_containers(run_id) == []
    eventually(lambda: sim.snapshot().free_mib == 1000, 10, "simulated VRAM back")
    # Nothing listens on its port any more.
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


# ---------------------------------------------------------------- orphans
def test_find_orphans_reports_labelled_containers_and_never_an_unlabelled_lookalike(
    rt: DockerRuntime, plain_container: Callable[..., str]
) -> None:
    live = rt.start(busybox_service(name(), SLEEP), "orphan-live")
    exited = rt.start(busybox_service(name(), "exit 3"), "orphan-exited")
    lookalike_name = f"gpusm-foo-{uuid.uuid4().hex[:4]}"
    lookalike = plain_container(lookalike_name)
    # Half our marker is not our marker.
    half = plain_container(f"gpusm-foo-{uuid.uuid4().hex[:4]}", "gpusm.service=foo")
    eventually(lambda: not rt.is_alive(exited), 15, "exited")

    everything = DockerRuntime().find_orphans()  # no test filter: all of gpusm's
    assert {lookalike, half}.isdisjoint(h.container_id for h in everything)
    found = {h.instance: h for h in rt.find_orphans()}
    assert set(found) == {"orphan-live", "orphan-exited"}
    assert found["orphan-live"] == live
    assert found["orphan-exited"].pid is None
    # Recovery reaps the exited one: stop removes it and says it was already dead.
    assert rt.stop(found["orphan-exited"], 1.0).already_dead
    assert {h.instance for h in rt.find_orphans()} == {"orphan-live"}
    # Even a handle naming the lookalike (by id or by name) does not reach it.
    by_id = Handle(service="foo", instance=lookalike_name[-4:], container_id=lookalike)
    by_name = Handle(service="foo", instance=lookalike_name[-4:])
    for handle in (by_id, by_name):
        assert not rt.is_alive(handle)
        assert rt.pids_of(handle) == set()
        assert rt.stop(handle, 0.1).already_dead
        rt.remove(handle)
    assert inspect(lookalike)["State"]["Running"] is True


def test_log_tail_exit_code_and_remove_of_an_exited_container(
    rt: DockerRuntime, run_id: str
) -> None:
    running = rt.start(busybox_service(name(), SLEEP), "keep")
    with pytest.raises(ServiceRuntimeError, match="still running; stop it first"):
        rt.remove(running)
    handle = rt.start(busybox_service(name(), "echo goodbye; exit 3"), "gone")
    eventually(lambda: not rt.is_alive(handle), 15, "exited")
    assert rt.pids_of(handle) == set()
    assert rt.log_tail(handle) == "goodbye"
    assert rt.exit_code(handle) == 3
    rt.remove(handle)
    rt.remove(handle)  # already gone: nothing to do
    assert rt.log_tail(handle) == ""
    assert rt.exit_code(handle) is None
    assert running.container_id is not None
    assert our_containers(run_id) == [running.container_id[:12]]


# ---------------------------------------------------------------- clear errors
def test_missing_image_fails_naming_the_service_and_the_fix(rt: DockerRuntime, run_id: str) -> None:
    svc = busybox_service(name(), SLEEP, image="gpusm-test-no-such-image:1")
    with pytest.raises(ServiceStartFailed) as info:
        rt.start(svc, "x")
    assert info.value.service == svc.name
    assert str(info.value) == (
        f"service {svc.name!r}: image gpusm-test-no-such-image:1 not found locally; "
        "build it or set pull: true"
    )
    assert our_containers(run_id) == []


def test_pull_true_starts_a_local_image_without_pulling(rt: DockerRuntime) -> None:
    # No registry is reachable here, so a pull would fail: the local image must do.
    handle = rt.start(busybox_service(name(), SLEEP, pull=True), "local")
    assert rt.is_alive(handle)


def test_pull_true_reports_a_failed_pull_clearly(rt: DockerRuntime, run_id: str) -> None:
    svc = busybox_service(name(), SLEEP, image="127.0.0.1:1/gpusm-missing:1", pull=True)
    with pytest.raises(ServiceStartFailed, match=r"could not pull image 127\.0\.0\.1:1/"):
        rt.start(svc, "x")
    assert our_containers(run_id) == []


@pytest.mark.parametrize("where", ["health", "published"])
def test_busy_port_fails_before_any_container_is_created(
    rt: DockerRuntime, run_id: str, where: str
) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        if where == "health":
            health = HealthConfig(http=f"http://localhost:{port}/health")
            svc = busybox_service(name(), SLEEP, health=health)
        else:
            svc = busybox_service(name(), SLEEP, network_mode=None, ports=[f"{port}:80"])
        with pytest.raises(ServiceStartFailed) as info:
            rt.start(svc, "x")
    assert f"port 127.0.0.1:{port} is already in use" in str(info.value)
    assert svc.name in str(info.value)
    assert our_containers(run_id) == []


def test_name_conflict_fails_and_leaves_the_existing_container_alone(
    rt: DockerRuntime, plain_container: Callable[..., str]
) -> None:
    svc = busybox_service(name(), SLEEP)
    existing = plain_container(container_name(svc.name, "abcdefgh-1"))
    with pytest.raises(ServiceStartFailed, match=r"already exists.*docker rm -f gpusm-"):
        rt.start(svc, "abcdefgh-1")
    assert inspect(existing)["State"]["Running"] is True


def test_unrunnable_command_without_init_fails_with_the_engine_reason_and_leaves_nothing(
    rt: DockerRuntime, run_id: str
) -> None:
    svc = busybox_service(name(), SLEEP, command=["/nonexistent-program"], pid_mode="host")
    with pytest.raises(ServiceStartFailed, match="/nonexistent-program") as info:
        rt.start(svc, "x")
    assert svc.name in str(info.value)
    assert our_containers(run_id) == []


def test_unrunnable_command_under_init_dies_at_once_and_its_logs_say_why(
    rt: DockerRuntime,
) -> None:
    # Docker's init is what runs first, so the engine cannot see the failed exec.
    handle = rt.start(busybox_service(name(), SLEEP, command=["/nonexistent-program"]), "x")
    eventually(lambda: not rt.is_alive(handle), 15, "seen dead")
    assert "exec /nonexistent-program failed" in rt.log_tail(handle)
