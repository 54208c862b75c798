"""The runtime contract, run against the Docker runtime on a real engine.

Twice: with the container's own pid namespace (Docker's init forwards signals), and
sharing the host's (how the containerised fake model server runs, without an init).
"""

from __future__ import annotations

import shlex
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest

from gpusm.config import DockerServiceConfig, ServiceConfig
from gpusm.ports import Handle, Runtime
from gpusm.runtimes.docker import DockerRuntime
from tests.contracts.runtime_contract import RuntimeContract
from tests.runtimes.docker_helpers import (
    busybox_service,
    labels_for,
    remove_test_containers,
    require_test_images,
)
from tests.support import eventually

pytestmark = pytest.mark.docker

# Each script that says "ready" says it once its traps and children are in place.
READY = "echo ready"
SLEEP = f"{READY}; exec sleep 1000"
SILENT = "exec sleep 1000"
IGNORE_TERM = f"trap '' TERM; {READY}; sleep 1000 & wait"
FORK = f"sleep 1000 & sleep 1000 & {READY}; wait"
EXIT = "sleep 0.2; exit {code}"


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
        return DockerRuntime(extra_labels=labels_for(self.run_id), kind="docker-ct")

    def _service(self, name: str, script: str) -> ServiceConfig:
        return busybox_service(name, script, pid_mode=self.pid_mode)

    def sleeping_service(self, runtime: Runtime, name: str) -> ServiceConfig:
        return self._service(name, SLEEP)

    def sigterm_ignoring_service(self, runtime: Runtime, name: str) -> ServiceConfig:
        return self._service(name, IGNORE_TERM)

    def forking_service(self, runtime: Runtime, name: str) -> ServiceConfig:
        return self._service(name, FORK)

    def exiting_service(self, runtime: Runtime, name: str, code: int = 3) -> ServiceConfig:
        return self._service(name, EXIT.format(code=code))

    def chatty_service(self, runtime: Runtime, name: str, lines: list[str]) -> ServiceConfig:
        echoes = "; ".join(f"echo {shlex.quote(line)}" for line in lines)
        return self._service(name, f"{echoes}; exec sleep 1000")

    def silent_service(self, runtime: Runtime, name: str) -> ServiceConfig:
        return self._service(name, SILENT)

    def killed_exit_code(self, sig: signal.Signals) -> int:
        # Docker reports death by a signal the shell's way, and cannot tell it apart.
        return 128 + int(sig)

    def unstartable_service(self, runtime: Runtime, name: str) -> ServiceConfig:
        return busybox_service(name, SLEEP, image="gpusm-test-no-such-image:latest")

    def wait_until_ready(self, runtime: Runtime, handle: Handle, service: ServiceConfig) -> None:
        assert isinstance(service, DockerServiceConfig)
        if READY not in " ".join(service.command or []):
            return  # it never says so
        eventually(
            lambda: "ready" in runtime.log_tail(handle), self.patience_s, f"{service.name} ready"
        )


class TestDockerRuntimeContract(_DockerContract):
    """The container's own pid namespace, with Docker's init as pid 1."""


class TestDockerRuntimeHostPidContract(_DockerContract):
    """``pid_mode: host``: no init, the service's processes are plain host processes."""

    pid_mode = "host"
