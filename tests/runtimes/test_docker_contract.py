"""The runtime contract, run against the Docker runtime on a real engine.

Twice: with the container's own pid namespace (Docker's init forwards signals), and
sharing the host's (how the containerised fake model server runs, without an init).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest
from docker_helpers import (
    busybox_service,
    labels_for,
    remove_test_containers,
    require_test_images,
)
from runtime_contract import RuntimeContract, eventually

from gpusm.config import ServiceConfig
from gpusm.ports import Handle, Runtime
from gpusm.runtimes.docker import DockerRuntime

pytestmark = pytest.mark.docker

# Each script says "ready" once its traps and children are in place.
SLEEP = "echo ready; exec sleep 1000"
IGNORE_TERM = "trap '' TERM; echo ready; sleep 1000 & wait"
FORK = "sleep 1000 & sleep 1000 & echo ready; wait"
EXIT = "sleep 0.2; exit 3"


class _DockerContract(RuntimeContract):
    """Busybox containers on the host network; subclasses pick the pid namespace."""

    pid_mode: ClassVar[str | None] = None

    @pytest.fixture(autouse=True)
    def _sweep_containers(self, docker_engine: None) -> Iterator[None]:
        require_test_images()
        self.run_id = uuid.uuid4().hex
        yield
        remove_test_containers(self.run_id)

    def create_runtime(self, tmp_path: Path) -> Runtime:
        return DockerRuntime(extra_labels=labels_for(self.run_id))

    def _service(self, name: str, script: str) -> ServiceConfig:
        return busybox_service(name, script, pid_mode=self.pid_mode)

    def sleeping_service(self, runtime: Runtime, name: str) -> ServiceConfig:
        return self._service(name, SLEEP)

    def sigterm_ignoring_service(self, runtime: Runtime, name: str) -> ServiceConfig:
        return self._service(name, IGNORE_TERM)

    def forking_service(self, runtime: Runtime, name: str) -> ServiceConfig:
        return self._service(name, FORK)

    def exiting_service(self, runtime: Runtime, name: str) -> ServiceConfig:
        return self._service(name, EXIT)

    def unstartable_service(self, runtime: Runtime, name: str) -> ServiceConfig:
        return busybox_service(name, SLEEP, image="gpusm-test-no-such-image:latest")

    def wait_until_ready(self, runtime: Runtime, handle: Handle, service: ServiceConfig) -> None:
        assert isinstance(runtime, DockerRuntime)
        eventually(
            lambda: "ready" in runtime.logs_tail(handle), self.patience_s, f"{service.name} ready"
        )


class TestDockerRuntimeContract(_DockerContract):
    """The container's own pid namespace, with Docker's init as pid 1."""


class TestDockerRuntimeHostPidContract(_DockerContract):
    """``pid_mode: host``: no init, the service's processes are plain host processes."""

    pid_mode = "host"
