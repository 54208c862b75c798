"""Figure 8: a busy host — figures 3 (seed config) and 7 (lone reader) with many processes.

A host that runs gpusm runs other things too. Two of gpusm's figures are measured again
with ``N`` extra idle processes on the machine (2,000; 500 in quick mode; ``--busy-procs``
sets it): forked by one small Python spawner, each blocked reading a pipe, holding no
GPU memory and no CPU (:func:`benchmarks.common.idle_processes`; they are reaped when
each measurement ends, whatever happens). Each figure is reported as a ratio to the
same figure without the extra processes, **in the same run**, alternating: quiet, busy,
quiet, busy, …, quiet (the processes are started before each busy block and reaped
after it). Goal: ≤ 1.2x for both.

- no-op ``enter_phase`` on the seed config (:mod:`benchmarks.seed`: 4 services,
  ``pipeline:`` on, two clients holding ``analysis`` and ``tts``), in process with the
  monitor running, as figure 3's second row; samples pooled over blocks, median;
- ``GET /gpu/status`` p50 with one keep-alive reader, as figure 7's lone reader, from
  ``gpusm serve`` on the same seed config with the same two clients in place
  (through :class:`gpusm.Client`); the median of the blocks' p50s.

The in-process coordinator and the daemon are measured one after the other, never
running at the same time.
"""

from __future__ import annotations

import os
import secrets
import time
from typing import Any

from benchmarks.common import (
    PY,
    Ctx,
    Row,
    free_port,
    idle_processes,
    median,
    ms,
    percentile,
    write_config,
)
from benchmarks.seed import HOLDERS, SeedNoop, seed_doc
from benchmarks.status_api import api_missing, load_test, start_logged, wait_until

__all__ = ["GOAL_RATIO", "process_count", "run"]

GOAL_RATIO = 1.2
FULL_PROCS = 2000
QUICK_PROCS = 500
SETTLE_S = 0.5  # after starting or reaping the processes, before timing


def process_count(ctx: Ctx) -> int:
    """How many idle processes to add: ``--busy-procs``, else by mode."""
    given = ctx.shared.get("busy_procs")
    if given is not None:
        return int(given)
    return QUICK_PROCS if ctx.quick else FULL_PROCS


def _alternate(ctx: Ctx, count: int, rounds: int, measure: Any) -> tuple[list[Any], list[Any]]:
    """quiet, busy, quiet, …, busy, quiet: ``measure()`` each time; returns (quiet, busy)."""
    quiet: list[Any] = []
    busy: list[Any] = []
    for _ in range(rounds):
        quiet.append(measure())
        with idle_processes(ctx.guard, count):
            time.sleep(SETTLE_S)
            busy.append(measure())
        time.sleep(SETTLE_S)
    quiet.append(measure())
    return quiet, busy


def _noop(ctx: Ctx, count: int, rounds: int, label: str) -> Row:
    per_block = 200 if ctx.quick else 500
    seed = SeedNoop(ctx, "busy-noop")
    try:
        quiet, busy = _alternate(ctx, count, rounds, lambda: seed.calls(per_block))
        seed.check_no_starts()
    finally:
        seed.close()
    q = [t for block in quiet for t in block]
    b = [t for block in busy for t in block]
    q_med, b_med = median(q), median(b)
    ratio = b_med / q_med
    return Row(
        figure=f"8. Busy host: no-op enter_phase, seed config, {label}",
        gpusm=f"median {ms(b_med, 2)}, p99 {ms(percentile(b, 99), 2)}",
        baseline=f"without them: median {ms(q_med, 2)}, p99 {ms(percentile(q, 99), 2)}",
        ratio=ratio,
        goal=f"≤ {GOAL_RATIO:g}x without them",
        met=ratio <= GOAL_RATIO,
        details={
            "idle_processes": count,
            "calls_per_block": per_block,
            "busy_median_s": b_med,
            "quiet_median_s": q_med,
            "busy_block_medians_s": [median(x) for x in busy],
            "quiet_block_medians_s": [median(x) for x in quiet],
            "busy_p99_s": percentile(b, 99),
            "quiet_p99_s": percentile(q, 99),
        },
    )


def _lone_reader(ctx: Ctx, count: int, rounds: int, label: str) -> Row:
    figure = f"8. Busy host: /gpu/status lone reader p50, {label}"
    missing = api_missing()
    if missing is not None:
        return Row(figure, "n/a (no API yet)", "—", None, "—", None, {"why": missing})
    from gpusm.client import Client

    folder = ctx.folder("busy-api")
    port = free_port()
    path = write_config(folder, seed_doc(folder, api_port=port))
    url = f"http://127.0.0.1:{port}"
    token = secrets.token_urlsafe(24)
    log = folder / "serve.log"
    daemon = start_logged(
        ctx,
        [PY, "-m", "gpusm", "serve", "-c", str(path), "--stop-on-exit"],
        log,
        {**os.environ, "GPUSM_TOKEN": token},
    )
    try:
        wait_until(
            f"{url}/healthz",
            lambda r: r.status_code == 200 and r.json().get("status") == "ok",
            60,
            daemon,
            log,
        )
        with Client(url, token=token, timeout=60) as client:
            for name, phase in HOLDERS.items():
                client.enter_phase(phase, client=name, timeout=60)
        time.sleep(SETTLE_S)  # a prefetch, if any, gets going before the first block
        status = f"{url}/gpu/status"
        quiet, busy = _alternate(ctx, count, rounds, lambda: load_test(status, 1, 0.2, 1.0))
    finally:
        ctx.guard.stop(daemon)
    if any(r["errors"] for r in quiet + busy):
        raise RuntimeError(f"non-200 answers: {quiet} {busy}")
    q50 = median([r["p50_s"] for r in quiet])
    b50 = median([r["p50_s"] for r in busy])
    ratio = b50 / q50
    return Row(
        figure=figure,
        gpusm=f"p50 {ms(b50, 2)}",
        baseline=f"without them: p50 {ms(q50, 2)}",
        ratio=ratio,
        goal=f"≤ {GOAL_RATIO:g}x without them",
        met=ratio <= GOAL_RATIO,
        details={"idle_processes": count, "quiet": quiet, "busy": busy},
    )


def run(ctx: Ctx) -> list[Row]:
    """Both figures, quiet and busy alternating."""
    count = process_count(ctx)
    rounds = 2 if ctx.quick else 3
    label = f"+{count:,} idle processes" + (" (quick mode)" if ctx.quick else "")
    ctx.log(f"  no-op enter_phase, {rounds} quiet/busy rounds, {count} idle processes")
    rows = [_noop(ctx, count, rounds, label)]
    ctx.log(f"  /gpu/status lone reader, {rounds} quiet/busy rounds")
    rows.append(_lone_reader(ctx, count, rounds, label))
    return rows
