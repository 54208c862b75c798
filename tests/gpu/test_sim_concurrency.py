"""Several processes hammering one simulated GPU never exceed it and lose no update."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from gpusm.gpu import SimGpu
from tests.gpu.sim_helpers import Spawner

# Each worker allocates and releases at random; after every step it reads the GPU and
# notes the largest 'used' it saw. It reports what it believes it holds and its OOM count,
# then waits (holding its memory) until its stdin closes.
_WORKER = """
import json, os, random, sys
from pathlib import Path
from gpusm.errors import SimOutOfMemory
from gpusm.gpu.sim import SimGpu

sim = SimGpu(Path(sys.argv[1]))
rng = random.Random(int(sys.argv[2]))
held = ooms = max_used = 0
for _ in range(int(sys.argv[3])):
    if held and rng.random() < 0.4:
        amount = rng.randint(1, held)
        sim.release(amount)
        held -= amount
    else:
        amount = rng.randint(10, 300)
        try:
            sim.allocate(amount)
            held += amount
        except SimOutOfMemory:
            ooms += 1
    snap = sim.snapshot()
    max_used = max(max_used, snap.used_mib)
    assert snap.used_mib + snap.free_mib == snap.total_mib
report = {"pid": os.getpid(), "held": held, "ooms": ooms, "max_used": max_used}
print(json.dumps(report), flush=True)
sys.stdin.read()
"""


def test_concurrent_allocations_never_exceed_capacity_and_lose_nothing(
    sim_dir: Path, spawner: Spawner
) -> None:
    total = 1000
    sim = SimGpu(sim_dir, total_mib=total, reclaim_lag_s=60)
    workers = [
        spawner.popen(
            [sys.executable, "-c", _WORKER, str(sim_dir), str(seed), "50"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        for seed in range(6)
    ]
    max_seen = 0
    reports = []
    for worker in workers:
        assert worker.stdout is not None
        # Sample from outside as well while the others are still running.
        max_seen = max(max_seen, sim.snapshot().used_mib)
        line = worker.stdout.readline()
        assert line, f"worker {worker.pid} died: exit {worker.wait(timeout=10)}"
        reports.append(json.loads(line))

    # Every worker is now parked holding its memory: the books must match exactly.
    assert sim.holders() == {r["pid"]: r["held"] for r in reports if r["held"]}
    assert sim.snapshot().used_mib == sum(r["held"] for r in reports) <= total
    assert max(r["max_used"] for r in reports) <= total
    assert max_seen <= total
    # Contention really happened, and every refusal was recorded with honest numbers.
    ooms = sim.ooms()
    assert len(ooms) == sum(r["ooms"] for r in reports) > 0
    assert {o["pid"] for o in ooms} <= {r["pid"] for r in reports}
    assert all(o["requested_mib"] > o["free_mib"] >= 0 for o in ooms)
