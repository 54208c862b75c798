"""Figure 2: recovery time against log length, and the cost of a full replay.

For each log length (1,000 / 100,000 / 1,000,000 events; the largest only in full
mode) a state directory gets a generated history (:mod:`benchmarks.loggen`), then a
coordinator really starts two fake services and is closed without stopping them, so
their last events say healthy and their processes run. The figure is the wall time of
``Coordinator.from_config(path, monitor=False)`` — lock, open the store, replay heads,
find orphans, probe and adopt both services, record it — measured round-robin over the
lengths. Baseline: the 1,000-event case. Goal: the longest log within 1.5x of it.

Full replay: folding every service event of the 100,000-event log through
``ServiceMachine.fold`` (the fallback if the projection were lost), per million
events. Baseline: the same fold over the same events with the same transition table
as a plain dict, without the ``transitions`` library.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import Ctx, Row, fake_service_entry, free_port, median, ms, write_config
from benchmarks.loggen import generate_log
from gpusm import Coordinator
from gpusm.domain.events import COORDINATOR_STREAM, EVENT_TYPES, NewEvent, ServiceEvent
from gpusm.domain.machine import TRANSITIONS, ServiceMachine
from gpusm.domain.states import State
from gpusm.ports import EventQuery
from gpusm.store.sql import SqlEventStore

__all__ = ["dict_fold", "run"]

GOAL_RATIO = 1.5
GOAL_FOLD_S_PER_M = 1.0
SERVICES = ("svc0", "svc1")
VRAM = (1024, 1024)


def _config(folder: Path) -> Path:
    services = {
        name: fake_service_entry(vram, 10, 0.1, 0.02, free_port())
        for name, vram in zip(SERVICES, VRAM, strict=True)
    }
    doc: dict[str, Any] = {
        "state_dir": str(folder / "state"),
        "gpu": {
            "backend": "sim",
            "reserve_mib": 0,
            "settle_timeout_s": 5,
            "sim": {"total_mib": 24576, "reclaim_lag_s": 0.0},
        },
        "services": services,
        "phases": {"both": list(SERVICES)},
    }
    return write_config(folder, doc)


def _prepare(ctx: Ctx, size: int) -> tuple[Path, float]:
    """A state directory with ``size`` events and both services running; (config, gen s)."""
    folder = ctx.folder(f"recovery-{size}")
    path = _config(folder)
    (folder / "state").mkdir()
    began = time.perf_counter()
    generate_log(folder / "state" / "gpusm.db", size, SERVICES, VRAM)
    generated = time.perf_counter() - began
    coordinator = Coordinator.from_config(path, monitor=False)
    try:
        coordinator.enter_phase("both", client="w1", timeout=60)
    finally:
        coordinator.close(stop_services=False)
    return path, generated


def _open_once(path: Path) -> tuple[float, list[str]]:
    began = time.perf_counter()
    coordinator = Coordinator.from_config(path, monitor=False)
    took = time.perf_counter() - began
    try:
        found = coordinator.events(
            EventQuery(stream=COORDINATOR_STREAM, types=["Recovered"], newest_first=True, limit=1)
        )
        corrections = list(found[0].data.get("corrections", [])) if found else []
        states = {s.name: s.state for s in coordinator.status().services}
    finally:
        coordinator.close(stop_services=False)
    if any(state != "healthy" for state in states.values()):
        raise RuntimeError(f"recovery did not adopt the running services: {states}")
    return took, corrections


def _stop_services(path: Path) -> None:
    coordinator = Coordinator.from_config(path, monitor=False)
    coordinator.close(stop_services=True)


def dict_fold(events: Sequence[NewEvent]) -> tuple[State, int]:
    """The baseline replay: the same transition table as a dict; (state, version)."""
    table: dict[tuple[State, str], State | None] = {
        (src, trigger): dest for trigger, sources, dest in TRANSITIONS for src in sources
    }
    triggers = {
        name: cls.TRIGGER for name, cls in EVENT_TYPES.items() if issubclass(cls, ServiceEvent)
    }
    state, version = State.STOPPED, 0
    for event in events:
        trigger = triggers.get(event.type)
        if trigger is not None:
            dest = table[(state, trigger)]  # KeyError = an illegal move in the log
            if dest is not None:
                state = dest
        version = event.version
    return state, version


def _replay(path: Path, reps: int) -> dict[str, Any]:
    """Read every event of the store behind ``path`` and fold it both ways."""
    db = path.parent / "state" / "gpusm.db"
    store = SqlEventStore(f"sqlite:///{db}")
    try:
        began = time.perf_counter()
        events = store.read()
        read_s = time.perf_counter() - began
    finally:
        store.close()
    streams: dict[str, list[NewEvent]] = defaultdict(list)
    for event in events:
        if event.stream != COORDINATOR_STREAM:
            streams[event.stream].append(event)
    folded = sum(len(v) for v in streams.values())
    gpusm_s: list[float] = []
    base_s: list[float] = []
    for _ in range(reps):
        began = time.perf_counter()
        machines = {name: ServiceMachine.fold(name, evs) for name, evs in streams.items()}
        gpusm_s.append(time.perf_counter() - began)
        began = time.perf_counter()
        plain = {name: dict_fold(evs) for name, evs in streams.items()}
        base_s.append(time.perf_counter() - began)
        for name, machine in machines.items():
            if (machine.state, machine.version) != plain[name]:
                raise RuntimeError(f"the two folds disagree on {name}")
    return {
        "events_read": len(events),
        "read_s": read_s,
        "service_events_folded": folded,
        "fold_s": gpusm_s,
        "dict_fold_s": base_s,
    }


def run(ctx: Ctx) -> list[Row]:
    """Prepare each log length, time recovery round-robin, then time a full replay."""
    sizes = [1_000, 100_000] if ctx.quick else [1_000, 100_000, 1_000_000]
    reps = 5 if ctx.quick else 11
    paths: dict[int, Path] = {}
    generated: dict[int, float] = {}
    times: dict[int, list[float]] = {n: [] for n in sizes}
    corrections: dict[int, list[str]] = {}
    try:
        for n in sizes:
            ctx.log(f"  generating {n} events and starting the services")
            paths[n], generated[n] = _prepare(ctx, n)
        for n in sizes:  # one unmeasured open each: page cache and imports warm
            _open_once(paths[n])
        for rep in range(reps):
            order = sizes if rep % 2 == 0 else list(reversed(sizes))
            for n in order:
                took, corrections[n] = _open_once(paths[n])
                times[n].append(took)
        replay = _replay(paths[100_000], 1 if ctx.quick else 3)
    finally:
        for path in paths.values():
            try:
                _stop_services(path)
            except Exception as exc:  # the guard kills what is left; say why here
                ctx.log(f"  could not stop the services of {path}: {exc!r}")
    base = median(times[sizes[0]])
    rows = [
        Row(
            figure=f"2. Recovery to serving, {sizes[0]:,} events",
            gpusm=ms(base),
            baseline="(reference)",
            ratio=None,
            goal="—",
            met=None,
            details={"times_s": times[sizes[0]], "generate_s": generated[sizes[0]]},
        )
    ]
    for n in sizes[1:]:
        m = median(times[n])
        rows.append(
            Row(
                figure=f"2. Recovery to serving, {n:,} events",
                gpusm=ms(m),
                baseline=f"{sizes[0]:,} events: {ms(base)}",
                ratio=m / base,
                goal=f"≤ {GOAL_RATIO}x the {sizes[0]:,} case",
                met=m / base <= GOAL_RATIO,
                details={
                    "times_s": times[n],
                    "generate_s": generated[n],
                    "corrections": corrections[n],
                },
            )
        )
    per_m = median(replay["fold_s"]) / replay["service_events_folded"] * 1e6
    base_per_m = median(replay["dict_fold_s"]) / replay["service_events_folded"] * 1e6
    read_per_m = replay["read_s"] / replay["events_read"] * 1e6
    rows.append(
        Row(
            figure=(
                f"2. Full replay (ServiceMachine.fold), per 1M events "
                f"(measured on {replay['service_events_folded']:,})"
            ),
            gpusm=f"{per_m:.2f} s (+ reading them: {read_per_m:.1f} s)",
            baseline=f"dict-table fold {base_per_m:.2f} s",
            ratio=per_m / base_per_m,
            goal=f"≤ {GOAL_FOLD_S_PER_M:g} s per 1M",
            met=per_m <= GOAL_FOLD_S_PER_M,
            details=replay,
        )
    )
    return rows
