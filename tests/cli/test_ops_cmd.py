"""``gpusm status/phase/start/stop/reset/release/plan/doctor``: in-process and via a daemon."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml
from typer.testing import CliRunner, Result

from gpusm import Coordinator
from gpusm.api.threaded import ThreadedServer
from gpusm.cli.ops_cmd import register
from gpusm.config import load_config
from tests.support import eventually
from tests.support.ports import free_port

TOKEN = "cli-test-token"
# name: (vram MiB, priority)
SERVICES = {"small": (4096, 40), "big": (20480, 100), "huge": (18432, 10)}


def write_config(tmp_path: Path, **overrides: Any) -> Path:
    """Three fake model servers on a simulated 24 GiB GPU; the API on a free port."""
    services = {}
    for name, (vram, prio) in SERVICES.items():
        port = free_port()
        command = [sys.executable, "-m", "gpusm", "sim", "service", "--vram-mib", str(vram)]
        services[name] = {
            "command": [*command, "--port", str(port), "--load-s", "0.1", "--stop-s", "0.02"],
            "vram_mib": vram,
            "priority": prio,
            "health": {"http": f"http://127.0.0.1:{port}/health", "timeout_s": 20},
            "stop_timeout_s": 2,
        }
    doc: dict[str, Any] = {
        "state_dir": str(tmp_path / "state"),
        "gpu": {
            "backend": "sim",
            "reserve_mib": 0,
            "sim": {"total_mib": 24576, "reclaim_lag_s": 0},
        },
        "services": services,
        "phases": {"one": ["small"], "video": ["big"], "both": ["big", "huge"], "idle": []},
        "api": {"listen": f"127.0.0.1:{free_port()}"},
        **overrides,
    }
    path = tmp_path / "gpusm.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("GPUSM_TOKEN", raising=False)
    monkeypatch.delenv("GPUSM_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def config(tmp_path: Path) -> Iterator[Path]:
    """The config; at the end every service any command left running is stopped."""
    path = write_config(tmp_path)
    yield path
    Coordinator.from_config(path, monitor=False).close(stop_services=True)


@pytest.fixture
def app() -> typer.Typer:
    app = typer.Typer()
    register(app)
    return app


@pytest.fixture
def daemon(config: Path) -> Iterator[ThreadedServer]:
    """A daemon (in this process) on the config's api.listen address."""
    cfg = load_config(config)
    host, _, port = cfg.api.listen.rpartition(":")
    server = ThreadedServer(cfg, host=host, port=int(port), token=TOKEN)
    server.start()
    server.wait_recovered()
    yield server
    server.stop()


def run(app: typer.Typer, config: Path, *args: str, **env: str) -> Result:
    return CliRunner(env={"COLUMNS": "200", **env}).invoke(app, [*args, "-c", str(config)])


def states(config: Path) -> dict[str, str]:
    with Coordinator.from_config(config, monitor=False) as coordinator:
        return {s.name: s.state for s in coordinator.status().services}


# ---------------------------------------------------------------- in-process
def test_status_without_daemon_runs_in_process_and_prints_json(
    app: typer.Typer, config: Path
) -> None:
    result = run(app, config, "status", "--json")
    assert result.exit_code == 0, result.output
    assert "no daemon at http://127.0.0.1:" in result.stderr
    assert "running in-process" in result.stderr
    status = json.loads(result.stdout)
    assert status["recovered"] is True
    assert {s["name"] for s in status["services"]} == set(SERVICES)


def test_status_table_and_bounded_watch(app: typer.Typer, config: Path) -> None:
    table = run(app, config, "status")
    assert table.exit_code == 0
    assert "small" in table.stdout
    assert "24576 MiB" in table.stdout
    assert "leases: none" in table.stdout
    watched = run(app, config, "status", "--watch", "--count", "2", "--interval", "0.05")
    assert watched.exit_code == 0
    assert "huge" in watched.stdout


def test_in_process_phase_leaves_services_running_for_the_next_command(
    app: typer.Typer, config: Path
) -> None:
    result = run(app, config, "phase", "one", "--client", "w1", "--timeout", "30")
    assert result.exit_code == 0, result.output
    assert "phase one ready for client w1" in result.stdout
    assert "started: small" in result.stdout
    assert "services keep running after this command" in result.stderr
    assert states(config)["small"] == "healthy"
    stopped = run(app, config, "stop", "small")
    assert stopped.exit_code == 0, stopped.output
    assert states(config)["small"] == "stopped"


def test_phase_json_and_progress_view_on_a_terminal(
    app: typer.Typer, config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("gpusm.cli.ops_cmd.is_tty", lambda: True)
    result = run(app, config, "phase", "video", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout[result.stdout.index("{") :])["started"] == ["big"]


def test_unknown_names_exit_2_with_the_known_ones(app: typer.Typer, config: Path) -> None:
    for args in (("phase", "nope"), ("start", "nope"), ("stop", "nope"), ("plan", "nope")):
        result = run(app, config, *args)
        assert result.exit_code == 2, args
        assert "unknown" in result.stderr
        assert "Traceback" not in result.output


@pytest.mark.parametrize("tty", [False, True])
def test_a_phase_that_cannot_fit_exits_1_with_the_numbers(
    app: typer.Typer, config: Path, monkeypatch: pytest.MonkeyPatch, tty: bool
) -> None:
    monkeypatch.setattr("gpusm.cli.ops_cmd.is_tty", lambda: tty)
    result = run(app, config, "phase", "both", "--timeout", "0.5")
    assert result.exit_code == 1
    assert "need 38912 MiB" in result.stderr
    assert "Traceback" not in result.output


def test_start_reset_and_release(app: typer.Typer, config: Path) -> None:
    assert run(app, config, "start", "small", "--timeout", "30").exit_code == 0
    assert states(config)["small"] == "healthy"
    reset = run(app, config, "reset", "small")
    assert reset.exit_code == 0
    assert "may start again" in reset.stdout
    client = run(app, config, "release", "--client", "w1")
    assert client.exit_code == 0
    assert "released the lease of client w1" in client.stdout
    everything = run(app, config, "release", "--all")
    assert everything.exit_code == 0, everything.output
    assert "stopped small" in everything.stdout
    assert states(config)["small"] == "stopped"
    both = run(app, config, "release", "--all", "--client", "x")
    assert both.exit_code == 2


def test_plan_is_a_dry_run(app: typer.Typer, config: Path) -> None:
    table = run(app, config, "plan", "video")
    assert table.exit_code == 0
    assert "phase video fits" in table.stdout
    assert "would start: big" in table.stdout
    result = run(app, config, "plan", "both", "--json")
    plan = json.loads(result.stdout)
    assert plan["fits"] is False
    assert set(states(config).values()) == {"stopped"}


# ---------------------------------------------------------------- via a daemon
def test_commands_go_through_a_running_daemon(
    app: typer.Typer, config: Path, daemon: ThreadedServer
) -> None:
    status = run(app, config, "status", "--json", GPUSM_TOKEN=TOKEN)
    assert status.exit_code == 0
    assert f"via daemon at {daemon.url}" in status.stderr
    phase = run(app, config, "phase", "one", "--client", "w9", GPUSM_TOKEN=TOKEN)
    assert phase.exit_code == 0, phase.output
    coordinator = daemon.state.coordinator
    assert coordinator is not None
    assert coordinator.status().leases == {"w9": "one"}
    plan = run(app, config, "plan", "video", GPUSM_TOKEN=TOKEN)
    assert "would start: big" in plan.stdout
    refused = run(app, config, "release", "--all", GPUSM_TOKEN="wrong")
    assert refused.exit_code == 1
    assert "bearer token" in refused.stderr
    released = run(app, config, "release", "--all", GPUSM_TOKEN=TOKEN)
    assert released.exit_code == 0
    assert {s.state for s in coordinator.status().services} == {"stopped"}


def test_subprocess_status_json_in_process_and_via_daemon(config: Path) -> None:
    command = [sys.executable, "-m", "gpusm", "status", "--json", "-c", str(config)]
    alone = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert alone.returncode == 0, alone.stderr
    assert "running in-process" in alone.stderr
    assert json.loads(alone.stdout)["recovered"] is True
    cfg = load_config(config)
    host, _, port = cfg.api.listen.rpartition(":")
    with ThreadedServer(cfg, host=host, port=int(port), token=TOKEN) as server:
        server.wait_recovered()
        via = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert via.returncode == 0, via.stderr
    assert f"via daemon at {server.url}" in via.stderr
    assert {s["name"] for s in json.loads(via.stdout)["services"]} == set(SERVICES)


def test_status_via_a_daemon_shows_one_line_per_webhook(app: typer.Typer, tmp_path: Path) -> None:
    (tmp_path / "hook.secret").write_bytes(b"hook-secret")
    url = f"http://127.0.0.1:{free_port()}/hook"  # nobody listens: every delivery fails
    hook = {"name": "ops", "url": url, "secret_file": "hook.secret", "min_backoff_s": 0.05}
    path = write_config(tmp_path, notify=[hook])
    cfg = load_config(path)
    host, _, port = cfg.api.listen.rpartition(":")
    with ThreadedServer(cfg, host=host, port=int(port), token=TOKEN) as server:
        server.wait_recovered()
        eventually(lambda: server.state.webhooks()[0].consecutive_failures, 20, "a failure")
        table = run(app, path, "status", GPUSM_TOKEN=TOKEN)
        as_json = run(app, path, "status", "--json", GPUSM_TOKEN=TOKEN)
    assert table.exit_code == 0, table.output
    assert re.search(r"^ *webhook +url +pending +failures in a row +last error", table.stdout, re.M)
    line = re.escape(url) + r" +[1-9]\d* +[1-9]\d* +cannot reach the receiver"
    assert re.search(rf"^ *ops +{line}", table.stdout, re.M), table.stdout
    assert [w["name"] for w in json.loads(as_json.stdout)["webhooks"]] == ["ops"]
    # In-process there are no deliveries to show.
    alone = run(app, path, "status")
    assert "running in-process" in alone.stderr
    assert "webhook" not in alone.stdout


# ---------------------------------------------------------------- doctor
def test_doctor_passes_on_a_fresh_sim_setup(app: typer.Typer, config: Path) -> None:
    result = run(app, config, "doctor")
    assert result.exit_code == 0, result.output
    for what in ("config", "GPU", "Docker", "database", "API", "token"):
        assert f"✓ {what}:" in result.stdout
    assert "not needed" in result.stdout


def test_doctor_sees_a_running_daemon_and_its_token(
    app: typer.Typer, config: Path, daemon: ThreadedServer
) -> None:
    result = run(app, config, "doctor")
    assert result.exit_code == 1
    assert "✓ API: daemon answering" in result.stdout
    assert "✗ token" in result.stdout
    assert "export GPUSM_TOKEN" in result.stdout
    with_env = run(app, config, "doctor", GPUSM_TOKEN=TOKEN)
    assert with_env.exit_code == 0, with_env.output
    assert "✓ database:" in with_env.stdout


def test_doctor_names_each_problem_and_its_fix(
    app: typer.Typer, tmp_path: Path, config: Path
) -> None:
    docker = {
        "image": "busybox",
        "vram_mib": 100,
        "runtime": "docker",
        "health": {"tcp": "127.0.0.1:1"},
    }
    other = tmp_path / "other"
    other.mkdir()
    broken = write_config(other, gpu={"backend": "nvml"}, services={"box": docker}, phases={})
    token = load_config(broken).token_path
    token.parent.mkdir(parents=True)
    token.write_text("secret")
    token.chmod(0o644)
    db = load_config(broken).state_dir / "gpusm.db"
    db.write_text("not a database")
    listen = load_config(broken).api.listen.rpartition(":")
    with socket.socket() as squatter:
        squatter.bind((listen[0], int(listen[2])))
        squatter.listen(1)
        result = run(app, broken, "doctor", DOCKER_HOST="unix:///nonexistent/docker.sock")
    assert result.exit_code == 1
    out = result.stdout
    for what in ("GPU", "Docker", "database", "API", "token"):
        assert f"✗ {what}:" in out, what
    assert "gpu.backend: sim" in out
    assert "chmod 600" in out
    assert "gpusm db upgrade" in out
    bad = tmp_path / "bad.yaml"
    bad.write_text("services: [\n")
    config_error = run(app, bad, "doctor")
    assert config_error.exit_code == 1
    assert "✗ config:" in config_error.stdout
    assert os.environ.get("GPUSM_TOKEN") is None


def parkable(config: Path) -> Path:
    """The config with ``small`` parkable through the vLLM preset (the fake speaks it)."""
    doc = yaml.safe_load(config.read_text())
    doc["services"]["small"]["park"] = {"preset": "vllm", "residual_mib": 256}
    config.write_text(yaml.safe_dump(doc))
    return config


def test_park_in_process_parks_and_the_next_command_finds_it_parked(
    app: typer.Typer, config: Path
) -> None:
    parkable(config)
    assert run(app, config, "phase", "one", "--client", "w1").exit_code == 0
    result = run(app, config, "park", "small")
    assert result.exit_code == 0, result.output
    assert "service small is parked" in result.stdout
    assert states(config)["small"] == "parked"
    refused = run(app, config, "park", "big")
    assert refused.exit_code == 1
    assert "'big' cannot park: its config has no park:" in refused.output


def test_park_goes_through_a_running_daemon(app: typer.Typer, config: Path) -> None:
    cfg = load_config(parkable(config))
    host, _, port = cfg.api.listen.rpartition(":")
    server = ThreadedServer(cfg, host=host, port=int(port), token=TOKEN)
    server.start()
    try:
        server.wait_recovered()
        assert run(app, config, "phase", "one", "--client", "w1", GPUSM_TOKEN=TOKEN).exit_code == 0
        parked = run(app, config, "park", "small", GPUSM_TOKEN=TOKEN)
        assert parked.exit_code == 0, parked.output
        assert "via daemon" in parked.stderr
        assert "service small is parked" in parked.stdout
        refused = run(app, config, "park", "big", GPUSM_TOKEN=TOKEN)
        assert refused.exit_code == 1
        assert "'big' cannot park: its config has no park:" in refused.output
        status = json.loads(run(app, config, "status", "--json", GPUSM_TOKEN=TOKEN).stdout)
        assert {s["name"]: s["state"] for s in status["services"]}["small"] == "parked"
    finally:
        server.stop()
