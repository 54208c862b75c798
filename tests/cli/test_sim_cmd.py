"""``gpusm sim …``: where the sim GPU comes from, status, create, reset, hog."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gpusm.cli.main import app
from gpusm.errors import SimOutOfMemory
from gpusm.gpu import SimGpu
from tests.support import eventually

runner = CliRunner()


@pytest.fixture(autouse=True)
def no_ambient_sim(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Nothing from the developer's shell or folder may choose the sim GPU."""
    monkeypatch.delenv("GPUSM_SIM_DIR", raising=False)
    monkeypatch.delenv("GPUSM_CONFIG", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[str]]]:
    """Processes a test starts; killed and reaped at teardown."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()


def invoke(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.output


# ---------------------------------------------------------------- create / where
def test_create_makes_a_sim_gpu_of_the_given_size(tmp_path: Path) -> None:
    code, out = invoke(
        "sim", "create", "--sim-dir", "g", "--total-mib", "2048", "--reclaim-lag-s", "0"
    )
    assert code == 0, out
    assert "2048 MiB" in out
    sim = SimGpu(tmp_path / "g")
    assert (sim.total_mib, sim.reclaim_lag_s) == (2048, 0.0)


def test_create_without_a_size_for_a_new_sim_says_how(tmp_path: Path) -> None:
    code, out = invoke("sim", "create", "--sim-dir", "g")
    assert code == 2
    assert "--total-mib N" in out


def test_create_refuses_to_shrink_below_use(tmp_path: Path) -> None:
    SimGpu(tmp_path / "g", total_mib=1000).allocate(500)
    code, out = invoke("sim", "create", "--sim-dir", "g", "--total-mib", "100")
    assert code == 2
    assert "500 MiB are in use" in out


def test_status_of_a_missing_sim_is_exit_2_with_the_fix() -> None:
    code, out = invoke("sim", "status", "--sim-dir", "nowhere")
    assert code == 2
    assert "no simulated GPU at nowhere" in out


def test_status_creates_a_new_sim_when_given_a_size(tmp_path: Path) -> None:
    code, out = invoke("sim", "status", "--json", "--sim-dir", "g", "--total-mib", "512")
    assert code == 0, out
    assert json.loads(out)["free_mib"] == 512


def test_env_var_names_the_sim_when_no_flag_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    SimGpu(tmp_path / "from-env", total_mib=111)
    SimGpu(tmp_path / "from-flag", total_mib=222)
    monkeypatch.setenv("GPUSM_SIM_DIR", str(tmp_path / "from-env"))
    assert json.loads(invoke("sim", "status", "--json")[1])["total_mib"] == 111
    assert (
        json.loads(invoke("sim", "status", "--json", "--sim-dir", "from-flag")[1])["total_mib"]
        == 222
    )


def test_config_names_the_sim_and_its_size_when_nothing_else_does(tmp_path: Path) -> None:
    (tmp_path / "gpusm.yaml").write_text(
        "state_dir: ./state\ngpu: {backend: sim, reserve_mib: 0, sim: {total_mib: 3000}}\n"
    )
    code, out = invoke("sim", "status", "--json")
    assert code == 0, out
    doc = json.loads(out)
    assert (doc["total_mib"], doc["dir"]) == (3000, str(tmp_path / "state" / "simgpu"))


def test_without_flag_env_or_config_it_says_what_to_give() -> None:
    code, out = invoke("sim", "status")
    assert code == 2
    assert "--sim-dir DIR" in out
    assert "GPUSM_SIM_DIR" in out


def test_bad_config_is_exit_2(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("gpu: {backend: cuda}\n")
    code, out = invoke("sim", "status", "-c", "bad.yaml")
    assert code == 2
    assert "gpu.backend" in out


def test_nonsense_size_is_exit_2() -> None:
    code, _ = invoke("sim", "create", "--sim-dir", "g", "--total-mib", "0")
    assert code == 2


# ---------------------------------------------------------------- status / reset
def test_status_lists_holders_lagging_memory_and_ooms(tmp_path: Path) -> None:
    sim = SimGpu(tmp_path / "g", total_mib=1000, reclaim_lag_s=60)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        sim.allocate(300, pid=child.pid)
    finally:
        child.kill()
        child.wait()
    sim.allocate(100)
    with pytest.raises(SimOutOfMemory):
        sim.allocate(900)

    code, out = invoke("sim", "status", "--sim-dir", "g")
    assert code == 0, out
    assert "used 400 MiB, free 600 MiB" in out
    assert "exited, not yet reclaimed" in out
    assert "OOMs: 1" in out
    assert f"pid {os.getpid()} asked 900 MiB, 600 MiB free" in out

    doc = json.loads(invoke("sim", "status", "--json", "--sim-dir", "g")[1])
    assert [(p["pid"], p["mib"], p["alive"]) for p in doc["processes"]] == [
        (child.pid, 300, False),
        (os.getpid(), 100, True),
    ]
    assert (doc["oom_count"], doc["ooms"][0]["requested_mib"]) == (1, 900)
    sim.release()


def test_reset_refuses_while_live_holders_exist_unless_forced(tmp_path: Path) -> None:
    sim = SimGpu(tmp_path / "g", total_mib=1000)
    sim.allocate(10)
    code, out = invoke("sim", "reset", "--sim-dir", "g")
    assert code == 1
    assert "--force" in out
    code, out = invoke("sim", "reset", "--sim-dir", "g", "--force")
    assert code == 0, out
    assert "dropped 1 allocation(s) and 0 OOM record(s)" in out
    assert sim.holders() == {}


# ---------------------------------------------------------------- real processes
def gpusm(*args: str) -> list[str]:
    return [sys.executable, "-m", "gpusm", *args]


def test_status_json_from_a_real_process(tmp_path: Path) -> None:
    SimGpu(tmp_path / "g", total_mib=4096).allocate(96)
    out = subprocess.run(
        gpusm("sim", "status", "--json", "--sim-dir", str(tmp_path / "g")),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    doc = json.loads(out)
    assert (doc["total_mib"], doc["used_mib"], doc["free_mib"]) == (4096, 96, 4000)
    SimGpu(tmp_path / "g").release()


def test_hog_holds_memory_until_sigterm_then_exits_cleanly(
    tmp_path: Path, procs: list[subprocess.Popen[str]]
) -> None:
    sim = SimGpu(tmp_path / "g", total_mib=1000, reclaim_lag_s=0)
    hog = subprocess.Popen(
        gpusm("sim", "hog", "--mib", "700", "--sim-dir", str(tmp_path / "g")),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    procs.append(hog)
    eventually(lambda: sim.holders() == {hog.pid: 700}, 20, "the hog to hold 700 MiB")
    hog.send_signal(signal.SIGTERM)
    assert hog.wait(timeout=15) == 0
    eventually(lambda: sim.snapshot().used_mib == 0, 20, "the memory to come back")


def test_hog_that_does_not_fit_exits_3(tmp_path: Path) -> None:
    sim = SimGpu(tmp_path / "g", total_mib=100)
    proc = subprocess.run(
        gpusm("sim", "hog", "--mib", "101", "--sim-dir", str(tmp_path / "g")),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 3
    assert "simulated OOM" in proc.stderr
    assert sim.ooms()[0]["requested_mib"] == 101


@pytest.fixture
def own_signals() -> Iterator[None]:
    """The service command installs SIGTERM/SIGINT handlers here; restore pytest's."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


@pytest.mark.usefixtures("own_signals")
def test_service_that_does_not_fit_exits_3_with_the_oom_recorded(tmp_path: Path) -> None:
    sim = SimGpu(tmp_path / "g", total_mib=100)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    code, out = invoke("sim", "service", "--sim-dir", "g", "--vram-mib", "400", "--port", port)
    assert code == 3, out
    assert sim.ooms()[0]["requested_mib"] == 100  # the first of four 100 MiB chunks fits


# ---------------------------------------------------------------- several devices
def test_create_several_devices_of_one_size_then_of_their_own_sizes(tmp_path: Path) -> None:
    code, out = invoke("sim", "create", "--sim-dir", "g", "--devices", "2", "--total-mib", "2048")
    assert code == 0, out
    assert "2 devices" in out
    dev0, dev1 = SimGpu.open_all(tmp_path / "g")
    assert (dev0.total_mib, dev1.total_mib) == (2048, 2048)
    assert f"device 1: 2048 MiB, uuid {dev1.uuid}" in out
    code, out = invoke("sim", "create", "--sim-dir", "g", "--total-mib", "2048,1024")
    assert code == 0, out
    assert [d.total_mib for d in SimGpu.open_all(tmp_path / "g")] == [2048, 1024]
    assert SimGpu.open_all(tmp_path / "g")[1].uuid == dev1.uuid
    code, out = invoke("sim", "create", "--sim-dir", "g", "--devices", "1")
    assert code == 0, out
    assert SimGpu.count(tmp_path / "g") == 1
    assert "uuid " + dev0.uuid in out


def test_create_refuses_sizes_that_do_not_match_the_devices() -> None:
    code, out = invoke("sim", "create", "--sim-dir", "g", "--devices", "3", "--total-mib", "1,2")
    assert code == 2
    assert "one per device" in out
    code, _ = invoke("sim", "create", "--sim-dir", "g", "--total-mib", "10,x")
    assert code == 2


def test_config_names_the_devices_and_their_sizes(tmp_path: Path) -> None:
    (tmp_path / "gpusm.yaml").write_text(
        "state_dir: ./state\ngpu: {backend: sim, sim: {devices: 2, total_mib: [3000, 1000]}}\n"
    )
    code, out = invoke("sim", "status", "--json")
    assert code == 0, out
    assert [(d["index"], d["total_mib"]) for d in json.loads(out)] == [(0, 3000), (1, 1000)]


def test_status_shows_one_row_per_device_and_json_a_list(tmp_path: Path) -> None:
    dev0, dev1 = SimGpu.open_all(tmp_path / "g", [1000, 500], reclaim_lag_s=60)
    dev1.allocate(200)
    with pytest.raises(SimOutOfMemory):
        dev1.allocate(400)
    code, out = invoke("sim", "status", "--sim-dir", "g")
    assert code == 0, out
    assert "2 devices" in out
    assert f"device 0: uuid {dev0.uuid}" in out
    assert f"device 1: uuid {dev1.uuid}" in out
    assert f"{os.getpid()}: 200" in out
    [oom] = [line for line in out.splitlines() if "asked 400 MiB, 300 MiB free" in line]
    assert oom.strip().startswith("device 1: ")
    docs = json.loads(invoke("sim", "status", "--json", "--sim-dir", "g")[1])
    assert [
        (d["index"], d["uuid"], d["used_mib"], d["free_mib"], d["oom_count"]) for d in docs
    ] == [
        (0, dev0.uuid, 0, 1000, 0),
        (1, dev1.uuid, 200, 300, 1),
    ]
    assert docs[1]["processes"][0]["pid"] == os.getpid()
    dev1.release()


def test_reset_covers_every_device_and_refuses_while_one_has_a_live_holder(
    tmp_path: Path,
) -> None:
    dev0, dev1 = SimGpu.open_all(tmp_path / "g", [100, 100])
    with pytest.raises(SimOutOfMemory):
        dev0.allocate(101)
    dev1.allocate(10)
    code, out = invoke("sim", "reset", "--sim-dir", "g")
    assert code == 1
    assert "device 1" in out
    assert "--force" in out
    assert len(dev0.ooms()) == 1  # all or nothing
    code, out = invoke("sim", "reset", "--sim-dir", "g", "--force")
    assert code == 0, out
    assert "dropped 1 allocation(s) and 1 OOM record(s) on 2 devices" in out
    assert (dev0.ooms(), dev1.holders()) == ([], {})


def test_hog_holds_on_the_device_it_is_given(
    tmp_path: Path, procs: list[subprocess.Popen[str]]
) -> None:
    dev0, dev1 = SimGpu.open_all(tmp_path / "g", 1000, devices=2, reclaim_lag_s=0)
    hog = subprocess.Popen(
        gpusm("sim", "hog", "--mib", "700", "--device", "1", "--sim-dir", str(tmp_path / "g")),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    procs.append(hog)
    eventually(lambda: dev1.holders() == {hog.pid: 700}, 20, "the hog to hold on device 1")
    assert dev0.snapshot().used_mib == 0
    hog.send_signal(signal.SIGTERM)
    assert hog.wait(timeout=15) == 0


def test_hog_on_a_missing_device_is_exit_2(tmp_path: Path) -> None:
    SimGpu.open_all(tmp_path / "g", 1000, devices=2)
    code, out = invoke("sim", "hog", "--mib", "1", "--device", "2", "--sim-dir", "g")
    assert code == 2
    assert "no such simulated device" in out
