"""Figure 4: phase-switch overhead — what gpusm adds to the services' own stop and load.

Two fake services that cannot share the simulated GPU (16 GiB each of 24 GiB), with a
known stop time (``--stop-s``) and load time (``--load-s``); the sim's reclaim lag is
``LAG_S``. A client alternates between their phases, so every ``enter_phase`` evicts
one service, waits for its VRAM, starts the other and waits until it is healthy.

Baselines, measured in the same run, alternating with gpusm's switches:

- the services' own time, standalone (no gpusm): the victim's stop (SIGTERM to exit,
  seen by ``waitpid``) and the new service's load, from spawn to its first 200 on
  ``/health`` polled every 5 ms (Python start-up is part of a real load);
- what a user might script by hand: SIGTERM, poll the GPU every second until the
  memory is free, start the other service, poll its health every second.

overhead = gpusm's switch wall time - (own stop + reclaim lag + own load), each gpusm
switch against the standalone switch right after it. Goal: median ≤ max(25 ms, 2% of
the own load time), p95 ≤ twice that. Because a Python start-up varies by ±150 ms on a
busy box, gpusm's share is also taken from the same processes: a pidfd sees the
victim's exit and a 5 ms watcher the new service's first 200, and the switch's events
say when SIGTERM was sent and the process launched (:mod:`benchmarks.standalone`);
its goal is the performance issue's: median ≤ max(20 ms, 2% of the configured load
time), p95 ≤ twice that (20 ms and 40 ms at 0.5 s loads, 200 and 400 ms at 10 s).
A thread reads both simulated GPUs every 20 ms, like a driver freeing memory on its own
schedule (the sim frees a dead process's memory ``LAG_S`` after a read first sees it
dead), for gpusm's runs and the standalone ones alike.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks.common import (
    Ctx,
    Row,
    fake_service_entry,
    free_port,
    http_client,
    median,
    ms,
    percentile,
    wait_http_ok,
    write_config,
)
from benchmarks.standalone import HandRun, HandScript, Pair, driver, exit_watch, watch
from gpusm import Coordinator
from gpusm.domain.events import RecordedEvent
from gpusm.gpu.sim import SimGpu
from gpusm.ports import EventQuery

__all__ = ["goal_s", "run", "share_goal_s"]

VRAM_MIB = 16384
TOTAL_MIB = 24576
STOP_S = 0.1
LAG_S = 0.05


def goal_s(own_load_s: float) -> float:
    """The median overhead goal for a service whose own load takes ``own_load_s``."""
    return max(0.025, 0.02 * own_load_s)


def share_goal_s(load_s: float) -> float:
    """The median goal for gpusm's share, same processes, at a configured ``--load-s``.

    The performance issue's bar: 20 ms at 0.5 s loads (p95 twice that), 2 % of the load
    for long loads. Taken from the configured load time, not a measured one, so that the
    bar does not move with the noise of a Python start-up.
    """
    return max(0.020, 0.02 * load_s)


def _gpusm_config(folder: Path, load_s: float) -> Path:
    doc: dict[str, Any] = {
        "state_dir": str(folder / "state"),
        "gpu": {
            "backend": "sim",
            "reserve_mib": 0,
            "settle_timeout_s": 10,
            "sim": {"total_mib": TOTAL_MIB, "reclaim_lag_s": LAG_S},
        },
        "services": {
            name: fake_service_entry(VRAM_MIB, 10, load_s, STOP_S, free_port()) for name in "ab"
        },
        "phases": {"pa": ["a"], "pb": ["b"]},
    }
    return write_config(folder, doc)


def _breakdown(
    events: list[RecordedEvent], t0: datetime, began: float, ended: float
) -> dict[str, float]:
    """Where one switch's time went, from its events (``at`` mapped onto perf_counter)."""
    at: dict[str, float] = {}
    data: dict[str, Any] = {}
    for e in events:
        at.setdefault(e.type, began + (e.at - t0).total_seconds())
        data.setdefault(e.type, e.data)
    need = ("Evicted", "Stopped", "StartRequested", "ProcessLaunched", "HealthPassed")
    if not all(k in at for k in need):
        return {}
    stop_s = float(data["Stopped"].get("stop_s", 0.0))
    reclaim_s = float(data["Stopped"].get("reclaim_s", 0.0))
    return {
        "call_to_evicted_s": at["Evicted"] - began,
        "evicted_to_stopped_s": at["Stopped"] - at["Evicted"],
        "stop_s": stop_s,
        "reclaim_s": reclaim_s,
        "stopped_to_start_requested_s": at["StartRequested"] - at["Stopped"],
        "start_requested_to_launched_s": at["ProcessLaunched"] - at["StartRequested"],
        "launched_to_healthy_s": at["HealthPassed"] - at["ProcessLaunched"],
        "healthy_to_return_s": ended - at["HealthPassed"],
        # When the runtime sent SIGTERM: its stop returned reclaim_s before Stopped.
        "sigterm_at": at["Stopped"] - reclaim_s - stop_s,
        "launched_at": at["ProcessLaunched"],
    }


def _attribute(
    b: dict[str, float], exited: list[float], ready: list[float], began: float, ended: float
) -> None:
    """gpusm's own share of one switch: wall time minus the same processes' own times.

    The victim's own stop runs from SIGTERM to its exit (a pidfd saw it); the new
    service's own load from its launch to its first 200 (a 5 ms watcher saw it). The
    fork+exec before ``ProcessLaunched`` counts against gpusm (conservative).
    """
    if not b or not exited or not ready:
        return
    sigterm_at, launched_at = b.pop("sigterm_at"), b.pop("launched_at")
    b["own_stop_inrun_s"] = exited[0] - sigterm_at
    b["own_load_inrun_s"] = ready[0] - launched_at
    b["exit_to_stop_seen_s"] = sigterm_at + b["stop_s"] - exited[0]
    b["ready_to_return_s"] = ended - ready[0]
    b["gpusm_share_s"] = (ended - began) - (b["own_stop_inrun_s"] + LAG_S + b["own_load_inrun_s"])


def _measure(
    ctx: Ctx, load_s: float, reps: int, hand_reps: int, pair_by_hand: bool = False
) -> list[Row]:
    folder = ctx.folder(f"switch-{load_s:g}")
    path = _gpusm_config(folder, load_s)
    hand = HandScript(ctx, folder, Pair(VRAM_MIB, TOTAL_MIB, load_s, STOP_S, LAG_S))
    walls: list[float] = []
    owns: list[HandRun] = []
    hands: list[HandRun] = []
    breakdowns: list[dict[str, float]] = []
    coordinator = Coordinator.from_config(path)
    sim = SimGpu(folder / "state" / "simgpu")
    try:
        with http_client() as client, driver([sim, hand.sim]):
            hand.spawn("a")  # both cold starts at once: not measured
            coordinator.enter_phase("pa", client="w1", timeout=120)
            wait_http_ok(client, hand.url("a"), poll_s=0.05, timeout_s=120)
            for rep in range(reps):
                target = "pb" if rep % 2 == 0 else "pa"
                last = coordinator.events(EventQuery(newest_first=True, limit=1))[0].seq
                url = str(coordinator.config.services[target[1]].health.http)
                victim = coordinator.instances().get("a" if target == "pb" else "b")
                if victim is None or victim.pid is None:
                    raise RuntimeError("the victim has no pid")
                with watch(client, url) as ready, exit_watch(victim.pid) as exited:
                    t0 = datetime.now(UTC)
                    began = time.perf_counter()
                    result = coordinator.enter_phase(target, client="w1", timeout=120)
                    ended = time.perf_counter()
                walls.append(ended - began)
                if result.started != (target[1],) or len(result.stopped) != 1:
                    raise RuntimeError(f"unexpected switch: {result}")
                events = coordinator.events(EventQuery(after_seq=last))
                b = _breakdown(events, t0, began, ended)
                _attribute(b, exited, ready, began, ended)
                breakdowns.append(b)
                owns.append(hand.switch(client, by_hand=pair_by_hand))
            for _ in range(hand_reps):
                hands.append(hand.switch(client, by_hand=True))
    finally:
        coordinator.close(stop_services=True)
    hands += [h for h in owns if h.by_hand]
    # Every standalone switch (tight or by hand) observed the services' own times.
    observed = owns + [h for h in hands if not any(h is o for o in owns)]
    own_stop = median([h.own_stop_s for h in observed])
    own_load = median([h.own_load_s for h in observed])
    own = own_stop + LAG_S + own_load
    # Each gpusm switch against the standalone run right after it: noise that lasts a few
    # seconds (a busy neighbour) hits both and cancels out.
    overheads = [
        w - (h.own_stop_s + LAG_S + h.own_load_s) for w, h in zip(walls, owns, strict=True)
    ]
    med, p95 = median(overheads), percentile(overheads, 95)
    goal = goal_s(own_load)
    hand_med = median([h.wall_s for h in hands])
    # The low-noise view: the same switch's own processes, timed by pidfd and watcher.
    shares = [b["gpusm_share_s"] for b in breakdowns if "gpusm_share_s" in b]
    inrun_stop = [b["own_stop_inrun_s"] for b in breakdowns if "own_stop_inrun_s" in b]
    inrun_load = [b["own_load_inrun_s"] for b in breakdowns if "own_load_inrun_s" in b]
    share_med, share_p95 = median(shares), percentile(shares, 95)
    share_goal = share_goal_s(load_s)
    details = {
        "reps": reps,
        "load_s": load_s,
        "stop_s": STOP_S,
        "reclaim_lag_s": LAG_S,
        "switch_s": walls,
        "overhead_s": overheads,
        "overhead_vs_medians_s": [w - own for w in walls],
        "own_switch_s": [h.wall_s for h in owns],
        "own_stop_s": [h.own_stop_s for h in observed],
        "own_load_s": [h.own_load_s for h in observed],
        "hand_script_s": [h.wall_s for h in hands],
        "breakdown_median_s": {
            k: median([b[k] for b in breakdowns if k in b]) for k in sorted(breakdowns[-1])
        },
    }
    label = f"load {load_s:g} s, stop {STOP_S:g} s, {reps} switches"
    return [
        Row(
            figure=f"4. Phase-switch overhead ({label})",
            gpusm=f"overhead median {ms(med)}, p95 {ms(p95)} (switch {median(walls):.3f} s)",
            baseline=(
                f"own stop {own_stop:.3f} + lag {LAG_S:g} + own load {own_load:.3f} = {own:.3f} s"
            ),
            ratio=median(walls) / own,
            goal=f"median ≤ {ms(goal, 0)}, p95 ≤ {ms(2 * goal, 0)}",
            met=med <= goal and p95 <= 2 * goal,
            details=details,
        ),
        Row(
            figure=f"4. … gpusm's share, same processes ({label})",
            gpusm=f"median {ms(share_med)}, p95 {ms(share_p95)}",
            baseline=(
                f"own stop {median(inrun_stop):.3f} + lag {LAG_S:g} + own load "
                f"{median(inrun_load):.3f} s, seen in the same switch"
            ),
            ratio=None,
            goal=f"median ≤ {ms(share_goal, 0)}, p95 ≤ {ms(2 * share_goal, 0)}",
            met=share_med <= share_goal and share_p95 <= 2 * share_goal,
            details={"gpusm_share_s": shares},
        ),
        Row(
            figure=f"4. Phase switch vs. a hand-written script ({label})",
            gpusm=f"{median(walls):.3f} s",
            baseline=f"stop, poll GPU 1/s, start, poll health 1/s: {hand_med:.3f} s",
            ratio=median(walls) / hand_med,
            goal="< 1",
            met=median(walls) < hand_med,
            details={"hand_script_s": details["hand_script_s"]},
        ),
    ]


def run(ctx: Ctx) -> list[Row]:
    """0.5 s loads (and 10 s loads in full mode)."""
    rows = _measure(ctx, 0.5, 4, 1) if ctx.quick else _measure(ctx, 0.5, 10, 2)
    if not ctx.quick:
        # Few, long switches: the hand-written runs double as the standalone ones.
        rows += _measure(ctx, 10.0, 3, 0, pair_by_hand=True)
    return rows
