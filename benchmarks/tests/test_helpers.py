"""Checks of the benchmark helpers themselves (not timings): `pytest benchmarks/tests`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from benchmarks.busy_host import process_count
from benchmarks.common import Ctx, ProcessGuard, Row, idle_processes, percentile, write_config
from benchmarks.loggen import generate_log
from benchmarks.pipeline import lower_bound
from benchmarks.recovery import dict_fold
from benchmarks.report import README_END, README_START, markdown_table, update_readme
from benchmarks.seed import HOLDERS, seed_doc
from benchmarks.switch import share_goal_s
from gpusm import load_config
from gpusm.domain.machine import ServiceMachine
from gpusm.ports import EventQuery
from gpusm.store.sql import SqlEventStore
from tests.support import eventually


def test_percentile_interpolates_like_numpy() -> None:
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([5], 99) == 5
    assert percentile([0, 10], 95) == pytest.approx(9.5)


def test_generated_log_opens_without_migration_and_folds_legally(tmp_path: Path) -> None:
    db = tmp_path / "gpusm.db"
    versions = generate_log(db, 2_000, ["svc0", "svc1"], [1024, 2048])
    store = SqlEventStore(f"sqlite:///{db}", upgrade=False)
    try:
        events = store.read()
        heads = store.heads()
        peak = store.read(EventQuery(stream="svc1", types=["VramObserved"]))
    finally:
        store.close()
    assert len(events) == 2_000
    assert [e.seq for e in events] == list(range(1, 2_001))
    assert {s: h.version for s, h in heads.items()} == versions
    assert [p.data["peak_mib"] for p in peak] == [2048]
    for name in ("svc0", "svc1"):
        stream = [e for e in events if e.stream == name]
        machine = ServiceMachine.fold(name, stream)
        assert (machine.state, machine.version) == dict_fold(stream)
        assert heads[name].state == machine.state.value == "stopped"
        assert heads[name].last_seq == stream[-1].seq


def test_lower_bound_adds_the_loads_no_schedule_can_hide() -> None:
    work = [dict.fromkeys(["crawl", "analysis", "tts", "video", "render"], 1.0)] * 2
    own = {"vidi": 3.0, "cosyvoice": 2.0, "comfyui": 6.0}
    # work 10 + (3 - 1) before the first analysis + min(2, 6 - 1) per item
    assert lower_bound(work, own) == 10 + 2 + 2 * 2


def test_table_escapes_pipes_and_readme_block_is_replaced(tmp_path: Path) -> None:
    row = Row("f|g", "1", "2", 0.5, "≥ 0.5", True)
    table = markdown_table([row])
    assert "f\\|g" in table
    assert table.splitlines()[-1].endswith("| 0.5 | ≥ 0.5 | yes |")
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{README_START}\nold\n{README_END}\nrest\n")
    assert update_readme(readme, table)
    text = readme.read_text()
    assert "old" not in text
    assert table in text
    assert text.startswith("intro\n")
    assert text.endswith("rest\n")
    assert not update_readme(tmp_path / "missing.md", table)


def test_stop_ends_a_process_and_the_descendants_it_leaves_behind() -> None:
    guard = ProcessGuard()
    # The child starts a grandchild in its own session, which outlives the child.
    script = (
        "import subprocess, sys, time\n"
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'],"
        " start_new_session=True)\n"
        "print(p.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = guard.popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    grandchild = psutil.Process(int(proc.stdout.readline()))
    proc.stdout.close()
    guard.stop(proc, grace_s=5)
    assert proc.returncode is not None

    def grandchild_gone() -> bool:
        try:
            return not grandchild.is_running() or grandchild.status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    eventually(grandchild_gone, 10, "the grandchild to end")
    guard.stop_all()


def _descendants() -> set[int]:
    return {
        p.pid
        for p in psutil.Process().children(recursive=True)
        if p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    }


def test_idle_processes_are_there_inside_and_reaped_after_even_on_error() -> None:
    guard = ProcessGuard()
    before = _descendants()
    with idle_processes(guard, 25) as spawner:
        kids = psutil.Process(spawner).children()
        assert len(kids) == 25
        assert all(k.status() != psutil.STATUS_ZOMBIE for k in kids)
    assert _descendants() == before
    with pytest.raises(ValueError, match="boom"), idle_processes(guard, 10):
        raise ValueError("boom")
    assert _descendants() == before
    # Left open, the guard's stop_all still ends the spawner and its children.
    held = idle_processes(guard, 10)
    held.__enter__()
    guard.stop_all()
    eventually(lambda: not (_descendants() - before), 10, "the idle processes to end")


def test_busy_host_process_count_by_mode_or_option(tmp_path: Path) -> None:
    quick = Ctx(quick=True, work=tmp_path, guard=ProcessGuard(), log=print)
    full = Ctx(quick=False, work=tmp_path, guard=ProcessGuard(), log=print)
    assert (process_count(quick), process_count(full)) == (500, 2000)
    full.shared["busy_procs"] = 123
    assert process_count(full) == 123


def test_share_goal_is_the_issues_bar_at_half_second_loads() -> None:
    assert share_goal_s(0.5) == pytest.approx(0.020)
    assert share_goal_s(10.0) == pytest.approx(0.200)


def test_seed_config_loads_with_pipeline_and_the_holders_phases(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, seed_doc(tmp_path, api_port=7999)))
    assert sorted(config.services) == ["comfyui", "cosyvoice", "ollama", "vidi"]
    assert list(config.pipeline) == ["crawl", "analysis", "tts", "video", "render"]
    assert set(HOLDERS.values()) <= set(config.phases)
