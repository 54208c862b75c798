"""Several simulated GPUs with real fake-server processes, through a real coordinator.

Where memory is checked on the simulated devices themselves (which pid holds what on
which device), and what each native process was told: its ``CUDA_VISIBLE_DEVICES``
read back from ``/proc/<pid>/environ``. The fake server allocates on the device(s) that
variable names, so a wrong placement would show as memory on the wrong device.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gpusm import Coordinator
from gpusm.errors import InsufficientVram
from gpusm.gpu.sim import SimGpu
from gpusm.ports import EventQuery
from tests.coordinator.invariants import wait_quiet
from tests.seed_helpers import fake_service, free_port, seed_config, write_config

Open = Callable[..., Coordinator]
DEVICE_MIB = 16384
LOAD_S = 0.1
# The seed pipeline's items and load times, on one and on two devices.
SEED_ITEMS = 2
SEED_LOAD_SCALE = 0.3
# Stops made to make room. Not DrainRequested: it also records the stops of the release
# phases (crawl and render release the GPU), which are no evictions and are more, not
# fewer, on two devices (more is still up when render releases).
EVICTIONS = ("Evicted", "Preempted")


def service(vram: int, priority: int = 10, **extra: Any) -> dict[str, Any]:
    """A fake model server taking ``vram`` MiB (``extra``: gpu, gpu_count, ...)."""
    return fake_service(vram, priority, LOAD_S, free_port(), **extra)


def multi_doc(
    tmp_path: Path,
    services: dict[str, dict[str, Any]],
    devices: int = 2,
    placement: str = "binpack",
) -> dict[str, Any]:
    """A config with ``devices`` simulated GPUs of DEVICE_MIB and one phase per service
    (``p<name>``)."""
    return {
        "state_dir": str(tmp_path / "state"),
        "gpu": {
            "backend": "sim",
            "reserve_mib": 0,
            "settle_timeout_s": 5,
            "placement": placement,
            "sim": {"devices": devices, "total_mib": DEVICE_MIB, "reclaim_lag_s": 0.05},
        },
        "services": services,
        "phases": {f"p{name}": [name] for name in services},
    }


def sims_of(coordinator: Coordinator) -> list[SimGpu]:
    """Every simulated device of ``coordinator``'s config, device 0 first."""
    return SimGpu.open_all(coordinator.config.sim_dir)


def pid_of(coordinator: Coordinator, name: str) -> int:
    pid = {s.name: s.pid for s in coordinator.status().services}[name]
    assert pid is not None, f"{name} has no pid"
    return pid


def held(sims: list[SimGpu], pid: int) -> list[int]:
    """What ``pid`` holds on each device (MiB), device 0 first."""
    return [sim.holders().get(pid, 0) for sim in sims]


def devices_of(coordinator: Coordinator, name: str) -> tuple[int, ...]:
    return {s.name: s.devices for s in coordinator.status().services}[name]


def environ(pid: int) -> dict[str, str]:
    """The environment process ``pid`` was started with."""
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    pairs = (entry.split(b"=", 1) for entry in raw.split(b"\0") if b"=" in entry)
    return {key.decode(): value.decode() for key, value in pairs}


def assert_sees(pid: int, sims: list[SimGpu], devices: tuple[int, ...]) -> None:
    """``pid`` was told exactly ``devices``, by UUID, in PCI bus order."""
    env = environ(pid)
    assert env.get("CUDA_VISIBLE_DEVICES") == ",".join(sims[d].uuid for d in devices), env
    assert env.get("CUDA_DEVICE_ORDER") == "PCI_BUS_ID", env


@pytest.fixture
def hog(tmp_path: Path) -> Iterator[Callable[[Path, int, int], None]]:
    """Starts ``gpusm sim hog`` processes (foreign memory) and ends them at the end."""
    started: list[subprocess.Popen[bytes]] = []

    def start(config: Path, device: int, mib: int) -> None:
        command = [sys.executable, "-m", "gpusm", "sim", "hog", "--mib", str(mib)]
        proc = subprocess.Popen(
            [*command, "--device", str(device), "-c", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        started.append(proc)
        sim = SimGpu.open_all(tmp_path / "state" / "simgpu")[device]
        deadline = time.monotonic() + 20
        while sim.holders().get(proc.pid) != mib:
            assert proc.poll() is None, proc.communicate()[1].decode()
            assert time.monotonic() < deadline, "the hog never allocated"
            time.sleep(0.05)

    yield start
    for proc in started:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=10)


@pytest.mark.parametrize(
    ("placement", "device"),
    [("binpack", 0), ("spread", 1)],
)
def test_binpack_joins_the_busy_device_and_spread_the_emptier_one(
    tmp_path: Path, open_coordinator: Open, placement: str, device: int
) -> None:
    doc = multi_doc(tmp_path, {"a": service(4096), "b": service(4096)}, placement=placement)
    coordinator = open_coordinator(write_config(tmp_path, doc))
    coordinator.ensure_service("a", client="wa", timeout=30)
    coordinator.ensure_service("b", client="wb", timeout=30)
    sims = sims_of(coordinator)
    a, b = pid_of(coordinator, "a"), pid_of(coordinator, "b")
    # Both empty at first: the lower index.
    assert devices_of(coordinator, "a") == (0,)
    assert held(sims, a) == [4096, 0]
    assert devices_of(coordinator, "b") == (device,)
    assert held(sims, b) == [4096 if d == device else 0 for d in range(2)]
    assert_sees(a, sims, (0,))
    assert_sees(b, sims, (device,))
    (started,) = coordinator.events(EventQuery(stream="b", types=["StartRequested"]))
    assert started.data["devices"] == [device]
    used = {d.index: d.used_mib for d in coordinator.status().devices}
    assert used == ({0: 8192, 1: 0} if device == 0 else {0: 4096, 1: 4096})


def test_a_foreign_hog_steers_a_new_service_to_the_other_device(
    tmp_path: Path, open_coordinator: Open, hog: Callable[[Path, int, int], None]
) -> None:
    config = write_config(tmp_path, multi_doc(tmp_path, {"a": service(8192)}))
    coordinator = open_coordinator(config)
    hog(config, 0, 12000)
    plan = coordinator.plan_phase("pa", client="w")
    assert plan.devices == {"a": (1,)}, plan.placement
    coordinator.ensure_service("a", client="w", timeout=30)
    sims = sims_of(coordinator)
    assert devices_of(coordinator, "a") == (1,)
    assert held(sims, pid_of(coordinator, "a")) == [0, 8192]
    assert_sees(pid_of(coordinator, "a"), sims, (1,))
    foreign = {d.index: d.foreign_mib for d in coordinator.status().devices}
    assert foreign == {0: 12000, 1: 0}


def test_a_pinned_service_is_refused_rather_than_spilled(
    tmp_path: Path, open_coordinator: Open, hog: Callable[[Path, int, int], None]
) -> None:
    config = write_config(tmp_path, multi_doc(tmp_path, {"pinned": service(8192, gpu=0)}))
    coordinator = open_coordinator(config)
    hog(config, 0, 12000)
    with pytest.raises(InsufficientVram):
        coordinator.ensure_service("pinned", client="w", timeout=1)
    sims = sims_of(coordinator)
    assert sims[1].holders() == {}  # not spilled to device 1
    assert {s.name: s.state for s in coordinator.status().services} == {"pinned": "stopped"}
    assert coordinator.events(EventQuery(stream="pinned", types=["StartRequested"])) == []


def test_a_service_spanning_two_devices_holds_and_gives_back_memory_on_both(
    tmp_path: Path, open_coordinator: Open
) -> None:
    # Three devices: it takes exactly two of them.
    doc = multi_doc(tmp_path, {"tp": service(6000, gpu_count=2)}, devices=3)
    coordinator = open_coordinator(write_config(tmp_path, doc))
    coordinator.ensure_service("tp", client="w", timeout=30)
    sims = sims_of(coordinator)
    pid = pid_of(coordinator, "tp")
    assert devices_of(coordinator, "tp") == (0, 1)
    assert held(sims, pid) == [6000, 6000, 0]
    assert_sees(pid, sims, (0, 1))
    used = [d.used_mib for d in coordinator.status().devices]
    assert used == [6000, 6000, 0]

    coordinator.stop_service("tp")
    wait_quiet(coordinator, quiet_s=0.1)
    (stopped,) = coordinator.events(EventQuery(stream="tp", types=["Stopped"]))
    assert stopped.data["vram_reclaimed"] is True, stopped.data
    assert stopped.data["devices"] == [0, 1], stopped.data
    assert stopped.data["held_mib"] == 12000, stopped.data
    assert [sim.holders() for sim in sims] == [{}, {}, {}]


# Run as a child process: open a coordinator on CONFIG, start each service named after
# it (one client each), say so, and wait to be killed (no close: a crash).
CRASHING_COORDINATOR = """
import sys, time
from gpusm import Coordinator
coordinator = Coordinator.from_config(sys.argv[1], monitor=False)
for name in sys.argv[2:]:
    coordinator.ensure_service(name, client="w" + name, timeout=30)
print("ready", flush=True)
time.sleep(120)
"""


def start_then_crash(config: Path, *names: str) -> None:
    """A coordinator in a child process starts ``names`` and is SIGKILLed."""
    child = subprocess.Popen(
        [sys.executable, "-c", CRASHING_COORDINATOR, str(config), *names],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        assert line == b"ready\n", child.communicate(timeout=10)[1].decode()[-2000:]
    finally:
        child.kill()
        child.communicate(timeout=10)


def test_recovery_adopts_each_service_on_its_own_device(
    tmp_path: Path, open_coordinator: Open
) -> None:
    doc = multi_doc(tmp_path, {"a": service(4096), "b": service(4096)}, placement="spread")
    config = write_config(tmp_path, doc)
    start_then_crash(config, "a", "b")

    coordinator = open_coordinator(config)
    assert coordinator.recovered
    sims = sims_of(coordinator)
    status = {s.name: s for s in coordinator.status().services}
    assert (status["a"].state, status["b"].state) == ("healthy", "healthy")
    assert (status["a"].devices, status["b"].devices) == ((0,), (1,))
    assert (status["a"].gpu, status["b"].gpu) == (0, 1)
    assert held(sims, pid_of(coordinator, "a")) == [4096, 0]
    assert held(sims, pid_of(coordinator, "b")) == [0, 4096]
    adopted = coordinator.events(EventQuery(types=["Adopted"]))
    assert sorted(e.stream for e in adopted) == ["a", "b"], adopted
    starts = Counter(e.stream for e in coordinator.events(EventQuery(types=["StartRequested"])))
    assert starts == {"a": 1, "b": 1}  # the child's starts only: nothing restarted
    assert [d.used_mib for d in coordinator.status().devices] == [4096, 4096]


def run_seed(folder: Path, open_coordinator: Open, devices: int) -> Counter[str]:
    """The seed pipeline (SEED_ITEMS items) on ``devices`` simulated 24 GiB GPUs; the
    log's event counts."""
    folder.mkdir()
    doc = seed_config(folder, load_scale=SEED_LOAD_SCALE)
    doc["gpu"]["sim"]["devices"] = devices
    coordinator = open_coordinator(write_config(folder, doc))
    for _ in range(SEED_ITEMS):
        for phase in coordinator.config.pipeline:
            coordinator.enter_phase(phase, client="worker", timeout=30)
            wait_quiet(coordinator, quiet_s=0.1)
    wait_quiet(coordinator)
    sims = sims_of(coordinator)
    assert len(sims) == devices
    assert [sim.ooms() for sim in sims] == [[]] * devices
    counts = Counter(e.type for e in coordinator.events())
    coordinator.close(stop_services=True)
    return counts


def test_two_devices_evict_less_than_one_in_the_seed_pipeline(
    tmp_path: Path, open_coordinator: Open
) -> None:
    one = run_seed(tmp_path / "one", open_coordinator, devices=1)
    two = run_seed(tmp_path / "two", open_coordinator, devices=2)
    evictions_one = sum(one[t] for t in EVICTIONS)
    evictions_two = sum(two[t] for t in EVICTIONS)
    # One device: ComfyUI (20 GiB) stops Vidi and CosyVoice (4 GiB each) every video
    # phase they are still up for. Two: they stay on device 0, ComfyUI goes to device 1.
    assert evictions_one >= 1, one
    assert evictions_two == 0, two
    assert two["StartRequested"] <= one["StartRequested"], (one, two)
    assert one["StartFailed"] == two["StartFailed"] == 0


def test_recovery_adopts_a_spanning_service_on_both_its_devices(
    tmp_path: Path, open_coordinator: Open
) -> None:
    doc = multi_doc(tmp_path, {"tp": service(6000, gpu_count=2)})
    config = write_config(tmp_path, doc)
    start_then_crash(config, "tp")

    coordinator = open_coordinator(config)
    sims = sims_of(coordinator)
    (tp,) = coordinator.status().services
    assert (tp.state, tp.devices) == ("healthy", (0, 1))
    assert held(sims, pid_of(coordinator, "tp")) == [6000, 6000]
    assert [d.used_mib for d in coordinator.status().devices] == [6000, 6000]
    assert [e.type for e in coordinator.events(EventQuery(types=["Adopted"]))] == ["Adopted"]
    coordinator.stop_service("tp")
    wait_quiet(coordinator, quiet_s=0.1)
    (stopped,) = coordinator.events(EventQuery(stream="tp", types=["Stopped"]))
    assert stopped.data["vram_reclaimed"] is True, stopped.data
    assert stopped.data["devices"] == [0, 1], stopped.data
