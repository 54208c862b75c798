"""``gpusm serve``: token, bind, background recovery, graceful stop, and clear failures."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import typer
import yaml
from typer.testing import CliRunner, Result

from gpusm import Coordinator
from gpusm.cli.serve_cmd import register
from gpusm.client import Client
from gpusm.lock import StateDirLock
from tests.support import eventually
from tests.support.ports import free_port


def write_config(tmp_path: Path) -> tuple[Path, str]:
    """One fake model server on a simulated GPU; returns the file and the API's URL."""
    port, api = free_port(), free_port()
    command = [sys.executable, "-m", "gpusm", "sim", "service", "--vram-mib", "1024"]
    doc: dict[str, Any] = {
        "state_dir": str(tmp_path / "state"),
        "gpu": {"backend": "sim", "reserve_mib": 0, "sim": {"total_mib": 8192, "reclaim_lag_s": 0}},
        "services": {
            "tts": {
                "command": [*command, "--port", str(port), "--load-s", "0.1"],
                "vram_mib": 1024,
                "health": {"http": f"http://127.0.0.1:{port}/health", "timeout_s": 20},
                "stop_timeout_s": 2,
            }
        },
        "phases": {"speak": ["tts"]},
        "api": {"listen": f"127.0.0.1:{api}"},
    }
    path = tmp_path / "gpusm.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path, f"http://127.0.0.1:{api}"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("GPUSM_TOKEN", raising=False)
    monkeypatch.delenv("GPUSM_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def config(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """The config and URL; at the end every service left running is stopped."""
    path, url = write_config(tmp_path)
    yield path, url
    Coordinator.from_config(path, monitor=False).close(stop_services=True)


@pytest.fixture
def app() -> typer.Typer:
    app = typer.Typer()
    register(app)

    @app.callback()
    def main() -> None:
        """Force a command group so `serve` is named on the command line."""

    return app


def wait_healthy(url: str, timeout: float = 60.0) -> dict[str, Any]:
    def healthy() -> dict[str, Any] | None:
        try:
            found: dict[str, Any] = httpx.get(f"{url}/healthz", timeout=1).json()
        except httpx.HTTPError:
            return None
        return found if found["status"] == "ok" else None

    return eventually(healthy, timeout, f"a healthy daemon at {url}")


def serve_in_process(app: typer.Typer, args: list[str], then: Any = None) -> Result:
    """Run `serve` in this (main) thread; ``then`` runs in a helper thread meanwhile."""
    helper = threading.Thread(target=then) if then is not None else None
    if helper is not None:
        helper.start()
    try:
        return CliRunner().invoke(app, ["serve", *args])
    finally:
        if helper is not None:
            helper.join(60)


def test_serve_creates_a_private_token_serves_and_stops_on_sigterm(
    app: typer.Typer, config: tuple[Path, str]
) -> None:
    path, url = config
    seen: dict[str, Any] = {}

    def use_then_stop() -> None:
        # Only once the daemon answered are uvicorn's signal handlers surely installed.
        seen["health"] = wait_healthy(url)
        try:
            token = (path.parent / "state" / "api-token").read_text().strip()
            with Client(url, token=token) as client:
                seen["phase"] = client.enter_phase("speak", client="w")
        finally:
            # uvicorn handles SIGTERM: a graceful shutdown, then serve returns.
            os.kill(os.getpid(), signal.SIGTERM)

    result = serve_in_process(app, ["-c", str(path)], then=use_then_stop)
    assert result.exit_code == 0, result.output
    assert f"gpusm serving on {url}" in result.stdout
    assert "gpusm stopped" in result.stdout
    assert seen["health"]["recovered"] is True
    assert seen["phase"].started == ("tts",)
    token_file = path.parent / "state" / "api-token"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600


def test_failed_recovery_exits_1_with_the_reason(
    app: typer.Typer, config: tuple[Path, str]
) -> None:
    path, _ = config
    lock = StateDirLock(path.parent / "state")
    lock.acquire()
    try:
        result = serve_in_process(app, ["-c", str(path)])
    finally:
        lock.release()
    assert result.exit_code == 1
    assert "owned by coordinator pid" in result.stderr
    assert "Traceback" not in result.output


def test_bad_input_exits_2_and_a_taken_port_exits_1(
    app: typer.Typer, config: tuple[Path, str]
) -> None:
    path, url = config
    bad_listen = serve_in_process(app, ["-c", str(path), "--listen", "nonsense"])
    assert bad_listen.exit_code == 2
    assert "is not HOST:PORT" in bad_listen.stderr
    bad_level = serve_in_process(app, ["-c", str(path), "--log-level", "loud"])
    assert bad_level.exit_code == 2
    port = int(url.rpartition(":")[2])
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", port))
        squatter.listen(1)
        taken = serve_in_process(app, ["-c", str(path)])
    assert taken.exit_code == 1
    assert f"port {port} on 127.0.0.1 is in use" in taken.stderr


def run_daemon(path: Path, *args: str, token: str = "t0ken") -> subprocess.Popen[bytes]:
    env = {**os.environ, "GPUSM_TOKEN": token}
    return subprocess.Popen(
        [sys.executable, "-m", "gpusm", "serve", "-c", str(path), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
    )


def stop_daemon(proc: subprocess.Popen[bytes]) -> tuple[int, str]:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate(timeout=10)
    return proc.returncode, out.decode()


def test_daemon_subprocess_leaves_services_for_the_next_one_which_adopts_them(
    config: tuple[Path, str],
) -> None:
    path, url = config
    first = run_daemon(path)
    try:
        wait_healthy(url)
        with Client(url, token="t0ken") as client:
            client.enter_phase("speak", client="w")
            pid = client.status().services[0].pid
    finally:
        code, out = stop_daemon(first)
    assert code == 0, out
    assert pid is not None
    assert psutil.pid_exists(pid), "services outlive the daemon"
    second = run_daemon(path, "--stop-on-exit")
    try:
        wait_healthy(url)
        with Client(url, token="t0ken") as client:
            (tts,) = client.status().services
            kinds = [e.type for e in client.events()]
    finally:
        code, out = stop_daemon(second)
    assert code == 0, out
    assert tts.state == "healthy"
    assert tts.pid == pid
    assert "Adopted" in kinds
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
