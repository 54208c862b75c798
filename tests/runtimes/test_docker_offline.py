"""The Docker runtime where no engine answers, and what it decides before asking one.

These need no Docker engine: they run everywhere.
"""

from __future__ import annotations

import socket
from pathlib import Path

import docker
import pytest

from gpusm.config import DockerServiceConfig, HealthConfig, NativeServiceConfig, parse_config
from gpusm.errors import ServiceRuntimeError, ServiceStartFailed, ServiceStopFailed
from gpusm.ports import Handle, Placement
from gpusm.runtimes.docker import DockerRuntime, container_name
from gpusm.wiring import open_runtime
from tests.runtimes.docker_helpers import busybox_service, free_tcp_port

SLEEP = "sleep 1000"
HANDLE = Handle(service="tts", instance="i-1", container_id="0123456789ab")


@pytest.fixture
def no_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """DOCKER_HOST pointing at a socket nobody serves."""
    host = f"unix://{tmp_path}/docker.sock"
    monkeypatch.setenv("DOCKER_HOST", host)
    return host


def test_unreachable_engine_at_start_names_the_address_and_the_fix(no_socket: str) -> None:
    with pytest.raises(ServiceStartFailed) as info:
        DockerRuntime().start(busybox_service("tts", SLEEP), "i-1")
    assert str(info.value) == (
        f"service 'tts': cannot reach the Docker engine at {no_socket}; "
        "start dockerd or check DOCKER_HOST"
    )


def test_unreachable_engine_fails_every_call_with_the_right_error(no_socket: str) -> None:
    rt = DockerRuntime()
    with pytest.raises(ServiceStopFailed, match="cannot reach the Docker engine"):
        rt.stop(HANDLE, 1.0)
    for call in (lambda: rt.is_alive(HANDLE), lambda: rt.pids_of(HANDLE), rt.find_orphans):
        with pytest.raises(ServiceRuntimeError, match="start dockerd or check DOCKER_HOST"):
            call()
    # These decorate other errors and records: never raise.
    assert rt.log_tail(HANDLE) == ""
    assert rt.exit_code(HANDLE) is None
    rt.close()
    rt.close()


def test_a_native_service_is_refused_before_the_engine_is_asked(no_socket: str) -> None:
    svc = NativeServiceConfig(
        name="plain", command=["true"], vram_mib=0, health=HealthConfig(tcp="127.0.0.1:9")
    )
    with pytest.raises(ServiceStartFailed, match=r"'plain'.*runtime: docker"):
        DockerRuntime().start(svc, "i-1")


def test_engine_that_stops_answering_after_connecting_gives_the_same_clear_error() -> None:
    port = free_tcp_port()  # nothing listens there
    calls: list[int] = []

    def factory() -> docker.DockerClient:
        calls.append(1)
        # A fixed API version makes the client connect lazily, like an engine that died.
        return docker.DockerClient(base_url=f"tcp://127.0.0.1:{port}", version="1.41")

    rt = DockerRuntime(client_factory=factory)
    with pytest.raises(ServiceRuntimeError, match=f"engine at http://127.0.0.1:{port};"):
        rt.is_alive(HANDLE)
    with pytest.raises(ServiceStartFailed, match="cannot reach the Docker engine"):
        rt.start(busybox_service("tts", SLEEP), "i-1")
    assert len(calls) == 2  # a failed connection is made afresh next time
    rt.close()
    rt.close()


def test_bad_volume_entry_fails_before_asking_the_engine(no_socket: str) -> None:
    svc = busybox_service("tts", SLEEP, volumes=["/data:/data:rx"])
    with pytest.raises(ServiceStartFailed, match=r"volumes entry '/data:/data:rx' must look like"):
        DockerRuntime().start(svc, "i-1")


def test_port_on_an_address_this_host_lacks_fails_before_asking_the_engine(
    no_socket: str,
) -> None:
    svc = busybox_service("tts", SLEEP, network_mode=None, ports=["192.0.2.1:8080:80"])
    with pytest.raises(ServiceStartFailed, match=r"192\.0\.2\.1 .* not an address of this host"):
        DockerRuntime().start(svc, "i-1")


def test_busy_tcp_health_port_fails_before_asking_the_engine(no_socket: str) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        svc = busybox_service("tts", SLEEP, health={"tcp": f"127.0.0.1:{port}"})
        with pytest.raises(ServiceStartFailed, match=f"port 127.0.0.1:{port} is already in use"):
            DockerRuntime().start(svc, "i-1")


def test_remote_health_port_and_udp_ports_are_not_checked_locally(no_socket: str) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        svc = busybox_service(
            "tts",
            SLEEP,
            network_mode=None,
            ports=[f"{port}:80/udp"],
            health={"http": f"http://192.0.2.1:{port}/health"},
        )
        # It gets as far as the (missing) engine.
        with pytest.raises(ServiceStartFailed, match="cannot reach the Docker engine"):
            DockerRuntime().start(svc, "i-1")


def test_gpus_become_nvidia_device_requests() -> None:
    rt = DockerRuntime()
    every = rt._create_kwargs(busybox_service("a", SLEEP, gpus="all"), "i")
    some = rt._create_kwargs(busybox_service("b", SLEEP, gpus=[0, 2]), "i")
    none = rt._create_kwargs(busybox_service("c", SLEEP), "i")
    [request] = every["device_requests"]
    assert (request["Driver"], request["Count"], request["Capabilities"]) == (
        "nvidia",
        -1,
        [["gpu"]],
    )
    [request] = some["device_requests"]
    assert (request["Driver"], request["DeviceIDs"]) == ("nvidia", ["0", "2"])
    assert "device_requests" not in none
    # No image default is overridden unless the service gives a command.
    assert rt._create_kwargs(busybox_service("d", SLEEP, command=None), "i")["command"] is None


_PLACED = Placement(indices=(3, 1), uuids=("GPU-aaaa", "GPU-bbbb"))


def _gpu_service(**overrides: object) -> DockerServiceConfig:
    return busybox_service(
        "g",
        "serve --device={gpu} --devices={gpus}",
        env={"DEVICE": "cuda:{gpu}", "CUDA_VISIBLE_DEVICES": "7", "CUDA_DEVICE_ORDER": "x"},
        **overrides,
    )


def test_placement_sets_cuda_env_over_the_services_and_fills_placeholders() -> None:
    kwargs = DockerRuntime()._create_kwargs(_gpu_service(), "i", _PLACED)
    env = kwargs["environment"]
    assert env["CUDA_VISIBLE_DEVICES"] == "GPU-aaaa,GPU-bbbb"
    assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert env["DEVICE"] == "cuda:3"
    assert kwargs["command"] == ["sh", "-c", "serve --device=3 --devices=3,1"]
    # The simulated backend (gpu_requests False): no device request.
    assert "device_requests" not in kwargs


def test_without_placement_no_cuda_env_and_placeholders_are_the_configured_device() -> None:
    kwargs = DockerRuntime(gpu_requests=True)._create_kwargs(_gpu_service(gpu=2), "i")
    env = kwargs["environment"]
    assert (env["CUDA_VISIBLE_DEVICES"], env["CUDA_DEVICE_ORDER"]) == ("7", "x")  # the service's
    assert env["DEVICE"] == "cuda:2"
    assert kwargs["command"] == ["sh", "-c", "serve --device=2 --devices=2"]
    assert "device_requests" not in kwargs
    auto = DockerRuntime()._create_kwargs(_gpu_service(), "i")
    assert auto["command"] == ["sh", "-c", "serve --device=0 --devices=0"]


def test_real_gpus_get_a_device_request_for_the_placed_uuids_or_indices() -> None:
    rt = DockerRuntime(gpu_requests=True)
    [request] = rt._create_kwargs(_gpu_service(), "i", _PLACED)["device_requests"]
    assert (request["Driver"], request["DeviceIDs"], request["Capabilities"]) == (
        "nvidia",
        ["GPU-aaaa", "GPU-bbbb"],
        [["gpu"]],
    )
    by_index = rt._create_kwargs(_gpu_service(), "i", Placement(indices=(3, 1)))
    [request] = by_index["device_requests"]
    assert request["DeviceIDs"] == ["3", "1"]
    # The container sees devices 1 and 3 only, as 0 and 1; the placement's order is kept.
    assert by_index["environment"]["CUDA_VISIBLE_DEVICES"] == "1,0"
    assert by_index["command"] == ["sh", "-c", "serve --device=3 --devices=3,1"]


def test_a_services_own_gpus_win_over_the_placement() -> None:
    rt = DockerRuntime(gpu_requests=True)
    every = rt._create_kwargs(_gpu_service(gpus="all"), "i", Placement(indices=(2,)))
    [request] = every["device_requests"]
    assert (request["Count"], request["DeviceIDs"]) == (-1, [])
    assert every["environment"]["CUDA_VISIBLE_DEVICES"] == "2"  # all seen: host numbering
    some = rt._create_kwargs(_gpu_service(gpus=[4, 2]), "i", Placement(indices=(4,)))
    [request] = some["device_requests"]
    assert request["DeviceIDs"] == ["4", "2"]
    assert some["environment"]["CUDA_VISIBLE_DEVICES"] == "1"  # 4 is the second of 2, 4
    named = rt._create_kwargs(_gpu_service(gpus=[4, 2]), "i", _PLACED)
    assert named["device_requests"][0]["DeviceIDs"] == ["4", "2"]
    assert named["environment"]["CUDA_VISIBLE_DEVICES"] == "GPU-aaaa,GPU-bbbb"


def test_container_name_keeps_only_characters_docker_allows() -> None:
    assert container_name("tts", "0123456789abcdef") == "gpusm-tts-01234567"
    assert container_name("tts", "a/b c:d") == "gpusm-tts-abcd"
    assert container_name("tts", "///") == "gpusm-tts-x"


def test_unreachable_tcp_engine_from_docker_host_is_named_in_the_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    host = f"tcp://127.0.0.1:{free_tcp_port()}"
    monkeypatch.setenv("DOCKER_HOST", host)
    with pytest.raises(ServiceRuntimeError, match=f"engine at {host}; start dockerd"):
        DockerRuntime().find_orphans()


@pytest.mark.parametrize(("backend", "requests"), [("nvml", True), ("sim", False)])
def test_wiring_asks_for_devices_only_with_real_gpus(
    tmp_path: Path, backend: str, requests: bool
) -> None:
    config = parse_config({"state_dir": str(tmp_path), "gpu": {"backend": backend}})
    runtime = open_runtime(config, "docker")
    assert isinstance(runtime, DockerRuntime)
    assert runtime.gpu_requests is requests
