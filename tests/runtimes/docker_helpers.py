"""Helpers for tests that run real containers: test images, service configs, cleanup.

The images are built locally by ``scripts/build_test_image.sh`` (no registry):

- ``gpusm-test-busybox:latest``: a static busybox (``sh``, ``sleep``, ``trap``...).
- ``gpusm-test-python:latest``: the same, run with this machine's Python, the repository
  and the system libraries bind-mounted read-only, so the container runs exactly the code
  under test. :func:`fake_server_service` builds such a service for the fake model server.

Containers made by tests carry the label ``gpusm.test=<run id>`` (give the runtime
``extra_labels=labels_for(run_id)``) so :func:`remove_test_containers` can sweep them.
"""

from __future__ import annotations

import functools
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gpusm.config import DockerServiceConfig, HealthConfig

__all__ = [
    "BUSYBOX_IMAGE",
    "PYTHON_IMAGE",
    "REPO_ROOT",
    "TEST_LABEL",
    "busybox_service",
    "docker_cli",
    "fake_server_service",
    "free_tcp_port",
    "labels_for",
    "python_env_volumes",
    "remove_test_containers",
    "require_test_images",
]

BUSYBOX_IMAGE = "gpusm-test-busybox:latest"
PYTHON_IMAGE = "gpusm-test-python:latest"
TEST_LABEL = "gpusm.test"
REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO_ROOT / "scripts" / "build_test_image.sh"
# System folders the interpreter and its C extensions load shared libraries from.
_SYSTEM_DIRS = ("/usr", "/lib", "/lib64", "/lib32", "/libx32")


def docker_cli(*args: str, check: bool = True, timeout: float = 60) -> str:
    """Run the ``docker`` CLI (independent of the code under test); returns stdout."""
    proc = subprocess.run(
        ["docker", *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout


@functools.cache
def _build_images() -> str | None:
    """Run the (idempotent) build script once per test session; None or why it failed."""
    proc = subprocess.run(
        ["bash", str(BUILD_SCRIPT)], capture_output=True, text=True, timeout=300, check=False
    )
    return None if proc.returncode == 0 else (proc.stderr or proc.stdout).strip()


def require_test_images() -> None:
    """Build the test images if needed; skip the test (fail under ``CI=true``) if impossible."""
    why = _build_images()
    if why is not None:
        message = f"cannot build the Docker test images: {why}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


def labels_for(run_id: str) -> dict[str, str]:
    """The extra labels that mark a test's containers for :func:`remove_test_containers`."""
    return {TEST_LABEL: run_id}


def remove_test_containers(run_id: str, *names: str) -> None:
    """Force-remove every container labelled with ``run_id``, and those ``names``."""
    ids = docker_cli("ps", "-aq", "--filter", f"label={TEST_LABEL}={run_id}").split()
    targets = ids + [n for n in names if docker_cli("ps", "-aq", "--filter", f"name=^{n}$")]
    if targets:
        docker_cli("rm", "-f", "-v", *targets, check=False)


def free_tcp_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def busybox_service(name: str, script: str, **overrides: Any) -> DockerServiceConfig:
    """A docker service running ``sh -c script`` in the busybox image, on the host network."""
    fields: dict[str, Any] = {
        "name": name,
        "runtime": "docker",
        "image": BUSYBOX_IMAGE,
        "command": ["sh", "-c", script],
        "network_mode": "host",
        "vram_mib": 0,
        "health": HealthConfig(exec=["true"]),
    }
    return DockerServiceConfig(**{**fields, **overrides})


def python_env_volumes() -> list[str]:
    """Read-only bind mounts that let a container run ``sys.executable`` and import gpusm.

    The interpreter (``sys.base_prefix``), the virtual environment (``sys.prefix``), the
    repository and the system library folders appear at the same paths as on the host.
    """
    wanted = {
        Path(sys.prefix),
        Path(sys.base_prefix),
        Path(os.path.realpath(sys.executable)).parent,
        REPO_ROOT,
        *(Path(d) for d in _SYSTEM_DIRS),
    }
    present = sorted(p for p in wanted if p.exists())
    # A folder inside another mounted one comes with it.
    kept = [p for p in present if not any(q != p and p.is_relative_to(q) for q in present)]
    return [f"{p}:{p}:ro" for p in kept]


def fake_server_service(
    name: str,
    port: int,
    vram_mib: int,
    sim_dir: Path,
    *,
    load_s: float = 0.0,
    stop_s: float = 0.0,
    ignore_sigterm: bool = False,
    crash_after: float | None = None,
    grow_mib: int = 0,
    **overrides: Any,
) -> DockerServiceConfig:
    """The docker service config of ``gpusm sim service`` (the fake model server).

    It runs in ``gpusm-test-python:latest`` with the host's Python and this repository
    mounted read-only, shares the host's pid namespace (the simulated GPU attributes
    memory to host pids, and ``pids_of``/NVML speak host pids) and network (it listens
    on ``127.0.0.1:port``), and writes the simulated GPU in ``sim_dir`` (mounted
    read-write; create the GPU there first). Health: ``GET http://127.0.0.1:port/health``.
    ``overrides`` are further ServiceConfig fields (``priority``, ``stop_timeout_s``,
    ``health``...). Call :func:`require_test_images` before starting it.
    """
    sim_dir = Path(sim_dir).resolve()
    command = [
        sys.executable,
        "-m",
        "gpusm",
        "sim",
        "service",
        "--vram-mib",
        str(vram_mib),
        "--port",
        str(port),
        "--sim-dir",
        str(sim_dir),
        "--load-s",
        str(load_s),
        "--stop-s",
        str(stop_s),
        "--grow-mib",
        str(grow_mib),
    ]
    if ignore_sigterm:
        command.append("--ignore-sigterm")
    if crash_after is not None:
        command += ["--crash-after", str(crash_after)]
    fields: dict[str, Any] = {
        "name": name,
        "runtime": "docker",
        "image": PYTHON_IMAGE,
        "command": command,
        # The repository is read-only inside: no bytecode writes; gpusm imports from it.
        "env": {"PYTHONPATH": str(REPO_ROOT), "PYTHONDONTWRITEBYTECODE": "1", "HOME": "/tmp"},
        "volumes": [*python_env_volumes(), f"{sim_dir}:{sim_dir}"],
        "network_mode": "host",
        "pid_mode": "host",
        "vram_mib": vram_mib,
        "health": HealthConfig(
            http=f"http://127.0.0.1:{port}/health", timeout_s=60.0, probe_timeout_s=1.0
        ),
    }
    return DockerServiceConfig(**{**fields, **overrides})
