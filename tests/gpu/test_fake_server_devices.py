"""The fake model server on several simulated devices: CUDA_VISIBLE_DEVICES picks them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from gpusm.errors import SimOutOfMemory
from gpusm.gpu.fake_park import allocate_each
from gpusm.gpu.fake_server import EXIT_DEVICE
from gpusm.gpu.sim import SimGpu
from tests.gpu.sim_helpers import Spawner, free_port
from tests.support import eventually


def serve(
    spawner: Spawner, sim_dir: Path, log: Path, visible: str, *flags: str
) -> tuple[subprocess.Popen[str], int]:
    port = free_port()
    argv = [sys.executable, "-m", "gpusm", "sim", "service", "--sim-dir", str(sim_dir)]
    argv += ["--vram-mib", "400", "--port", str(port), "--wake-s", "0", *flags]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": visible}
    with log.open("w") as out:
        proc = spawner.popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
    return proc, port


def ready_info(proc: subprocess.Popen[str], port: int) -> dict[str, Any]:
    def ready() -> dict[str, Any] | None:
        assert proc.poll() is None, f"server exited with {proc.returncode}"
        try:
            response = httpx.get(f"http://127.0.0.1:{port}/info", timeout=5, trust_env=False)
        except httpx.TransportError:
            return None
        body: dict[str, Any] = response.json()
        return body if body["state"] == "ready" else None

    info = eventually(ready, timeout_s=20, what="the fake server to be ready")
    assert info is not None
    return info


def test_the_device_named_by_uuid_is_the_only_one_holding(
    spawner: Spawner, sim_dir: Path, tmp_path: Path
) -> None:
    dev0, dev1 = SimGpu.open_all(sim_dir, 1000, devices=2, reclaim_lag_s=0.0)
    proc, port = serve(spawner, sim_dir, tmp_path / "log", dev1.uuid)
    info = ready_info(proc, port)
    assert info["devices"] == [{"index": 1, "uuid": dev1.uuid, "vram_mib": 400}]
    assert dev1.holders() == {proc.pid: 400}
    assert dev0.snapshot().used_mib == 0


def test_two_devices_each_hold_the_memory_and_parking_frees_both(
    spawner: Spawner, sim_dir: Path, tmp_path: Path
) -> None:
    dev0, dev1 = SimGpu.open_all(sim_dir, 1000, devices=2, reclaim_lag_s=0.0)
    proc, port = serve(spawner, sim_dir, tmp_path / "log", f"{dev0.uuid},1", "--residual-mib", "50")
    info = ready_info(proc, port)
    assert [(d["index"], d["vram_mib"]) for d in info["devices"]] == [(0, 400), (1, 400)]
    assert (dev0.holders(), dev1.holders()) == ({proc.pid: 400}, {proc.pid: 400})
    url = f"http://127.0.0.1:{port}"
    assert httpx.post(f"{url}/sleep?level=1", timeout=10, trust_env=False).status_code == 200
    assert (dev0.holders(), dev1.holders()) == ({proc.pid: 50}, {proc.pid: 50})
    assert httpx.post(f"{url}/wake_up", timeout=10, trust_env=False).status_code == 200
    assert (dev0.holders(), dev1.holders()) == ({proc.pid: 400}, {proc.pid: 400})


def test_a_device_the_sim_lacks_exits_with_its_own_code(
    spawner: Spawner, sim_dir: Path, tmp_path: Path
) -> None:
    SimGpu.open_all(sim_dir, 1000, devices=2)
    proc, _ = serve(spawner, sim_dir, tmp_path / "log", "0,2")
    assert proc.wait(timeout=30) == EXIT_DEVICE
    log = (tmp_path / "log").read_text()
    assert "CUDA_VISIBLE_DEVICES='0,2' names '2'" in log


def test_allocating_on_several_devices_is_all_or_nothing(sim_dir: Path) -> None:
    dev0, dev1 = SimGpu.open_all(sim_dir, [1000, 100])
    with pytest.raises(SimOutOfMemory):
        allocate_each([dev0, dev1], 300)
    assert (dev0.snapshot().used_mib, dev1.snapshot().used_mib) == (0, 0)
    allocate_each([dev0, dev1], 60)
    assert (dev0.holders(), dev1.holders()) == ({os.getpid(): 60}, {os.getpid(): 60})
    dev0.release()
    dev1.release()
