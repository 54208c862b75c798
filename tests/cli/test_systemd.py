"""``gpusm systemd-unit`` and the notify protocol ``gpusm serve`` speaks under systemd."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from gpusm.cli import sd_notify
from gpusm.cli.systemd_cmd import gpusm_command, unit_text
from gpusm.config import load_config
from tests.support.ports import free_port

ROOT = Path(__file__).resolve().parents[2]
GPUSM = ROOT / ".venv" / "bin" / "gpusm"


def write_config(folder: Path, *, docker: bool = False, state_dir: str | None = None) -> Path:
    """A sim-GPU config with one native service (and a docker one if asked)."""
    port, api = free_port(), free_port()
    services: dict[str, Any] = {
        "tts": {
            # {python}, not a path: a checkout under /home must not change the unit.
            "command": ["{python}", "-m", "gpusm", "sim", "service", "--port", str(port)],
            "cwd": str(folder / "tts"),
            "vram_mib": 1024,
            "health": {"http": f"http://127.0.0.1:{port}/health", "timeout_s": 20},
            "stop_timeout_s": 2,
        }
    }
    if docker:
        services["llm"] = {
            "runtime": "docker",
            "image": "ollama/ollama",
            "vram_mib": 4096,
            "health": {"tcp": "127.0.0.1:11434", "timeout_s": 100},
        }
    doc = {
        "state_dir": state_dir or str(folder / "state"),
        "gpu": {"backend": "sim", "reserve_mib": 0, "sim": {"total_mib": 8192}},
        "services": services,
        "phases": {"speak": ["tts"]},
        "api": {"listen": f"127.0.0.1:{api}"},
    }
    path = folder / "gpusm.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def settings(unit: str) -> dict[str, list[str]]:
    """The unit's KEY=VALUE lines (comments and sections left out), values per key."""
    found: dict[str, list[str]] = {}
    for line in unit.splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key, []).append(value)
    return found


def unit_for(config: Path, *, user: bool = False) -> str:
    return unit_text(load_config(config), config, user=user, command=gpusm_command())


# ---------------------------------------------------------------- the unit
def test_system_unit_notifies_and_leaves_services_running_on_stop(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    unit = unit_for(config)
    got = settings(unit)
    assert got["Type"] == ["notify"]
    assert got["NotifyAccess"] == ["main"]
    assert got["ExecStart"] == [f"{GPUSM} serve -c {config}"]
    assert got["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert got["KillMode"] == ["process"]
    assert got["Restart"] == ["on-failure"]
    assert got["RestartSec"] == ["2"]
    assert got["TimeoutStopSec"] == ["30"]
    assert int(got["TimeoutStartSec"][0]) >= 90
    assert got["NoNewPrivileges"] == ["yes"]
    assert got["ProtectSystem"] == ["full"]
    # The state folder (database, logs, sim GPU, token) and the service's cwd stay writable.
    assert got["ReadWritePaths"] == [f"-{tmp_path / 'state'} -{tmp_path / 'tts'}"]
    assert got["After"] == ["network.target"]
    assert "Wants" not in got
    assert got["WantedBy"] == ["multi-user.target"]
    # It would hide /dev/nvidia*.
    assert "PrivateDevices" not in got
    assert "KillMode=process" in unit.split("# Stop and restart", 1)[1]


def test_docker_services_order_the_unit_after_the_engine(tmp_path: Path) -> None:
    got = settings(unit_for(write_config(tmp_path, docker=True)))
    assert got["After"] == ["network.target docker.service"]
    assert got["Wants"] == ["docker.service"]
    # Recovery may wait for each service's health in turn before READY=1.
    assert int(got["TimeoutStartSec"][0]) >= 20 + 100


def test_protect_home_is_left_out_when_the_state_lives_in_a_home(tmp_path: Path) -> None:
    assert settings(unit_for(write_config(tmp_path)))["ProtectHome"] == ["read-only"]
    home = write_config(tmp_path, state_dir="/home/gpusm-test/state")
    unit = unit_for(home)
    assert "ProtectHome" not in settings(unit)
    assert "# No ProtectHome=: /home/gpusm-test/state is under a home directory." in unit


def test_user_unit_wants_default_target_and_no_system_sandbox(tmp_path: Path) -> None:
    got = settings(unit_for(write_config(tmp_path, docker=True), user=True))
    assert got["WantedBy"] == ["default.target"]
    assert got["Type"] == ["notify"]
    assert got["KillMode"] == ["process"]
    assert got["NoNewPrivileges"] == ["yes"]
    for absent in ("ProtectSystem", "ProtectHome", "ReadWritePaths", "After", "Wants"):
        assert absent not in got, absent


def test_odd_characters_in_paths_are_quoted_for_systemd(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    odd = tmp_path / "my 100% $config.yaml"
    odd.write_text(config.read_text())
    command = ["/opt/gpusm env/bin/gpusm"]
    got = settings(unit_text(load_config(odd), odd, user=False, command=command))
    quoted = str(odd).replace("%", "%%").replace("$", "$$")
    assert got["ExecStart"] == [f'"/opt/gpusm env/bin/gpusm" serve -c "{quoted}"']


def test_the_command_prints_a_unit_for_the_absolute_config_path(tmp_path: Path) -> None:
    write_config(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "GPUSM_CONFIG"}
    result = subprocess.run(
        [str(GPUSM), "systemd-unit", "-c", "gpusm.yaml"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert settings(result.stdout)["ExecStart"] == [f"{GPUSM} serve -c {tmp_path / 'gpusm.yaml'}"]
    user = subprocess.run(
        [str(GPUSM), "systemd-unit", "--user"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert user.returncode == 0, user.stderr
    assert settings(user.stdout)["WantedBy"] == ["default.target"]


def _systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI needs systemd-analyze: apt-get install systemd (.ci/run does)")
        pytest.skip("systemd-analyze is missing: apt-get install systemd")
    return found


@pytest.mark.parametrize("user", [False, True], ids=["system", "user"])
def test_systemd_analyze_verify_finds_nothing_wrong(tmp_path: Path, user: bool) -> None:
    analyze = _systemd_analyze()
    unit = tmp_path / "gpusm.service"
    unit.write_text(unit_for(write_config(tmp_path, docker=True), user=user))
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    scope = ["--user"] if user else []
    result = subprocess.run(
        [analyze, *scope, "verify", "--man=no", str(unit)],
        # The user manager needs a runtime folder even to verify.
        env={**os.environ, "XDG_RUNTIME_DIR": str(runtime)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # verify exits 0 on some errors (a bad KillMode=, say) and only prints them.
    printed = result.stdout + result.stderr
    assert "gpusm.service" not in printed, printed
    assert result.returncode == 0, printed


# ---------------------------------------------------------------- the protocol
@pytest.fixture
def notify_socket() -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket listening where systemd's would (a short path: sun_path is small)."""
    folder = tempfile.mkdtemp(prefix="gpusm-sd-")
    path = os.path.join(folder, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(60)
    try:
        yield sock, path
    finally:
        sock.close()
        shutil.rmtree(folder, ignore_errors=True)


def receive(sock: socket.socket) -> list[str]:
    return sock.recv(4096).decode().split("\n")


def test_notify_is_a_no_op_without_a_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.setattr(sd_notify, "_claimed", None)
    assert not sd_notify.enabled()
    assert sd_notify.ready("up") is False
    assert sd_notify.claim() is False


def test_notify_sends_to_a_path_socket_and_claim_hides_it_from_children(
    notify_socket: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sock, path = notify_socket
    monkeypatch.setattr(sd_notify, "_claimed", None)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    assert sd_notify.claim() is True
    assert "NOTIFY_SOCKET" not in os.environ
    assert sd_notify.ready("recovered;\nserving") is True
    assert receive(sock) == ["READY=1", "STATUS=recovered; serving"]
    with sd_notify.reloading():
        assert receive(sock)[0] == "RELOADING=1"
    assert receive(sock) == ["READY=1"]
    assert sd_notify.stopping() is True
    assert receive(sock) == ["STOPPING=1"]


def test_reloading_sends_the_monotonic_time_and_ready_even_on_error(
    notify_socket: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sock, path = notify_socket
    monkeypatch.setattr(sd_notify, "_claimed", path)
    seen: list[str] = []

    def reload_that_fails() -> None:
        with sd_notify.reloading("old config kept"):
            seen.extend(receive(sock))
            raise ValueError("bad config")

    with pytest.raises(ValueError, match="bad config"):
        reload_that_fails()
    lines = seen
    assert lines[0] == "RELOADING=1"
    assert lines[1].startswith("MONOTONIC_USEC=")
    assert int(lines[1].partition("=")[2]) > 0
    assert receive(sock) == ["READY=1", "STATUS=old config kept"]


def test_notify_reaches_an_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"gpusm-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(10)
        monkeypatch.setattr(sd_notify, "_claimed", "@" + name)
        assert sd_notify.status("adopting") is True
        assert receive(sock) == ["STATUS=adopting"]


def test_a_vanished_socket_is_logged_not_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(sd_notify, "_claimed", str(tmp_path / "gone"))
    assert sd_notify.ready() is False
    assert "cannot notify systemd" in caplog.text


def _healthz(url: str) -> dict[str, Any]:
    found: dict[str, Any] = httpx.get(f"{url}/healthz", timeout=5).json()
    return found


@pytest.mark.slow
def test_serve_says_ready_after_recovery_and_stopping_on_sigterm(
    tmp_path: Path, notify_socket: tuple[socket.socket, str]
) -> None:
    sock, path = notify_socket
    config = write_config(tmp_path)
    url = "http://" + load_config(config).api.listen
    env = {k: v for k, v in os.environ.items() if k != "GPUSM_CONFIG"}
    env |= {"NOTIFY_SOCKET": path, "GPUSM_TOKEN": "t0ken"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "gpusm", "serve", "-c", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
    )
    try:
        ready = receive(sock)
        assert ready[0] == "READY=1", ready
        assert any(line.startswith("STATUS=recovered") for line in ready)
        # READY=1 means recovered and answering.
        health = _healthz(url)
        assert health["status"] == "ok"
        assert health["recovered"] is True
        # `systemctl reload`: the daemon reads its file again and keeps serving.
        proc.send_signal(signal.SIGHUP)
        assert receive(sock)[0] == "RELOADING=1"
        assert receive(sock)[0] == "READY=1"
        assert _healthz(url)["status"] == "ok"
        proc.send_signal(signal.SIGTERM)
        assert receive(sock)[0] == "STOPPING=1"
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
    assert proc.returncode == 0, out.decode()
    assert "config reloaded" in out.decode()
    assert "gpusm stopped" in out.decode()
