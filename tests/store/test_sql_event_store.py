"""What only the SQLite store promises: its settings, cross-process safety, cheap heads, errors."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event

from gpusm.domain.events import NewEvent
from gpusm.errors import ConcurrencyConflict, StoreError
from gpusm.ports import EventQuery
from gpusm.store import SqlEventStore
from gpusm.store.schema import SCHEMA_REVISION
from tests.store.store_children import Children

T0 = datetime(2026, 1, 31, tzinfo=UTC)


def ev(stream: str, version: int, to: str | None = "healthy") -> NewEvent:
    return NewEvent(stream, version, "VramObserved", T0 + timedelta(seconds=version), None, to)


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'sub' / 'dir' / 'gpusm.db'}"


@pytest.fixture
def store(url: str) -> Iterator[SqlEventStore]:
    s = SqlEventStore(url)
    yield s
    s.close()


# ---------------------------------------------------------------- settings
def test_creates_missing_parent_folders(url: str, store: SqlEventStore) -> None:
    assert Path(url.removeprefix("sqlite:///")).is_file()


def test_runs_in_wal_mode_with_full_sync_and_a_busy_timeout(url: str, store: SqlEventStore) -> None:
    assert store.settings() == {
        "journal_mode": "wal",
        "synchronous": "FULL",
        "busy_timeout_ms": 5000,
        "schema_revision": SCHEMA_REVISION,
    }
    # WAL is a property of the file: a plain connection sees it too.
    raw = sqlite3.connect(url.removeprefix("sqlite:///"))
    try:
        assert raw.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    finally:
        raw.close()


def test_synchronous_and_busy_timeout_are_configurable(url: str) -> None:
    store = SqlEventStore(url, synchronous="normal", busy_timeout_ms=250)
    try:
        settings = store.settings()
        assert (settings["synchronous"], settings["busy_timeout_ms"]) == ("NORMAL", 250)
    finally:
        store.close()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"synchronous": "sometimes"}, "synchronous must be one of OFF, NORMAL, FULL, EXTRA"),
        ({"busy_timeout_ms": -1}, "busy_timeout_ms must be 0 or more"),
    ],
)
def test_refuses_bad_settings(url: str, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(StoreError, match=message):
        SqlEventStore(url, **kwargs)


# ---------------------------------------------------------------- concurrency
def test_two_threads_racing_for_the_same_version_one_wins(store: SqlEventStore) -> None:
    for version in range(1, 21):
        barrier = threading.Barrier(2)
        outcomes: list[str] = []

        def attempt(
            version: int = version,
            barrier: threading.Barrier = barrier,
            outcomes: list[str] = outcomes,
        ) -> None:
            barrier.wait(timeout=10)
            try:
                store.append([ev("s", version)])
                outcomes.append("won")
            except ConcurrencyConflict:
                outcomes.append("conflict")

        threads = [threading.Thread(target=attempt) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert sorted(outcomes) == ["conflict", "won"], f"version {version}"
    assert [e.version for e in store.read()] == list(range(1, 21))


def test_two_processes_racing_for_the_same_version_one_wins(url: str, children: Children) -> None:
    # Both open (and migrate) the brand-new file at the same time, too.
    racers = [children.start("race", url) for _ in range(2)]
    assert [children.line(p) for p in racers] == ["ready", "ready"]
    for version in range(1, 11):
        for proc in racers:
            assert proc.stdin is not None
            proc.stdin.write(f"append s {version}\n")
            proc.stdin.flush()
        answers = sorted(children.line(p) for p in racers)
        assert answers[0] == "conflict", answers
        assert answers[1] == f"won {version}", answers
    store = SqlEventStore(url)
    try:
        assert [e.version for e in store.read()] == list(range(1, 11))
        assert store.heads()["s"].version == 10
    finally:
        store.close()


def test_a_writer_waiting_past_the_busy_timeout_gets_a_clear_error(url: str) -> None:
    store = SqlEventStore(url, busy_timeout_ms=50)
    blocker = sqlite3.connect(url.removeprefix("sqlite:///"), isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")
        with pytest.raises(StoreError, match=r"locked.*another process holds the write lock"):
            store.append([ev("s", 1)])
        blocker.execute("ROLLBACK")
        store.append([ev("s", 1)])
        assert len(store.read()) == 1
    finally:
        blocker.close()
        store.close()


# ---------------------------------------------------------------- heads cost
def test_heads_cost_does_not_grow_with_the_log(url: str, store: SqlEventStore) -> None:
    """Counts SQLite VM steps of heads(): scanning the log would make them grow 1000-fold."""
    counting = False
    steps = 0

    def step() -> int:
        nonlocal steps
        steps += 1
        return 0

    @event.listens_for(store._engine, "checkout")
    def _install(dbapi_conn: Any, *_: Any) -> None:
        dbapi_conn.set_progress_handler(step if counting else None, 1)

    def heads_steps() -> int:
        nonlocal counting, steps
        counting, steps = True, 0
        heads = store.heads()
        counting = False
        assert len(heads) == 5
        return steps

    store.append([ev(f"s{i % 5}", i // 5 + 1) for i in range(100)])
    small = heads_steps()
    assert small > 0

    # Grow the log to 100,100 events fast: one executemany in one transaction, with the
    # projection moved on as an append would.
    raw = sqlite3.connect(url.removeprefix("sqlite:///"))
    with raw:
        raw.executemany(
            "INSERT INTO events (seq, stream, version, type, at, data) VALUES (?, ?, ?, ?, ?, ?)",
            (
                (
                    seq,
                    f"s{seq % 5}",
                    20 + (seq - 101) // 5 + 1,
                    "VramObserved",
                    T0.isoformat(),
                    "{}",
                )
                for seq in range(101, 100_101)
            ),
        )
        raw.execute(
            "UPDATE stream_heads SET version = version + 20000, last_seq = last_seq + 100000"
        )
    raw.close()
    assert store.read(EventQuery(newest_first=True, limit=1))[0].seq == 100_100
    assert store.heads()["s0"].version == 20_020

    assert heads_steps() == small


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("bad_url", "message"),
    [
        ("postgresql://localhost/gpusm", "only SQLite is supported"),
        ("sqlite://", "in-memory SQLite database is not supported"),
        ("sqlite:///:memory:", "in-memory SQLite database is not supported"),
        ("not a url", "is not a database URL"),
    ],
)
def test_refuses_urls_it_cannot_serve(bad_url: str, message: str) -> None:
    with pytest.raises(StoreError, match=message):
        SqlEventStore(bad_url)


def test_a_parent_that_is_a_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match=r"cannot open event store at .*file/gpusm.db"):
        SqlEventStore(f"sqlite:///{tmp_path / 'file' / 'gpusm.db'}")


def test_a_file_that_is_not_a_database_is_a_clear_error(tmp_path: Path) -> None:
    bogus = tmp_path / "gpusm.db"
    bogus.write_bytes(b"this is not sqlite, just some text that is long enough" * 40)
    with pytest.raises(StoreError, match=r"cannot open event store at .*not a database"):
        SqlEventStore(f"sqlite:///{bogus}")


def test_sql_errors_while_reading_become_store_errors(url: str, store: SqlEventStore) -> None:
    raw = sqlite3.connect(url.removeprefix("sqlite:///"))
    raw.execute("DROP TABLE stream_heads")
    raw.close()
    with pytest.raises(StoreError, match=r"cannot read heads of event store at .*no such table"):
        store.heads()
    with pytest.raises(StoreError, match=r"cannot append to event store at .*no such table"):
        store.append([ev("s", 1)])


def test_a_stale_projection_still_cannot_duplicate_a_version(
    url: str, store: SqlEventStore
) -> None:
    store.append([ev("s", 1)])
    raw = sqlite3.connect(url.removeprefix("sqlite:///"))
    with raw:
        raw.execute("DELETE FROM stream_heads")
    raw.close()
    # The projection says "new stream"; UNIQUE(stream, version) still refuses.
    with pytest.raises(ConcurrencyConflict):
        store.append([ev("s", 1)])
    assert len(store.read()) == 1
