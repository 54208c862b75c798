"""The slow sweep against real processes: a marked process that outlived its instance.

A process escapes its instance by leaving the session and the process tree; it keeps
the instance's marker, and its VRAM. The sweep (every 10 s in the monitor; called
directly here) finds it by marker and reaps it; the running instance is left alone.
"""

from __future__ import annotations

from pathlib import Path

from gpusm.config import load_config
from gpusm.engine.reconcile import recover
from gpusm.engine.sweep import sweep
from gpusm.ports import EventQuery
from gpusm.wiring import build_engine
from tests.seed_helpers import seed_config, sim_of, write_config
from tests.support import eventually


def test_the_sweep_reaps_a_marked_process_that_outlived_its_instance(tmp_path: Path) -> None:
    path = write_config(tmp_path, seed_config(tmp_path, pipeline=[]))
    config = load_config(path)
    engine = build_engine(config)  # creates the simulated GPU
    sim = sim_of(path)
    try:
        recover(engine)
        native = engine.runtimes["native"]
        # What an escaped descendant of an instance that ended looks like: alive, marked
        # with an instance id that no service runs, and holding simulated VRAM.
        ghost = native.start(config.services["vidi"], "ghost-instance")
        eventually(lambda: ghost.pid in sim.holders(), 30, "the ghost to allocate")

        done = sweep(engine)

        assert done == ["vidi: reaped orphan ghost-instance"]
        assert not native.is_alive(ghost)
        eventually(lambda: ghost.pid not in sim.holders(), 10, "the ghost's VRAM back")
        events = engine.store.read(EventQuery(stream="vidi", types=["OrphanReaped"]))
        assert events[-1].data["instance"] == "ghost-instance"
        assert sweep(engine) == []  # nothing left to reap
    finally:
        for runtime in engine.runtimes.values():
            for handle in runtime.find_orphans():
                runtime.stop(handle, 1.0)
        engine.store.close()
