"""The fake model server: health while loading, stop behaviours, crashes and OOMs."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gpusm.gpu import SimGpu
from gpusm.gpu.fake_server import (
    EXIT_CRASHED,
    EXIT_OOM,
    EXIT_PORT,
    FakeServerOptions,
    run_fake_server,
)
from tests.gpu.sim_helpers import Spawner, free_port
from tests.support import eventually

Start = Callable[..., tuple[subprocess.Popen[str], int]]


def get(port: int, path: str = "/health") -> httpx.Response | None:
    """One GET, or None while nothing listens yet."""
    try:
        return httpx.get(f"http://127.0.0.1:{port}{path}", timeout=2.0, trust_env=False)
    except httpx.TransportError:
        return None


@pytest.fixture
def start(spawner: Spawner, sim_dir: Path, tmp_path: Path) -> Start:
    """Start ``gpusm sim service`` with the given flags; returns (process, port)."""

    def _start(vram_mib: int, *flags: str) -> tuple[subprocess.Popen[str], int]:
        port = free_port()
        log = (tmp_path / f"server-{port}.log").open("w")
        argv = [sys.executable, "-m", "gpusm", "sim", "service", "--sim-dir", str(sim_dir)]
        argv += ["--vram-mib", str(vram_mib), "--port", str(port), *flags]
        proc = spawner.popen(argv, stdout=log, stderr=subprocess.STDOUT)
        log.close()  # the child keeps its own descriptor
        return proc, port

    return _start


def wait_ready(proc: subprocess.Popen[str], port: int) -> dict[str, Any]:
    def ready() -> dict[str, Any] | None:
        assert proc.poll() is None, f"server exited with {proc.returncode}"
        response = get(port)
        return response.json() if response is not None and response.status_code == 200 else None

    return eventually(ready, timeout_s=20, what="the fake server to be ready")


def test_health_is_503_while_loading_then_200_with_all_memory_held(
    sim_dir: Path, start: Start
) -> None:
    sim = SimGpu(sim_dir, total_mib=1000, reclaim_lag_s=0.0)
    proc, port = start(400, "--load-s", "2")
    first = eventually(lambda: get(port), timeout_s=20, what="the server to listen")
    assert first.status_code == 503
    loading: list[int] = []
    while (response := get(port)) is not None and response.status_code == 503:
        assert response.json()["state"] == "loading"
        loading.append(response.json()["vram_mib"])
        time.sleep(0.05)
    assert response is not None
    assert response.status_code == 200
    assert loading == sorted(loading)
    assert all(v < 400 for v in loading)
    body = response.json()
    assert (body["state"], body["pid"], body["vram_mib"]) == ("ready", proc.pid, 400)
    assert sim.holders() == {proc.pid: 400}


def test_sigterm_stop_takes_stop_s_and_memory_returns_only_after_exit(
    sim_dir: Path, start: Start
) -> None:
    sim = SimGpu(sim_dir, total_mib=1000, reclaim_lag_s=0.3)
    proc, port = start(300, "--stop-s", "0.5")
    wait_ready(proc, port)
    asked = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    # The main loop notices the signal within a tick; health turns 503 while it stops.
    eventually(
        lambda: (r := get(port)) is not None and r.status_code == 503,
        what="health to say 503 while stopping",
    )
    assert proc.wait(timeout=15) == 0
    assert time.monotonic() - asked >= 0.5
    assert sim.snapshot().used_mib == 300  # the process is gone, the 'driver' lags
    eventually(lambda: sim.snapshot().used_mib == 0, what="memory to come back")


def test_ignores_sigterm_and_lives_until_sigkill(sim_dir: Path, start: Start) -> None:
    sim = SimGpu(sim_dir, total_mib=1000, reclaim_lag_s=0.0)
    proc, port = start(100, "--ignore-sigterm")
    wait_ready(proc, port)
    proc.send_signal(signal.SIGTERM)
    # Survival has to be watched for a while; half a second of answers is enough to show it.
    until = time.monotonic() + 0.5
    while time.monotonic() < until:
        response = get(port)
        assert response is not None
        assert response.status_code == 200
        time.sleep(0.05)
    assert proc.poll() is None
    proc.kill()
    assert proc.wait(timeout=10) == -signal.SIGKILL
    eventually(lambda: sim.snapshot().used_mib == 0, what="memory to come back")


def test_crash_after_exits_with_code_1_some_time_after_ready(sim_dir: Path, start: Start) -> None:
    SimGpu(sim_dir, total_mib=1000)
    proc, port = start(10, "--crash-after", "0.3")
    wait_ready(proc, port)
    assert proc.wait(timeout=15) == EXIT_CRASHED


def test_too_big_allocation_exits_3_and_the_sim_records_the_oom(
    sim_dir: Path, start: Start
) -> None:
    sim = SimGpu(sim_dir, total_mib=100)
    proc, _ = start(300)
    assert proc.wait(timeout=15) == EXIT_OOM
    [oom] = sim.ooms()
    assert oom["pid"] == proc.pid
    assert oom["requested_mib"] > oom["free_mib"]
    assert "service" in oom["cmdline"]


def test_grow_mib_adds_memory_after_ready(sim_dir: Path, start: Start) -> None:
    sim = SimGpu(sim_dir, total_mib=1000)
    proc, port = start(100, "--grow-mib", "50")
    wait_ready(proc, port)
    eventually(lambda: sim.holders() == {proc.pid: 150}, what="the service to grow")


def test_missing_sim_gpu_is_a_clear_error(tmp_path: Path, start: Start) -> None:
    proc, _ = start(10)
    assert proc.wait(timeout=15) == 2


# ---------------------------------------------------------------- in this process
@pytest.fixture
def own_signals() -> Iterator[None]:
    """run_fake_server installs SIGTERM/SIGINT handlers here; put pytest's back afterwards."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


@pytest.mark.usefixtures("own_signals")
def test_serves_info_and_404_then_crashes_as_asked(sim_dir: Path) -> None:
    sim = SimGpu(sim_dir, total_mib=1000)
    port = free_port()
    seen: dict[str, Any] = {}

    def probe() -> None:
        seen["ready"] = eventually(
            lambda: (r := get(port)) is not None and r.status_code == 200 and r, what="ready"
        )
        seen["info"] = get(port, "/info")
        seen["root"] = get(port, "/?x=1")
        seen["missing"] = get(port, "/nope")

    prober = threading.Thread(target=probe)
    prober.start()
    options = FakeServerOptions(vram_mib=64, port=port, sim_dir=sim_dir, crash_after=2.0)
    assert run_fake_server(options, sim) == EXIT_CRASHED
    prober.join(timeout=10)
    info = seen["info"].json()
    assert (info["state"], info["vram_mib"], info["options"]["port"]) == ("ready", 64, port)
    assert seen["root"].status_code == 200
    assert seen["missing"].status_code == 404
    sim.release()


@pytest.mark.usefixtures("own_signals")
def test_port_already_in_use_exits_4(sim_dir: Path) -> None:
    sim = SimGpu(sim_dir, total_mib=1000)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        options = FakeServerOptions(vram_mib=10, port=port, sim_dir=sim_dir)
        assert run_fake_server(options, sim) == EXIT_PORT
    assert sim.snapshot().used_mib == 0


@pytest.mark.usefixtures("own_signals")
def test_oom_while_growing_exits_3(sim_dir: Path) -> None:
    sim = SimGpu(sim_dir, total_mib=100)
    options = FakeServerOptions(vram_mib=0, port=free_port(), sim_dir=sim_dir, grow_mib=200)
    assert run_fake_server(options, sim) == EXIT_OOM
    assert sim.ooms()[0]["requested_mib"] == 200
