"""The SQLite event store (SQLAlchemy Core, no ORM) and its schema upgrade.

Every connection runs in WAL mode with ``synchronous=FULL`` (by default) and a busy
timeout. pysqlite's own transaction handling is switched off so that gpusm emits
``BEGIN`` itself: ``BEGIN IMMEDIATE`` for appends (the write lock is taken before the
heads are read, so two writers cannot both pass the version check) and a plain
``BEGIN`` for reads. An append inserts the events and updates ``stream_heads`` in that
one transaction.

Opening a store brings its schema up to date (:func:`gpusm.store.schema.migrate`).
Every SQLAlchemy or SQLite error leaves this module as a :class:`~gpusm.errors.StoreError`.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final, TypeVar

from sqlalchemy import Connection, Engine, create_engine, event, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, SQLAlchemyError

from gpusm.domain.events import NewEvent, RecordedEvent
from gpusm.errors import ConcurrencyConflict, StoreError
from gpusm.ports import EventQuery, StreamHead
from gpusm.store.schema import (
    SCHEMA_REVISION,
    decode_at,
    decode_data,
    encode_at,
    encode_data,
    migrate,
    read_revision,
    stream_heads,
)
from gpusm.store.schema import events as events_table
from gpusm.store.validation import (
    ANY_EVENT,
    check_shape,
    check_versions,
    query_types,
    validate_query,
)

__all__ = ["SqlEventStore", "upgrade"]

_T = TypeVar("_T")
_SYNC_MODES: Final = ("OFF", "NORMAL", "FULL", "EXTRA")


def _sqlite_path(url: str) -> Path:
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise StoreError(f"{url!r} is not a database URL (e.g. sqlite:///state/gpusm.db)") from exc
    if parsed.get_backend_name() != "sqlite":
        raise StoreError(f"{url!r}: only SQLite is supported (sqlite:///PATH)")
    if not parsed.database or parsed.database == ":memory:":
        raise StoreError(
            f"{url!r}: an in-memory SQLite database is not supported; "
            "give a file path, or use MemoryEventStore"
        )
    return Path(parsed.database)


def _reason(exc: BaseException) -> str:
    orig = exc.orig if isinstance(exc, DBAPIError) else exc
    message = str(orig).strip() or type(orig).__name__
    if "locked" in message or "busy" in message:
        message += " (another process holds the write lock; raise busy_timeout_ms or retry)"
    return message


class SqlEventStore:
    """An :class:`~gpusm.ports.EventStore` in one SQLite file, safe across threads and processes.

    ``synchronous`` is SQLite's durability level (FULL survives power loss in WAL mode);
    ``busy_timeout_ms`` bounds how long a writer waits for another's lock; with
    ``upgrade=False`` an out-of-date schema is an error instead of being migrated.
    """

    def __init__(
        self,
        url: str,
        *,
        synchronous: str = "FULL",
        busy_timeout_ms: int = 5000,
        upgrade: bool = True,
    ) -> None:
        self.url = url
        self.path = _sqlite_path(url)
        sync = synchronous.upper()
        if sync not in _SYNC_MODES:
            raise StoreError(
                f"synchronous must be one of {', '.join(_SYNC_MODES)}, got {synchronous!r}"
            )
        if busy_timeout_ms < 0:
            raise StoreError(f"busy_timeout_ms must be 0 or more, got {busy_timeout_ms}")
        self._closed = False
        # One connection for appends, serialised by this lock (readers use the pool).
        self._writer_lock = threading.Lock()
        self._writer: Any = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot open event store at {self.path}: {exc}") from exc
        self._engine = _make_engine(url, sync, busy_timeout_ms)
        try:
            if upgrade:
                migrate(self._engine)
            else:
                revision = self._guard(read_revision, "open")
                if revision != SCHEMA_REVISION:
                    raise StoreError(
                        f"event store at {self.path} has schema revision {revision or 'none'}, "
                        f"this gpusm needs {SCHEMA_REVISION}; run `gpusm db upgrade`"
                    )
        except SQLAlchemyError as exc:
            self._engine.dispose()
            raise StoreError(f"cannot open event store at {self.path}: {_reason(exc)}") from exc
        except BaseException:
            self._engine.dispose()
            raise

    # ------------------------------------------------------------ EventStore
    def append(self, events: Sequence[NewEvent]) -> list[RecordedEvent]:
        """Append atomically under ``BEGIN IMMEDIATE``; a taken or skipped version conflicts."""
        batch = list(events)
        check_shape(batch)
        rows = [
            {
                "stream": e.stream,
                "version": e.version,
                "type": e.type,
                "from_state": e.from_state,
                "to_state": e.to_state,
                "at": encode_at(e.at),
                "data": encode_data(e.data, f"event {i} ({e.type!r} on stream {e.stream!r})"),
            }
            for i, e in enumerate(batch)
        ]
        if not rows:
            self._check_open()
            return []
        with self._writer_lock:
            self._check_open()
            try:
                seqs = self._append_rows(batch, rows)
            except sqlite3.IntegrityError as exc:
                # Only reachable if stream_heads lags the log; the UNIQUE index still holds.
                raise ConcurrencyConflict(batch[0].stream, batch[0].version) from exc
            except (sqlite3.Error, SQLAlchemyError) as exc:
                raise StoreError(
                    f"cannot append to event store at {self.path}: {_reason(exc)}"
                ) from exc
        return [_recorded({**row, "seq": seq}) for row, seq in zip(rows, seqs, strict=True)]

    def _append_rows(self, batch: list[NewEvent], rows: list[dict[str, Any]]) -> list[int]:
        """One ``BEGIN IMMEDIATE`` transaction on the writer connection (lock held)."""
        # The append path talks to the driver directly: SQLAlchemy's per-statement
        # machinery cost more than the fsync, and appends are the hot path.
        if self._writer is None:
            self._writer = self._engine.raw_connection()
        cursor = self._writer.cursor()
        try:
            cursor.execute("BEGIN IMMEDIATE")
            try:
                streams = sorted({str(r["stream"]) for r in rows})
                found = cursor.execute(
                    "SELECT stream, version FROM stream_heads WHERE stream IN "
                    f"({', '.join('?' * len(streams))})",
                    streams,
                ).fetchall()
                known: dict[str, int] = {str(row[0]): int(row[1]) for row in found}
                check_versions(batch, lambda stream: known.get(stream, 0))
                seqs = _insert_events(cursor, rows)
                _update_heads(cursor, rows, seqs)
                cursor.execute("COMMIT")
            except BaseException:
                cursor.execute("ROLLBACK")
                raise
        finally:
            cursor.close()
        return seqs

    def read(self, query: EventQuery = ANY_EVENT) -> list[RecordedEvent]:
        """Events matching ``query``, in ``seq`` order (or newest first)."""
        since, until = validate_query(query)
        stmt = select(events_table).where(events_table.c.seq > query.after_seq)
        if query.stream is not None:
            stmt = stmt.where(events_table.c.stream == query.stream)
        types = query_types(query)
        if types is not None:
            stmt = stmt.where(events_table.c.type.in_(types))
        if since is not None:
            stmt = stmt.where(events_table.c.at >= encode_at(since))
        if until is not None:
            stmt = stmt.where(events_table.c.at < encode_at(until))
        stmt = stmt.order_by(
            events_table.c.seq.desc() if query.newest_first else events_table.c.seq
        )
        if query.limit is not None:
            stmt = stmt.limit(query.limit)

        def run(conn: Connection) -> list[RecordedEvent]:
            return [_recorded(row) for row in conn.execute(stmt).mappings()]

        return self._guard(run, "read")

    def heads(self) -> dict[str, StreamHead]:
        """Every stream's head, read from the ``stream_heads`` projection (never the log)."""

        def run(conn: Connection) -> dict[str, StreamHead]:
            return {
                row.stream: StreamHead(
                    stream=row.stream,
                    version=row.version,
                    state=row.state,
                    last_seq=row.last_seq,
                    at=decode_at(row.at),
                )
                for row in conn.execute(select(stream_heads))
            }

        return self._guard(run, "read heads of")

    def close(self) -> None:
        """Close every pooled connection; idempotent."""
        with self._writer_lock:
            if not self._closed:
                self._closed = True
                if self._writer is not None:
                    self._writer.close()
                    self._writer = None
                self._engine.dispose()

    # ------------------------------------------------------------ diagnostics
    def settings(self) -> dict[str, Any]:
        """The SQLite settings in effect on a live connection (for tests and ``doctor``)."""

        def run(conn: Connection) -> dict[str, Any]:
            sync = int(conn.exec_driver_sql("PRAGMA synchronous").scalar_one())
            return {
                "journal_mode": str(conn.exec_driver_sql("PRAGMA journal_mode").scalar_one()),
                "synchronous": _SYNC_MODES[sync] if 0 <= sync < len(_SYNC_MODES) else str(sync),
                "busy_timeout_ms": int(conn.exec_driver_sql("PRAGMA busy_timeout").scalar_one()),
                "schema_revision": read_revision(conn),
            }

        return self._guard(run, "inspect")

    # ------------------------------------------------------------ internals
    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"the event store at {self.path} is closed")

    @contextmanager
    def _connect(self, *, write: bool = False) -> Iterator[Connection]:
        self._check_open()
        with self._engine.connect() as conn:
            if write:
                conn.execution_options(gpusm_write=True)
            with conn.begin():
                yield conn

    def _guard(self, fn: Callable[[Connection], _T], doing: str) -> _T:
        try:
            with self._connect() as conn:
                return fn(conn)
        except SQLAlchemyError as exc:
            raise StoreError(f"cannot {doing} event store at {self.path}: {_reason(exc)}") from exc


def _switch_to_wal(cursor: Any, busy_timeout_ms: int) -> None:
    """``PRAGMA journal_mode = WAL``, retried while another process is converting the file.

    SQLite answers "database is locked" at once, without calling the busy handler, when
    two connections race to change the journal mode of a new file.
    """
    deadline = time.monotonic() + busy_timeout_ms / 1000
    delay = 0.005
    while True:
        try:
            cursor.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc):
                raise
            if time.monotonic() >= deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.1)


def _make_engine(url: str, synchronous: str, busy_timeout_ms: int) -> Engine:
    # The writer connection is shared by threads (under the store's lock).
    engine = create_engine(url, connect_args={"check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # We emit BEGIN ourselves (see _on_begin); pysqlite's implicit BEGIN would be DEFERRED.
        dbapi_conn.isolation_level = None
        cursor = dbapi_conn.cursor()
        try:
            # busy_timeout first: switching to WAL may itself wait for another process.
            cursor.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
            _switch_to_wal(cursor, busy_timeout_ms)
            cursor.execute(f"PRAGMA synchronous = {synchronous}")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # IMMEDIATE takes the write lock now, so check-then-insert cannot interleave.
        immediate = conn.get_execution_options().get("gpusm_write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


# Under BEGIN IMMEDIATE nobody else can insert, so the batch's seqs are known up front:
# one executemany instead of a RETURNING round trip per row.
_LAST_SEQ = (
    "SELECT max(coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'events'), 0), "
    "coalesce((SELECT max(seq) FROM events), 0))"
)
_UPSERT_HEAD = (
    "INSERT INTO stream_heads (stream, version, state, last_seq, at) VALUES (?, ?, ?, ?, ?) "
    "ON CONFLICT (stream) DO UPDATE SET version = excluded.version, "
    # A batch without any to_state for this stream keeps the state it had.
    "state = coalesce(excluded.state, stream_heads.state), "
    "last_seq = excluded.last_seq, at = excluded.at"
)
_INSERT = (
    "INSERT INTO events (seq, stream, version, type, from_state, to_state, at, data) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)


def _insert_events(cursor: Any, rows: list[dict[str, Any]]) -> list[int]:
    last = int(cursor.execute(_LAST_SEQ).fetchone()[0])
    seqs = list(range(last + 1, last + 1 + len(rows)))
    cursor.executemany(
        _INSERT,
        [
            (
                seq,
                r["stream"],
                r["version"],
                r["type"],
                r["from_state"],
                r["to_state"],
                r["at"],
                r["data"],
            )
            for seq, r in zip(seqs, rows, strict=True)
        ],
    )
    return seqs


def _update_heads(cursor: Any, rows: list[dict[str, Any]], seqs: Sequence[int]) -> None:
    latest: dict[str, dict[str, Any]] = {}
    for row, seq in zip(rows, seqs, strict=True):
        head = latest.setdefault(row["stream"], {"stream": row["stream"], "state": None})
        head.update(version=row["version"], last_seq=seq, at=row["at"])
        if row["to_state"] is not None:
            head["state"] = row["to_state"]
    cursor.executemany(
        _UPSERT_HEAD,
        [(h["stream"], h["version"], h["state"], h["last_seq"], h["at"]) for h in latest.values()],
    )


def _recorded(row: Any) -> RecordedEvent:
    return RecordedEvent(
        stream=row["stream"],
        version=row["version"],
        type=row["type"],
        at=decode_at(row["at"]),
        from_state=row["from_state"],
        to_state=row["to_state"],
        data=decode_data(row["data"]),
        seq=row["seq"],
    )


def upgrade(url: str) -> str:
    """Create or migrate the event store at ``url`` to the newest schema; returns its revision."""
    store = SqlEventStore(url)
    try:
        return str(store.settings()["schema_revision"])
    finally:
        store.close()
