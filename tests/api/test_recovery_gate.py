"""While recovery runs, only /healthz answers; if it fails, the daemon says why and stops."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from unittest import mock

import httpx
import pytest

from gpusm import Coordinator
from gpusm.api.threaded import ThreadedServer
from gpusm.client import Client
from gpusm.config import Config
from gpusm.errors import CoordinatorBusy, GpusmError
from gpusm.lock import StateDirLock
from tests.api.api_helpers import TOKEN

Serve = Callable[..., ThreadedServer]


@pytest.fixture
def gate() -> Iterator[threading.Event]:
    """Recovery waits for this event (set at the end at the latest, so nothing hangs)."""
    event = threading.Event()
    yield event
    event.set()


def slow_factory(gate: threading.Event) -> Callable[[Config], Coordinator]:
    def factory(config: Config) -> Coordinator:
        assert gate.wait(60), "the test never let recovery finish"
        return Coordinator.from_config(config)

    return factory


def test_every_endpoint_but_healthz_answers_503_with_retry_after_while_recovering(
    serve: Serve, config_path: Path, gate: threading.Event
) -> None:
    server = serve(config_path, recovered=False, factory=slow_factory(gate))
    auth = {"Authorization": f"Bearer {TOKEN}"}
    health = httpx.get(f"{server.url}/healthz").json()
    assert health["status"] == "recovering"
    assert health["recovered"] is False
    for method, path in (
        ("GET", "/gpu/status"),
        ("GET", "/metrics"),
        ("GET", "/gpu/events"),
        ("GET", "/openapi.json"),
        ("POST", "/gpu/phase"),
        ("POST", "/gpu/release-all"),
    ):
        response = httpx.request(method, f"{server.url}{path}", headers=auth, json={"phase": "tts"})
        assert response.status_code == 503, path
        assert response.headers["retry-after"] == "1"
        assert response.json()["type"] == "urn:gpusm:recovering"
    gate.set()
    server.wait_recovered()
    assert httpx.get(f"{server.url}/gpu/status").json()["recovered"] is True


def test_client_waits_out_recovery_by_honouring_retry_after(
    serve: Serve, config_path: Path, gate: threading.Event
) -> None:
    server = serve(config_path, recovered=False, factory=slow_factory(gate))
    opened = threading.Timer(0.3, gate.set)
    opened.start()
    try:
        with Client(server.url, token=TOKEN, max_wait_s=30) as client:
            status = client.status()
    finally:
        opened.cancel()
    assert status.recovered is True


def test_client_gives_up_on_recovery_after_its_bounded_wait(
    serve: Serve, config_path: Path, gate: threading.Event
) -> None:
    server = serve(config_path, recovered=False, factory=slow_factory(gate))
    with (
        Client(server.url, token=TOKEN, retries=1, max_wait_s=5) as client,
        pytest.raises(GpusmError, match="recovering"),
    ):
        client.status()


def test_failed_recovery_is_reported_and_the_fatal_callback_runs(
    serve: Serve, config_path: Path, tmp_path: Path
) -> None:
    # Another coordinator owns the state directory: recovery cannot take the lock.
    lock = StateDirLock(tmp_path / "state")
    lock.acquire()
    on_fatal = mock.Mock()
    try:
        server = serve(config_path, recovered=False, on_fatal=on_fatal)
        with pytest.raises(GpusmError, match="recovery failed"):
            server.wait_recovered(timeout=30)
        health = httpx.get(f"{server.url}/healthz").json()
        assert health["status"] == "failed"
        assert "owned by coordinator pid" in health["error"]
        response = httpx.get(f"{server.url}/gpu/status")
        assert response.status_code == 503
        assert response.json()["type"] == "urn:gpusm:recovery-failed"
        assert "retry-after" not in response.headers
    finally:
        lock.release()
    on_fatal.assert_called_once()
    assert isinstance(on_fatal.call_args.args[0], CoordinatorBusy)


def test_stopping_while_recovering_waits_for_recovery_then_closes_the_coordinator(
    config_path: Path, gate: threading.Event
) -> None:
    from gpusm.config import load_config

    server = ThreadedServer(
        load_config(config_path), token=TOKEN, factory=slow_factory(gate)
    ).start()
    threading.Timer(0.2, gate.set).start()
    server.stop()
    assert server.state.coordinator is None
    assert server.state.phase == "stopping"
    # The coordinator released the state directory: another may open it.
    Coordinator.from_config(config_path).close()
