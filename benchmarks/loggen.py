"""Fast generation of a long, realistic event log straight into gpusm's SQLite schema.

The file is first created by :class:`~gpusm.store.sql.SqlEventStore` itself (tables,
indexes, ``stream_heads`` and the Alembic stamp), then filled with ``executemany`` in
one transaction, with the projection written to match, so the store opens it without
migrating. The history is what a long-running deployment leaves: per service, cycles
of ``StartRequested → ProcessLaunched → HealthPassed → Evicted → Stopped``, one
``PhaseEntered`` per cycle on the coordinator stream, and a ``VramObserved`` only in
each service's first cycle (the learned peak rarely grows), so that "the newest event
of type X" may lie at the very start of a long stream.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

from gpusm.store.sql import SqlEventStore

__all__ = ["generate_log"]

_INSERT = (
    "INSERT INTO events (seq, stream, version, type, from_state, to_state, at, data) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
_HEADS = "INSERT INTO stream_heads (stream, version, state, last_seq, at) VALUES (?, ?, ?, ?, ?)"
# One service cycle: (type, from, to, data)
_CYCLE: tuple[tuple[str, str, str, str], ...] = (
    (
        "StartRequested",
        "stopped",
        "starting",
        '{"reason":"needed by client w1, phase p","by":"w1","prefetch":false,'
        '"gpu":0,"free_mib":20480,"used_mib":4096}',
    ),
    (
        "ProcessLaunched",
        "starting",
        "starting",
        '{"service":"%s","instance":"%032x","pid":%d,"create_time":1700000000.25}',
    ),
    ("HealthPassed", "starting", "healthy", '{"time_to_healthy_s":1.2345,"probes":17}'),
    (
        "Evicted",
        "healthy",
        "draining",
        '{"reason":"idle, priority 40, to make room for client w1, phase video","by":"w1",'
        '"for":["comfyui"],"gpu":0,"free_mib":0,"used_mib":24576}',
    ),
    (
        "Stopped",
        "draining",
        "stopped",
        '{"stop_s":0.1234,"escalated":false,"already_dead":false,"reclaim_s":0.0567,'
        '"vram_reclaimed":true,"held_mib":4096,"gpu":0,"free_mib":8192,"used_mib":16384}',
    ),
)
_OBSERVED = '{"used_mib":%d,"peak_mib":%d,"free_mib":1024}'
_PHASE = '{"client":"w1","phase":"p%d","services":["%s"],"priority":40}'


def _rows(
    total: int, services: Sequence[str], vram: Sequence[int], t0: datetime
) -> Iterator[tuple[object, ...]]:
    versions = dict.fromkeys([*services, "coordinator"], 0)
    seq = 0
    cycle = 0
    base = t0
    # Whole cycles only (so every service ends stopped), then coordinator notes to fill up.
    per_cycle = 1 + len(_CYCLE)
    while total - seq >= per_cycle + 1:
        k = cycle % len(services)
        name = services[k]
        first = cycle < len(services)
        if first and total - seq < per_cycle + 2:
            break
        stamp = (base + timedelta(milliseconds=seq)).isoformat(timespec="microseconds")
        seq += 1
        versions["coordinator"] += 1
        yield (
            seq,
            "coordinator",
            versions["coordinator"],
            "PhaseEntered",
            None,
            None,
            stamp,
            _PHASE % (k, name),
        )
        for kind, src, dst, data in _CYCLE:
            seq += 1
            versions[name] += 1
            if kind == "ProcessLaunched":
                data = data % (name, seq, 100000 + seq % 30000)
            stamp = (base + timedelta(milliseconds=seq)).isoformat(timespec="microseconds")
            yield (seq, name, versions[name], kind, src, dst, stamp, data)
            if first and kind == "HealthPassed":
                seq += 1
                versions[name] += 1
                stamp = (base + timedelta(milliseconds=seq)).isoformat(timespec="microseconds")
                doc = _OBSERVED % (vram[k], vram[k])
                yield (seq, name, versions[name], "VramObserved", dst, dst, stamp, doc)
        cycle += 1
    while seq < total:
        seq += 1
        versions["coordinator"] += 1
        stamp = (base + timedelta(milliseconds=seq)).isoformat(timespec="microseconds")
        data = json.dumps({"client": "w1", "phase": "p0"}, separators=(",", ":"))
        yield (
            seq,
            "coordinator",
            versions["coordinator"],
            "LeaseReleased",
            None,
            None,
            stamp,
            data,
        )


def generate_log(
    db: Path, total: int, services: Sequence[str], vram: Sequence[int]
) -> dict[str, int]:
    """Fill a new store at ``db`` with exactly ``total`` events; returns each stream's version.

    Event times run one millisecond apart and end before now.
    """
    SqlEventStore(f"sqlite:///{db}").close()
    t0 = datetime.now(UTC) - timedelta(milliseconds=total + 60_000)
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        # A rollback journal for the bulk load keeps it from doubling the file in the WAL;
        # the file goes back to WAL mode, as gpusm uses it, at the end.
        conn.execute("PRAGMA journal_mode = DELETE")
        conn.execute("PRAGMA synchronous = OFF")
        conn.execute("PRAGMA cache_size = -262144")  # 256 MiB: index builds stay in memory
        conn.execute("BEGIN IMMEDIATE")
        # Secondary indexes are rebuilt once after the load (from their own stored SQL,
        # so the schema stays exactly gpusm's): much faster than growing them row by row.
        indexes = conn.execute(
            "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND tbl_name = 'events' "
            "AND sql IS NOT NULL"
        ).fetchall()
        for name, _ in indexes:
            conn.execute(f'DROP INDEX "{name}"')
        conn.executemany(_INSERT, _rows(total, services, vram, t0))
        for _, sql in indexes:
            conn.execute(sql)
        heads = conn.execute(
            "SELECT e.stream, e.version, e.seq, e.at FROM events e "
            "JOIN (SELECT stream, max(seq) AS seq FROM events GROUP BY stream) m "
            "ON e.seq = m.seq"
        ).fetchall()
        versions: dict[str, int] = {}
        for stream, version, seq, at in heads:
            state = None if stream == "coordinator" else "stopped"
            conn.execute(_HEADS, (stream, version, state, seq, at))
            versions[stream] = version
        conn.execute("COMMIT")
        conn.execute("PRAGMA journal_mode = WAL")
        count = conn.execute("SELECT count(*) FROM events").fetchone()[0]
        if count != total:
            raise RuntimeError(f"generated {count} events, wanted {total}")
    finally:
        conn.close()
    return versions
