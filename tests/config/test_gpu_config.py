"""Devices in the config: ``gpu: auto | N | [N..]``, ``gpu_count``, placement, sim sizes."""

from __future__ import annotations

from typing import Any

import pytest

from gpusm.config import check_devices, parse_config
from gpusm.errors import ConfigError
from gpusm.gpu.memory import MemoryGpu, MemoryProbe
from gpusm.wiring import check_host_devices


def config(service: dict[str, Any], sim: dict[str, Any] | None = None, **gpu: Any) -> Any:
    entry = {"vram_mib": 1000, "health": {"tcp": "127.0.0.1:9"}, **service}
    if entry.get("runtime", "native") == "native":
        entry.setdefault("command", ["x"])
    raw = {
        "gpu": {"backend": "sim", "reserve_mib": 0, "sim": sim or {}, **gpu},
        "services": {"s": entry},
    }
    return parse_config(raw)


def test_gpu_defaults_to_any_device_and_binpack() -> None:
    cfg = config({})
    svc = cfg.services["s"]
    assert (svc.gpu, svc.gpu_count, svc.pinned) == ("auto", 1, None)
    assert svc.allowed_devices(3) == [0, 1, 2]
    assert cfg.gpu.placement == "binpack"


def test_a_pinned_device_and_a_set_of_devices() -> None:
    sim = {"devices": 3}
    assert config({"gpu": 2}, sim).services["s"].allowed_devices(3) == [2]
    assert config({"gpu": 2}, sim).services["s"].pinned == 2
    assert config({"gpu": [2, 0]}, sim).services["s"].allowed_devices(3) == [0, 2]


def test_sim_sizes_are_one_for_all_or_one_per_device() -> None:
    assert config({}, {"devices": 2, "total_mib": 8192}).gpu.sim.sizes == [8192, 8192]
    assert config({}, {"total_mib": [8192, 4096]}).gpu.sim.sizes == [8192, 4096]
    assert config({}, {"devices": 3, "total_mib": [8192]}).gpu.sim.sizes == [8192] * 3


@pytest.mark.parametrize(
    ("service", "sim", "key", "problem"),
    [
        ({"gpu": 2}, {"devices": 2}, "services.s.gpu", "device 2 does not exist: this host has 2"),
        ({"gpu": [0, 5]}, {"devices": 2}, "services.s.gpu", "device 5 does not exist"),
        ({"gpu": 1}, {}, "services.s.gpu", "this host has one device (0)"),
        ({"gpu": []}, {}, "services.s", "gpu: [] allows no device"),
        ({"gpu": [1, 1]}, {"devices": 2}, "services.s", "gpu lists a device twice"),
        ({"gpu": 0, "gpu_count": 2}, {"devices": 2}, "services.s", "gpu pins one (0)"),
        ({"gpu": [0], "gpu_count": 2}, {"devices": 2}, "services.s", "more than the 1 devices"),
        ({"gpu_count": 3}, {"devices": 2}, "services.s.gpu_count", "3 devices asked"),
        (
            {"vram_mib": 9000},
            {"total_mib": [8192, 4096]},
            "services.s.vram_mib",
            "exceeds every device it may use (the biggest has 8192 MiB)",
        ),
        (
            {"vram_mib": 6000, "gpu": 1},
            {"total_mib": [8192, 4096]},
            "services.s.vram_mib",
            "exceeds the GPU's 4096 MiB",
        ),
        ({}, {"devices": 3, "total_mib": [1, 2]}, "gpu.sim", "total_mib lists 2 sizes for 3"),
        ({"gpu": "any"}, {}, "services.s.gpu", "Input should be 'auto'"),
    ],
)
def test_device_mistakes_are_refused_with_the_key_and_the_fix(
    service: dict[str, Any], sim: dict[str, Any], key: str, problem: str
) -> None:
    with pytest.raises(ConfigError) as info:
        config(service, sim)
    assert info.value.key == key
    assert problem in str(info.value)


def test_placement_must_be_binpack_or_spread() -> None:
    with pytest.raises(ConfigError, match="use 'binpack' or 'spread'"):
        config({}, placement="fill")


def test_the_hosts_devices_are_checked_at_start_up() -> None:
    cfg = parse_config(
        {
            "services": {
                "s": {"command": ["x"], "vram_mib": 1000, "gpu": 3, "health": {"tcp": "h:1"}}
            }
        }
    )  # nvml: the file alone cannot know the host's devices
    probe = MemoryProbe([MemoryGpu(8192), MemoryGpu(8192, index=1)])
    with pytest.raises(ConfigError) as info:
        check_host_devices(cfg, probe)
    assert "device 3 does not exist: this host has 2 (0-1)" in str(info.value)
    check_devices(cfg, 4, [8192] * 4)  # a bigger host has it


def test_an_unreadable_gpu_is_left_to_recovery() -> None:
    cfg = parse_config(
        {"services": {"s": {"command": ["x"], "vram_mib": 1, "gpu": 3, "health": {"tcp": "h:1"}}}}
    )
    probe = MemoryProbe(MemoryGpu(8192))
    probe.unreadable = "no driver"
    check_host_devices(cfg, probe)  # nothing raised: recovery reports the GPU


def test_a_docker_gpus_list_must_cover_every_device_it_may_be_placed_on() -> None:
    docker = {"runtime": "docker", "image": "x", "gpus": [1]}
    with pytest.raises(ConfigError) as info:
        config(docker, {"devices": 2})
    assert info.value.key == "services.s.gpus"
    assert "set gpu: 1" in str(info.value)
    assert config({**docker, "gpu": 1}, {"devices": 2}).services["s"].pinned == 1
