"""The real checker's own details: reasons per mode, child cleanup, the schedule, promptness.

What every HealthCheck promises (ok, failure, probe timeout, deadline, still_alive,
expect_status) is pinned in tests/contracts/test_health_contract.py.
"""

from __future__ import annotations

import socket
import sys
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from gpusm.clock import ManualClock
from gpusm.config import HealthConfig
from gpusm.health import Health
from gpusm.health.checks import _connect_problem
from tests.support import StatusServer
from tests.support.ports import free_port


@pytest.fixture
def served() -> Iterator[StatusServer]:
    with StatusServer(503) as server:
        yield server


@pytest.fixture
def health() -> Iterator[Health]:
    with Health() as h:
        yield h


def http(url: str, **kw: object) -> HealthConfig:
    return HealthConfig(http=url, **kw)


# ---------------------------------------------------------------- HTTP
def test_http_is_unhealthy_while_503_then_healthy_on_200(
    health: Health, served: StatusServer
) -> None:
    first = health.probe(http(served.url))
    assert not first.ok
    assert first.reason.startswith("status 503")
    served.status = 200
    assert health.probe(http(served.url)).ok


def test_http_connection_refused_names_the_url(health: Health) -> None:
    url = f"http://127.0.0.1:{free_port()}/health"
    result = health.probe(http(url))
    assert not result.ok
    assert result.reason == f"connection refused to {url}"


def test_http_garbage_answer_is_a_readable_failure(health: Health) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def answer() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(4096)
            conn.sendall(b"this is not HTTP\r\n\r\n")

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    try:
        result = health.probe(http(f"http://127.0.0.1:{port}/health"))
    finally:
        thread.join(5)
        listener.close()
    assert not result.ok
    assert result.reason.startswith("HTTP error from")


def test_connect_problems_are_named() -> None:
    assert _connect_problem(httpx.ConnectError("[Errno 111] Connection refused")) == (
        "connection refused"
    )
    assert _connect_problem(httpx.ConnectError("Name or service not known")) == (
        "cannot resolve host"
    )
    assert _connect_problem(httpx.ConnectError("boom")) == "cannot connect (boom)"


# ---------------------------------------------------------------- TCP
def test_tcp_ok_when_something_listens_and_refused_when_not(health: Health) -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        assert health.probe(HealthConfig(tcp=f"127.0.0.1:{port}")).ok
    refused = health.probe(HealthConfig(tcp=f"127.0.0.1:{port}"))
    assert not refused.ok
    assert refused.reason == f"connection refused to 127.0.0.1:{port}"


def test_tcp_to_an_unresolvable_host_is_a_readable_failure(health: Health) -> None:
    result = health.probe(HealthConfig(tcp="no-such-host.invalid:80", probe_timeout_s=2.0))
    assert not result.ok
    assert "no-such-host.invalid:80" in result.reason


# ---------------------------------------------------------------- exec
def test_exec_ok_on_exit_zero(health: Health) -> None:
    assert health.probe(HealthConfig(exec=[sys.executable, "-c", "pass"])).ok


def test_exec_failure_reports_exit_code_and_stderr_tail(health: Health) -> None:
    code = "import sys; sys.stderr.write('x' * 1000 + 'model not loaded'); sys.exit(4)"
    result = health.probe(HealthConfig(exec=[sys.executable, "-c", code]))
    assert not result.ok
    assert result.reason.startswith("exit 4: x")
    assert result.reason.endswith("model not loaded")
    assert len(result.reason) < 400
    quiet = health.probe(HealthConfig(exec=[sys.executable, "-c", "raise SystemExit(2)"]))
    assert quiet.reason == "exit 2"


def test_exec_is_killed_with_its_children_on_timeout(health: Health) -> None:
    code = (
        "import subprocess, sys, time\n"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)'])\n"
        "time.sleep(30)"
    )
    began = time.monotonic()
    result = health.probe(HealthConfig(exec=[sys.executable, "-c", code], probe_timeout_s=0.5))
    assert not result.ok
    assert result.reason.startswith("timed out after 0.5s")
    # The child kept stderr open; had it survived, reading would have waited 30 s.
    assert time.monotonic() - began < 10


def test_exec_of_a_missing_program_is_a_readable_failure(health: Health) -> None:
    result = health.probe(HealthConfig(exec=["gpusm-no-such-probe"]))
    assert not result.ok
    assert result.reason.startswith("cannot run 'gpusm-no-such-probe'")


# ---------------------------------------------------------------- waiting
def test_wait_healthy_returns_once_the_service_is_ready(
    health: Health, served: StatusServer
) -> None:
    timer = threading.Timer(0.3, lambda: setattr(served, "status", 200))
    timer.start()
    try:
        result = health.wait_healthy(http(served.url), time.monotonic() + 10)
    finally:
        timer.cancel()
    assert result.ok
    assert result.probes > 1


def test_wait_healthy_gives_up_when_the_process_dies(health: Health, served: StatusServer) -> None:
    calls = 0

    def still_alive() -> bool:
        nonlocal calls
        calls += 1
        return calls < 4

    result = health.wait_healthy(http(served.url), time.monotonic() + 10, still_alive)
    assert not result.ok
    assert result.reason.startswith("process exited before becoming healthy (status 503")
    assert result.probes == 3


def test_wait_healthy_stops_at_the_deadline_on_the_configured_interval(
    manual_clock: ManualClock,
) -> None:
    with Health(manual_clock) as health:
        config = HealthConfig(tcp=f"127.0.0.1:{free_port()}", interval_s=0.25)
        result = health.wait_healthy(config, manual_clock.monotonic() + 1.0)
    assert not result.ok
    assert result.probes == 4  # at 0, 0.25, 0.5 and 0.75 s
    assert result.reason.startswith("not healthy after 1.0s: connection refused")
    assert result.elapsed_s == pytest.approx(1.0)


def test_detection_of_readiness_is_prompt(health: Health, served: StatusServer) -> None:
    # Not a benchmark: a generous bound that a 1 s fixed poll would miss most times.
    launched = time.monotonic()
    ready_at: list[float] = []

    def become_ready() -> None:
        served.status = 200
        ready_at.append(time.monotonic())

    timer = threading.Timer(0.5, become_ready)
    timer.start()
    try:
        result = health.wait_healthy(http(served.url), launched + 10, started_at=launched)
    finally:
        timer.cancel()
    noticed = time.monotonic()
    assert result.ok
    assert noticed - ready_at[0] < 0.1
