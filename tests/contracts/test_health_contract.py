"""The HealthCheck contract, run against the real checker's three modes and the in-memory fake.

The real checker talks to real endpoints on 127.0.0.1 (an HTTP server, a TCP socket,
a shell command) on the system clock; the fake is driven by a manual clock, so its
run never sleeps.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from gpusm.clock import ManualClock
from gpusm.config import HealthConfig
from gpusm.health import Health, MemoryHealth
from tests.contracts.health_contract import Checker, Endpoint, HealthContract
from tests.support import StatusServer


class RealHealthContract(HealthContract):
    """The real checker on the system clock."""

    def make_checker(self) -> Checker:
        return Health()


class TestHttpHealthContract(RealHealthContract):
    """An HTTP server answering 503 until healed, then 200."""

    def serve(self, status: int) -> StatusServer:
        return self.cleanup.enter_context(StatusServer(status))

    def endpoint(self, checker: Checker) -> Endpoint:
        server = self.serve(503)
        return Endpoint(HealthConfig(http=server.url), lambda: setattr(server, "status", 200))

    def hanging(self, checker: Checker) -> HealthConfig:
        server = self.serve(200)
        server.delay_s = 60.0
        return HealthConfig(http=server.url)

    def answering(self, checker: Checker, status: int) -> HealthConfig:
        return HealthConfig(http=self.serve(status).url)


class TestTcpHealthContract(RealHealthContract):
    """A port that is bound but refuses connections until healed, when it listens."""

    def socket(self) -> socket.socket:
        sock = self.cleanup.enter_context(socket.socket())
        sock.bind(("127.0.0.1", 0))
        return sock

    def endpoint(self, checker: Checker) -> Endpoint:
        sock = self.socket()
        port = sock.getsockname()[1]
        return Endpoint(HealthConfig(tcp=f"127.0.0.1:{port}"), sock.listen)

    def hanging(self, checker: Checker) -> HealthConfig:
        # A listener whose accept queue is full: the kernel drops further SYNs, so a
        # connect waits for its timeout.
        sock = self.socket()
        sock.listen(0)
        port = sock.getsockname()[1]
        for _ in range(8):
            filler = self.cleanup.enter_context(socket.socket())
            filler.settimeout(0.2)
            try:
                filler.connect(("127.0.0.1", port))
            except TimeoutError:
                return HealthConfig(tcp=f"127.0.0.1:{port}")
        pytest.skip("this kernel accepts connections beyond a full backlog")


class TestExecHealthContract(RealHealthContract):
    """A shell command that fails until healed by creating the file it looks for."""

    @pytest.fixture(autouse=True)
    def _files(self, tmp_path: Path) -> None:
        self.files = tmp_path

    def endpoint(self, checker: Checker) -> Endpoint:
        ready = self.files / "ready"
        script = f'test -e "{ready}" || {{ echo "{ready.name} missing" >&2; exit 1; }}'
        return Endpoint(HealthConfig(exec=["sh", "-c", script]), ready.touch)

    def hanging(self, checker: Checker) -> HealthConfig:
        return HealthConfig(exec=["sleep", "60"])


class TestMemoryHealthContract(HealthContract):
    """The in-package fake on a manual clock: every bound is exact."""

    slack_s = 0.0

    def make_checker(self) -> Checker:
        return MemoryHealth(ManualClock())

    def fake(self, checker: Checker) -> MemoryHealth:
        assert isinstance(checker, MemoryHealth)
        return checker

    def endpoint(self, checker: Checker) -> Endpoint:
        fake = self.fake(checker)
        health = HealthConfig(http="http://127.0.0.1:9/health")
        fake.failing[fake.endpoint(health)] = "status 503"
        return Endpoint(health, lambda: fake.failing.clear())

    def hanging(self, checker: Checker) -> HealthConfig:
        fake = self.fake(checker)
        health = HealthConfig(tcp="127.0.0.1:9")
        fake.latency_s[fake.endpoint(health)] = 3600.0
        return health

    def answering(self, checker: Checker, status: int) -> HealthConfig:
        fake = self.fake(checker)
        health = HealthConfig(http="http://127.0.0.1:9/health")
        fake.status[fake.endpoint(health)] = status
        return health
