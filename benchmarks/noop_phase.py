"""Figure 3: a no-op ``enter_phase`` (the client is already in that phase, all healthy).

gpusm: ``Coordinator.enter_phase(p, client)`` in process, with the monitor running as
it does when served, where ``p``'s service is already healthy: it reads the GPU twice
(free before and after, for the result), records its ``PhaseEntered`` audit event
durably and returns. Goal: median ≤ 1 ms. Baseline: one raw durable append of one
event (figure 1's baseline), measured here too, in blocks interleaved with gpusm's.

Measured twice: on a minimal config (one service, no ``pipeline:``), and on the seed
config (:mod:`benchmarks.seed`: four services, ``pipeline:`` on, two clients holding
``analysis`` and ``tts``, the calls alternating between them), where every call also
considers prefetching the next GPU phase. The goal is the same for both.
"""

from __future__ import annotations

import time
from typing import Any

from benchmarks.append import RawAppender, new_event
from benchmarks.common import (
    Ctx,
    Row,
    fake_service_entry,
    free_port,
    median,
    ms,
    percentile,
    write_config,
)
from benchmarks.seed import HOLDERS, SeedNoop
from gpusm import Coordinator

__all__ = ["run"]

GOAL_MEDIAN_S = 0.001


def run(ctx: Ctx) -> list[Row]:
    """Time no-op calls and raw appends in alternating blocks, on both configs."""
    rows = [_minimal(ctx)]
    rows.append(_seed(ctx, rows[0].details["median_s"]))
    return rows


def _time_raw_appends(raw: RawAppender, count: int, version: int, into: list[float]) -> int:
    """Time ``count`` raw durable appends (the baseline) into ``into``; the next version."""
    for _ in range(count):
        event = new_event("bench", version)
        began = time.perf_counter()
        raw.append(event)
        into.append(time.perf_counter() - began)
        version += 1
    return version


def _details(calls: list[float], raws: list[float]) -> dict[str, Any]:
    return {
        "calls": len(calls),
        "median_s": median(calls),
        "p95_s": percentile(calls, 95),
        "p99_s": percentile(calls, 99),
        "max_s": max(calls),
        "raw_append_median_s": median(raws),
        "raw_append_p99_s": percentile(raws, 99),
    }


def _blocks(ctx: Ctx) -> tuple[int, int]:
    return (4, 50) if ctx.quick else (10, 50)


def _minimal(ctx: Ctx) -> Row:
    folder = ctx.folder("noop")
    doc: dict[str, Any] = {
        "state_dir": str(folder / "state"),
        "gpu": {
            "backend": "sim",
            "reserve_mib": 0,
            "sim": {"total_mib": 24576, "reclaim_lag_s": 0.0},
        },
        "services": {"svc": fake_service_entry(4096, 10, 0.1, 0.02, free_port())},
        "phases": {"p": ["svc"]},
    }
    path = write_config(folder, doc)
    blocks, per_block = _blocks(ctx)
    calls: list[float] = []
    raws: list[float] = []
    raw = RawAppender(folder / "raw.db")
    coordinator = Coordinator.from_config(path)
    try:
        first = coordinator.enter_phase("p", client="w1", timeout=60)
        if first.started != ("svc",):
            raise RuntimeError(f"expected the first call to start svc, got {first}")
        for _ in range(20):  # warm-up
            coordinator.enter_phase("p", client="w1")
        version = 1
        for _ in range(blocks):
            for _ in range(per_block):
                began = time.perf_counter()
                result = coordinator.enter_phase("p", client="w1")
                calls.append(time.perf_counter() - began)
                if result.started or result.stopped:
                    raise RuntimeError(f"a no-op call started or stopped something: {result}")
            version = _time_raw_appends(raw, per_block, version, raws)
    finally:
        coordinator.close(stop_services=True)
        raw.close()
    med, p99, raw_med = median(calls), percentile(calls, 99), median(raws)
    return Row(
        figure="3. No-op enter_phase (incl. audit event), in process",
        gpusm=f"median {ms(med, 2)}, p99 {ms(p99, 2)}",
        baseline=f"1 raw durable append {ms(raw_med, 2)}",
        ratio=med / raw_med,
        goal=f"median ≤ {ms(GOAL_MEDIAN_S, 0)}",
        met=med <= GOAL_MEDIAN_S,
        details=_details(calls, raws),
    )


def _seed(ctx: Ctx, minimal_median_s: float) -> Row:
    """The seed config: 4 services, ``pipeline:``, two clients in their phases."""
    blocks, per_block = _blocks(ctx)
    calls: list[float] = []
    raws: list[float] = []
    raw = RawAppender(ctx.folder("noop-seed-raw") / "raw.db")
    seed = SeedNoop(ctx, "noop-seed")
    try:
        version = 1
        for _ in range(blocks):
            calls += seed.calls(per_block)
            version = _time_raw_appends(raw, per_block, version, raws)
        seed.check_no_starts()
    finally:
        seed.close()
        raw.close()
    med, p99, raw_med = median(calls), percentile(calls, 99), median(raws)
    return Row(
        figure=(
            f"3. No-op enter_phase, seed config (4 services, pipeline, "
            f"{len(HOLDERS)} clients holding {' and '.join(HOLDERS.values())}), in process"
        ),
        gpusm=f"median {ms(med, 2)}, p99 {ms(p99, 2)}",
        baseline=(
            f"1 raw durable append {ms(raw_med, 2)} "
            f"(1-service config above: {ms(minimal_median_s, 2)})"
        ),
        ratio=med / raw_med,
        goal=f"median ≤ {ms(GOAL_MEDIAN_S, 0)}",
        met=med <= GOAL_MEDIAN_S,
        details={**_details(calls, raws), "minimal_config_median_s": minimal_median_s},
    )
