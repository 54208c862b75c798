"""The simulated GPU: exact accounting, memory tied to live processes, lag, OOM records."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

from gpusm.errors import GpuProbeError, SimOutOfMemory
from gpusm.gpu import SimGpu
from tests.gpu.sim_helpers import Spawner
from tests.support import eventually


class ManualTime:
    """A wall clock for the sim that moves only when told to."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


# ---------------------------------------------------------------- creation
def test_opening_a_missing_sim_without_a_size_says_how_to_create_it(sim_dir: Path) -> None:
    with pytest.raises(GpuProbeError, match=r"no simulated GPU at .*--total-mib N"):
        SimGpu(sim_dir)
    assert not sim_dir.exists()


def test_another_handle_sees_the_same_gpu(sim_dir: Path) -> None:
    first = SimGpu(sim_dir, total_mib=4096, reclaim_lag_s=0.5)
    first.allocate(100)
    second = SimGpu(sim_dir)
    assert (second.uuid, second.total_mib, second.reclaim_lag_s) == (first.uuid, 4096, 0.5)
    assert second.uuid.startswith("SIM-")
    assert second.snapshot().processes == {os.getpid(): 100}


def test_default_reclaim_lag_is_used_when_none_is_given(sim_dir: Path) -> None:
    assert SimGpu(sim_dir, total_mib=10).reclaim_lag_s == 0.2


def test_resizes_when_what_is_used_fits(sim_dir: Path) -> None:
    SimGpu(sim_dir, total_mib=1000).allocate(300)
    sim = SimGpu(sim_dir, total_mib=400, reclaim_lag_s=0.0)
    assert (sim.total_mib, sim.reclaim_lag_s, sim.snapshot().free_mib) == (400, 0.0, 100)


def test_refuses_to_shrink_below_what_is_used(sim_dir: Path) -> None:
    SimGpu(sim_dir, total_mib=1000).allocate(300)
    with pytest.raises(GpuProbeError, match="300 MiB are in use"):
        SimGpu(sim_dir, total_mib=200)
    assert SimGpu(sim_dir).total_mib == 1000


@pytest.mark.parametrize(("total", "lag"), [(0, None), (-5, None), (100, -1.0)])
def test_rejects_nonsense_sizes_and_lags(sim_dir: Path, total: int, lag: float | None) -> None:
    with pytest.raises(GpuProbeError, match="must be"):
        SimGpu(sim_dir, total_mib=total, reclaim_lag_s=lag)


def test_folder_that_cannot_be_created_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(GpuProbeError, match="cannot create the simulated GPU folder"):
        SimGpu(blocker / "sim", total_mib=10)


def test_damaged_state_file_is_reported_not_overwritten(sim_dir: Path) -> None:
    SimGpu(sim_dir, total_mib=10)
    (sim_dir / "state.json").write_text("{not json")
    with pytest.raises(GpuProbeError, match=r"damaged.*delete"):
        SimGpu(sim_dir)
    assert (sim_dir / "state.json").read_text() == "{not json"


def test_state_file_of_another_format_is_reported(sim_dir: Path) -> None:
    SimGpu(sim_dir, total_mib=10)
    (sim_dir / "state.json").write_text(json.dumps({"format": 99}))
    with pytest.raises(GpuProbeError, match="damaged"):
        SimGpu(sim_dir).snapshot()


def test_state_file_removed_under_an_open_handle_is_reported(sim_dir: Path) -> None:
    sim = SimGpu(sim_dir, total_mib=10)
    (sim_dir / "state.json").unlink()
    with pytest.raises(GpuProbeError, match="state file gone"):
        sim.snapshot()


def test_unreadable_state_is_a_gpu_probe_error(sim_dir: Path) -> None:
    sim = SimGpu(sim_dir, total_mib=10)
    (sim_dir / "state.json").unlink()
    (sim_dir / "state.json").mkdir()
    with pytest.raises(GpuProbeError, match="cannot read"):
        sim.snapshot()


def test_failed_write_is_a_gpu_probe_error_and_changes_nothing(sim_dir: Path) -> None:
    sim = SimGpu(sim_dir, total_mib=10)
    # The temp file's name is per process and thread; a folder in its place makes writing fail.
    (sim_dir / f".state.json.{os.getpid()}.{threading.get_ident()}.tmp").mkdir()
    with pytest.raises(GpuProbeError, match="cannot write"):
        sim.allocate(5)
    assert sim_dir.joinpath("state.json").read_text().count('"pid"') == 0


def test_lock_file_that_cannot_be_opened_is_a_gpu_probe_error(sim_dir: Path) -> None:
    sim = SimGpu(sim_dir, total_mib=10)
    (sim_dir / "lock").unlink()
    (sim_dir / "lock").mkdir()
    with pytest.raises(GpuProbeError, match="cannot open the simulated GPU"):
        sim.snapshot()


# ---------------------------------------------------------------- allocate / release
def test_allocations_add_up_per_process(sim_dir: Path) -> None:
    sim = SimGpu(sim_dir, total_mib=1000)
    sim.allocate(100)
    sim.allocate(50)
    snap = sim.snapshot()
    assert (snap.used_mib, snap.free_mib, dict(snap.processes)) == (150, 850, {os.getpid(): 150})
    assert sim.holders() == {os.getpid(): 150}
    assert snap.name == "gpusm simulated GPU"
    assert snap.index == 0


def test_allocating_beyond_free_raises_and_records_the_oom(sim_dir: Path) -> None:
    sim = SimGpu(sim_dir, total_mib=1000)
    sim.allocate(700)
    with pytest.raises(SimOutOfMemory) as info:
        sim.allocate(301)
    assert (info.value.pid, info.value.requested_mib, info.value.free_mib) == (
        os.getpid(),
        301,
        300,
    )
    assert sim.snapshot().used_mib == 700
    [oom] = sim.ooms()
    assert (oom["pid"], oom["requested_mib"], oom["free_mib"]) == (os.getpid(), 301, 300)
    assert oom["cmdline"]
    assert oom["at"].endswith("+00:00")


def test_allocating_exactly_what_is_free_succeeds(sim_dir: Path) -> None:
    sim = SimGpu(sim_dir, total_mib=1000)
    sim.allocate(1000)
    assert sim.snapshot().free_mib == 0
    assert sim.ooms() == []


def test_allocates_on_behalf_of_another_live_process(sim_dir: Path, spawner: Spawner) -> None:
    child = spawner.sleeper()
    sim = SimGpu(sim_dir, total_mib=1000)
    sim.allocate(40, pid=child.pid)
    assert sim.holders() == {child.pid: 40}


@pytest.mark.parametrize("mib", [0, -3])
def test_rejects_non_positive_amounts(sim_dir: Path, mib: int) -> None:
    sim = SimGpu(sim_dir, total_mib=1000)
    with pytest.raises(GpuProbeError, match="positive"):
        sim.allocate(mib)
    with pytest.raises(GpuProbeError, match="positive"):
        sim.release(mib)


def test_cannot_allocate_for_a_process_that_does_not_exist(sim_dir: Path, spawner: Spawner) -> None:
    child = spawner.sleeper()
    child.kill()
    child.wait()
    with pytest.raises(GpuProbeError, match=f"no live process with pid {child.pid}"):
        SimGpu(sim_dir, total_mib=1000).allocate(10, pid=child.pid)


def test_release_frees_part_or_all_at_once(sim_dir: Path) -> None:
    sim = SimGpu(sim_dir, total_mib=1000)
    sim.allocate(100)
    sim.release(30)
    assert sim.holders() == {os.getpid(): 70}
    sim.release(70)
    assert sim.holders() == {}
    sim.allocate(10)
    sim.release()
    assert sim.snapshot().used_mib == 0


def test_releasing_more_than_held_is_refused(sim_dir: Path) -> None:
    sim = SimGpu(sim_dir, total_mib=1000)
    sim.allocate(10)
    with pytest.raises(GpuProbeError, match="holds 10 MiB; cannot release 11"):
        sim.release(11)
    assert sim.holders() == {os.getpid(): 10}


def test_releasing_for_a_dead_pid_drops_its_memory_at_once(sim_dir: Path, spawner: Spawner) -> None:
    sim = SimGpu(sim_dir, total_mib=1000, reclaim_lag_s=60)
    child = spawner.holder(sim_dir, 200)
    child.kill()
    child.wait()
    assert sim.snapshot().used_mib == 200  # within the lag
    sim.release(pid=child.pid)
    assert sim.snapshot().used_mib == 0


# ---------------------------------------------------------------- process-accurate freeing
def test_memory_of_an_exited_process_comes_back_only_after_the_lag(
    sim_dir: Path, spawner: Spawner
) -> None:
    clock = ManualTime()
    sim = SimGpu(sim_dir, total_mib=1000, reclaim_lag_s=0.3, time_fn=clock)
    child = spawner.holder(sim_dir, 400)
    assert sim.holders() == {child.pid: 400}
    assert child.stdin is not None
    child.stdin.close()  # the holder exits without releasing anything
    child.wait(timeout=10)

    snap = sim.snapshot()  # first read after death: marked exited, still counted
    assert (snap.used_mib, dict(snap.processes)) == (400, {})
    [alloc] = sim.allocations()
    assert (alloc.pid, alloc.alive, alloc.exited_at) == (child.pid, False, clock.now)
    clock.now += 0.29
    assert sim.snapshot().used_mib == 400
    clock.now += 0.02
    assert sim.snapshot().used_mib == 0
    assert sim.allocations() == []


def test_real_time_lag_frees_memory_after_exit(sim_dir: Path, spawner: Spawner) -> None:
    sim = SimGpu(sim_dir, total_mib=1000, reclaim_lag_s=0.3)
    child = spawner.holder(sim_dir, 250)
    child.kill()
    child.wait(timeout=10)
    seen_dead = time.time()
    assert sim.snapshot().used_mib == 250
    eventually(lambda: sim.snapshot().used_mib == 0, what="memory to come back")
    assert time.time() - seen_dead >= 0.3


def test_zombie_holder_counts_as_dead(sim_dir: Path, spawner: Spawner) -> None:
    clock = ManualTime()
    sim = SimGpu(sim_dir, total_mib=1000, reclaim_lag_s=0.0, time_fn=clock)
    child = spawner.sleeper()
    sim.allocate(100, pid=child.pid)
    assert child.stdin is not None
    child.stdin.close()
    # Not reaped: the child stays a zombie until the fixture waits for it.
    eventually(lambda: sim.snapshot().used_mib == 0, what="the zombie to be seen dead")
    assert child.poll() is not None


def test_reused_pid_does_not_inherit_memory(sim_dir: Path) -> None:
    clock = ManualTime()
    sim = SimGpu(sim_dir, total_mib=1000, reclaim_lag_s=1.0, time_fn=clock)
    sim.allocate(300)
    # Make the record belong to an earlier process that had this pid: same pid, other start.
    state_file = sim_dir / "state.json"
    state = json.loads(state_file.read_text())
    state["allocations"][0]["create_time"] -= 1000.0
    state_file.write_text(json.dumps(state))

    assert sim.holders() == {}  # this live process is not the one that allocated
    assert sim.snapshot().used_mib == 300  # the dead one's memory waits for the lag
    sim.allocate(100)
    assert sim.holders() == {os.getpid(): 100}
    clock.now += 1.0
    assert sim.snapshot().used_mib == 100


# ---------------------------------------------------------------- reset
def test_reset_forgets_dead_memory_and_ooms(sim_dir: Path, spawner: Spawner) -> None:
    sim = SimGpu(sim_dir, total_mib=100, reclaim_lag_s=60)
    child = spawner.holder(sim_dir, 80)
    with pytest.raises(SimOutOfMemory):
        sim.allocate(50)
    child.kill()
    child.wait()
    assert sim.reset() == (1, 1)
    assert (sim.snapshot().used_mib, sim.ooms()) == (0, [])


def test_reset_is_refused_while_a_live_process_holds_memory(sim_dir: Path) -> None:
    sim = SimGpu(sim_dir, total_mib=100)
    sim.allocate(10)
    with pytest.raises(GpuProbeError, match=rf"{os.getpid()} \(10 MiB\).*--force"):
        sim.reset()
    assert sim.reset(force=True) == (1, 0)
    assert sim.holders() == {}
