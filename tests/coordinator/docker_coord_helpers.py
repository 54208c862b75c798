"""Helpers for coordinator tests whose services run as real Docker containers.

The containerised services run gpusm's fake model server (``gpusm sim service``) in the
local test image (see ``tests/runtimes/docker_helpers.py``), on the host's network and
pid namespace, writing the same simulated GPU as the native services. Every container a
coordinator starts carries the label ``gpusm.deployment=<id of its state dir>``, which
is how :func:`remove_deployment_containers` finds them whatever happened in the test.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from gpusm.config import HealthConfig, load_config
from gpusm.wiring import deployment_id
from tests.runtimes.docker_helpers import (
    BUSYBOX_IMAGE,
    docker_cli,
    fake_server_service,
    require_test_images,
)
from tests.seed_helpers import SEED, free_port, seed_config
from tests.support import eventually

__all__ = [
    "LOOKALIKE",
    "container_ids",
    "docker_cli",
    "docker_service",
    "is_running",
    "mixed_seed_config",
    "remove_deployment_containers",
    "require_test_images",
    "run_lookalike",
    "wait_http",
]

# An unlabelled container whose name looks like one of ours: recovery must not touch it.
LOOKALIKE = "gpusm-cosyvoice-lookalike"


def docker_service(
    name: str,
    vram_mib: int,
    priority: int,
    load_s: float,
    sim_dir: Path,
    *,
    ignore_sigterm: bool = False,
    stop_timeout_s: float = 2.0,
) -> dict[str, Any]:
    """A YAML-ready ``runtime: docker`` entry for the containerised fake model server."""
    port = free_port()
    service = fake_server_service(
        name,
        port,
        vram_mib,
        sim_dir,
        load_s=load_s,
        stop_s=0.05,
        ignore_sigterm=ignore_sigterm,
        priority=priority,
        stop_timeout_s=stop_timeout_s,
        drain_timeout_s=2.0,
        health=HealthConfig(
            http=f"http://127.0.0.1:{port}/health", timeout_s=30.0, probe_timeout_s=1.0
        ),
    )
    return service.model_dump(mode="json", exclude={"name"}, exclude_none=True)


def mixed_seed_config(
    tmp_path: Path,
    docker: dict[str, dict[str, Any]] | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """The seed config with cosyvoice and ollama as containers, vidi and comfyui native.

    ``docker`` maps a service name to keyword arguments of :func:`docker_service` that
    differ from the seed's (e.g. ``{"cosyvoice": {"load_s": 60}}``); the services it
    names are the containerised ones (default: cosyvoice and ollama).
    """
    doc = seed_config(tmp_path, **overrides)
    sim_dir = Path(doc["state_dir"]) / "simgpu"
    wanted = docker if docker is not None else {"cosyvoice": {}, "ollama": {}}
    for name, changes in wanted.items():
        vram, priority, load_s = SEED[name]
        kwargs: dict[str, Any] = {"load_s": load_s, **changes}
        doc["services"][name] = docker_service(name, vram, priority, sim_dir=sim_dir, **kwargs)
    return doc


def _deployment_filter(config_path: Path) -> str:
    return f"label=gpusm.deployment={deployment_id(load_config(config_path))}"


def container_ids(config_path: Path, *, running_only: bool = False) -> list[str]:
    """Ids of the containers the config's deployment made (running ones, if asked)."""
    flags = ["ps", "-q", "--no-trunc"] if running_only else ["ps", "-aq", "--no-trunc"]
    return docker_cli(*flags, "--filter", _deployment_filter(config_path)).split()


def remove_deployment_containers(config_path: Path) -> None:
    """Force-remove every container of the config's deployment (teardown; never fails)."""
    ids = container_ids(config_path)
    if ids:
        docker_cli("rm", "-f", "-v", *ids, check=False)


def run_lookalike() -> str:
    """Start the unlabelled busybox container :data:`LOOKALIKE`; returns its id."""
    docker_cli("rm", "-f", LOOKALIKE, check=False)
    return docker_cli(
        "run", "-d", "--name", LOOKALIKE, "--network", "host", BUSYBOX_IMAGE, "sleep", "300"
    ).strip()


def is_running(container: str) -> bool:
    """Whether the named (or id'd) container exists and runs."""
    out = docker_cli("inspect", "-f", "{{.State.Running}}", container, check=False)
    return out.strip() == "true"


def wait_http(url: str, status: int = 200, timeout_s: float = 30.0) -> None:
    """Poll ``url`` until it answers ``status``; AssertionError naming the last answer if not."""
    last = "no answer"

    def answers() -> bool:
        nonlocal last
        try:
            got = httpx.get(url, timeout=1.0).status_code
        except httpx.HTTPError as exc:
            last = repr(exc)
            return False
        last = f"HTTP {got}"
        return got == status

    try:
        eventually(answers, timeout_s, f"{url} to answer {status}")
    except AssertionError as exc:
        raise AssertionError(f"{exc} (last: {last})") from None
