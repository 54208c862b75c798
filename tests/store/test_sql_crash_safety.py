"""SIGKILL a writer at random moments: the log stays intact, gap-free and whole-batch."""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import sqlite3
import time
from collections import Counter, defaultdict
from datetime import UTC, datetime
from pathlib import Path

from gpusm.domain.events import NewEvent
from gpusm.store import SqlEventStore
from tests.store.store_children import Children


def test_log_survives_a_writer_killed_twenty_times(tmp_path: Path, children: Children) -> None:
    db = tmp_path / "gpusm.db"
    url = f"sqlite:///{db}"
    SqlEventStore(url).close()  # migrate once, so each writer starts writing at once
    zygote = children.start("zygote", url)
    assert zygote.stdin is not None
    rng = random.Random(20260131)
    counts = []
    for _ in range(20):
        zygote.stdin.write("go\n")
        zygote.stdin.flush()
        word, pid = children.line(zygote).split()
        assert word == "ready"
        # A random moment inside the append loop (choosing when to kill, not waiting).
        time.sleep(rng.uniform(0.0, 0.05))
        os.kill(int(pid), signal.SIGKILL)
        assert children.line(zygote) == f"reaped {-signal.SIGKILL}"
        raw = sqlite3.connect(db)
        counts.append(raw.execute("SELECT count(*) FROM events").fetchone()[0])
        raw.close()
    # Every writer committed at least its first batch before it died.
    assert all(b > a for a, b in itertools.pairwise(counts)), counts

    raw = sqlite3.connect(db)
    try:
        assert raw.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        rows = raw.execute("SELECT seq, stream, version, data FROM events ORDER BY seq").fetchall()
        query = "SELECT stream, version, last_seq FROM stream_heads"
        heads = {s: (v, q) for s, v, q in raw.execute(query)}
    finally:
        raw.close()

    assert [seq for seq, *_ in rows] == list(range(1, len(rows) + 1))
    versions: dict[str, list[int]] = defaultdict(list)
    last_seq: dict[str, int] = {}
    batches: Counter[int] = Counter()
    sizes: dict[int, int] = {}
    for seq, stream, version, data in rows:
        versions[stream].append(version)
        last_seq[stream] = seq
        details = json.loads(data)
        batches[details["batch"]] += 1
        sizes[details["batch"]] = details["size"]
    assert set(heads) == set(versions)
    for stream, seen in versions.items():
        assert seen == list(range(1, len(seen) + 1)), f"stream {stream} has a gap"
        assert heads[stream] == (len(seen), last_seq[stream])
    # No batch was cut short: each batch id appears exactly as often as its size says.
    assert all(batches[b] == sizes[b] for b in batches)

    store = SqlEventStore(url)
    try:
        following = [
            NewEvent(s, len(seen) + 1, "VramObserved", datetime.now(UTC))
            for s, seen in sorted(versions.items())
        ]
        seqs = [e.seq for e in store.append(following)]
        assert seqs == list(range(len(rows) + 1, len(rows) + 1 + len(following)))
    finally:
        store.close()
