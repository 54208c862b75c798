"""Figure 1: a durable append, gpusm's event store against raw ``sqlite3`` doing the same.

gpusm: ``SqlEventStore.append([one event])`` — ``BEGIN IMMEDIATE``, read the stream head,
insert the event, upsert ``stream_heads``, ``COMMIT`` — in WAL mode, ``synchronous=FULL``.

Baseline: the standard library's ``sqlite3`` on a file with the same schema and the same
settings (WAL, ``synchronous=FULL``, ``BEGIN IMMEDIATE``, one row per transaction),
inserting the same row (JSON-encoding its data and time as gpusm does) without the
projection. Blocks of appends alternate between the two so that both see the same
machine; the figure is the median over blocks of gpusm's throughput over raw's.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from benchmarks.common import Ctx, Row, median, ms
from gpusm.domain.events import NewEvent
from gpusm.store.sql import SqlEventStore

__all__ = ["RawAppender", "new_event", "run"]

GOAL_RATIO = 0.5
_DATA = {"used_mib": 4096, "peak_mib": 4096, "free_mib": 20480, "gpu": 0}


def new_event(stream: str, version: int) -> NewEvent:
    """The event both sides append: a small service event with typical data."""
    return NewEvent(
        stream=stream,
        version=version,
        type="VramObserved",
        at=datetime.now(UTC),
        from_state="healthy",
        to_state="healthy",
        data=_DATA,
    )


class RawAppender:
    """The baseline: one ``sqlite3`` connection, one row per ``BEGIN IMMEDIATE`` transaction."""

    _SQL = (
        "INSERT INTO events (stream, version, type, from_state, to_state, at, data) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)"
    )

    def __init__(self, path: Path) -> None:
        # The same schema as gpusm's (created by the store itself), then left to sqlite3.
        SqlEventStore(f"sqlite:///{path}").close()
        self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._conn.execute("PRAGMA busy_timeout = 5000")
        self._conn.execute("PRAGMA journal_mode = WAL")
        self._conn.execute("PRAGMA synchronous = FULL")

    def append(self, event: NewEvent) -> None:
        """Insert ``event`` in its own durable transaction."""
        row = (
            event.stream,
            event.version,
            event.type,
            event.from_state,
            event.to_state,
            event.at.isoformat(timespec="microseconds"),
            json.dumps(dict(event.data), separators=(",", ":")),
        )
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            self._conn.execute(self._SQL, row)
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    def close(self) -> None:
        """Close the connection."""
        self._conn.close()


def time_block(fn: Callable[[int], object], start: int, count: int) -> float:
    """Seconds that ``fn(i)`` takes for ``i`` in ``start .. start+count-1``."""
    began = time.perf_counter()
    for i in range(start, start + count):
        fn(i)
    return time.perf_counter() - began


def run(ctx: Ctx) -> list[Row]:
    """Measure both, interleaved; store raw's per-append time for figure 3."""
    folder = ctx.folder("append")
    rounds, block = (4, 100) if ctx.quick else (12, 200)
    store = SqlEventStore(f"sqlite:///{folder / 'gpusm.db'}")
    raw = RawAppender(folder / "raw.db")
    try:
        settings = store.settings()
        # Warm both up (connection pool, statement caches, first WAL frames).
        time_block(lambda i: store.append([new_event("bench", i)]), 1, 20)
        time_block(lambda i: raw.append(new_event("bench", i)), 1, 20)
        version = 21
        g_ops: list[float] = []
        r_ops: list[float] = []
        ratios: list[float] = []
        for r in range(rounds):
            sides = [("gpusm", g_ops), ("raw", r_ops)]
            if r % 2:
                sides.reverse()
            took: dict[str, float] = {}
            for name, sink in sides:
                if name == "gpusm":
                    dt = time_block(lambda i: store.append([new_event("bench", i)]), version, block)
                else:
                    dt = time_block(lambda i: raw.append(new_event("bench", i)), version, block)
                took[name] = dt
                sink.append(block / dt)
            version += block
            ratios.append(took["raw"] / took["gpusm"])
    finally:
        store.close()
        raw.close()
    g_tput, r_tput, ratio = median(g_ops), median(r_ops), median(ratios)
    ctx.shared["raw_append_s"] = 1.0 / r_tput
    ctx.shared["gpusm_append_s"] = 1.0 / g_tput
    return [
        Row(
            figure="1. Durable append (1 event/txn, WAL+FULL)",
            gpusm=f"{g_tput:.0f}/s ({ms(1 / g_tput, 2)})",
            baseline=f"raw sqlite3 {r_tput:.0f}/s ({ms(1 / r_tput, 2)})",
            ratio=ratio,
            goal=f"≥ {GOAL_RATIO} (throughput ratio)",
            met=ratio >= GOAL_RATIO,
            details={
                "rounds": rounds,
                "appends_per_block": block,
                "gpusm_per_s": g_ops,
                "raw_per_s": r_ops,
                "ratio_per_round": ratios,
                "settings": settings,
            },
        )
    ]
