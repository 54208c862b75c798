"""Webhook delivery cursors: SQLite (the event database's ``webhook_cursors``) and memory.

Both satisfy :class:`gpusm.ports.CursorStore`. A cursor is the last event ``seq`` a
webhook's receiver acknowledged; :meth:`SqlCursorStore.save` commits (``synchronous``
as the event store) before it returns, so a daemon killed right after an
acknowledgement resends at most that one batch.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TypeVar

from sqlalchemy import Connection, select
from sqlalchemy.dialects.sqlite import insert
from sqlalchemy.exc import SQLAlchemyError

from gpusm.errors import StoreError
from gpusm.store.schema import encode_at, migrate, webhook_cursors
from gpusm.store.sql import _make_engine, _reason, _sqlite_path

__all__ = ["MemoryCursorStore", "SqlCursorStore"]

_T = TypeVar("_T")


class SqlCursorStore:
    """Cursors in the event database at ``url`` (brought to the newest schema on open)."""

    def __init__(self, url: str, *, synchronous: str = "FULL", busy_timeout_ms: int = 5000) -> None:
        self.path = _sqlite_path(url)
        self._closed = False
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot open webhook cursors at {self.path}: {exc}") from exc
        self._engine = _make_engine(url, synchronous.upper(), busy_timeout_ms)
        try:
            migrate(self._engine)
        except SQLAlchemyError as exc:
            self._engine.dispose()
            raise StoreError(f"cannot open webhook cursors at {self.path}: {_reason(exc)}") from exc
        except BaseException:
            self._engine.dispose()
            raise

    def seed(self, name: str, seq: int) -> int:
        """The cursor of ``name``, created at ``seq`` first if it has none."""

        def run(conn: Connection) -> int:
            row = {"name": name, "seq": seq, "updated_at": _now()}
            conn.execute(insert(webhook_cursors).values(row).on_conflict_do_nothing())
            found = conn.execute(
                select(webhook_cursors.c.seq).where(webhook_cursors.c.name == name)
            ).scalar_one()
            return int(found)

        return self._guard(run, "seed", write=True)

    def load(self, name: str) -> int | None:
        """The cursor of ``name``, or None if it has none."""

        def run(conn: Connection) -> int | None:
            found = conn.execute(
                select(webhook_cursors.c.seq).where(webhook_cursors.c.name == name)
            ).scalar()
            return None if found is None else int(found)

        return self._guard(run, "read")

    def save(self, name: str, seq: int) -> None:
        """Set the cursor of ``name`` to ``seq``, committed before this returns."""

        def run(conn: Connection) -> None:
            row = {"name": name, "seq": seq, "updated_at": _now()}
            stmt = insert(webhook_cursors).values(row)
            conn.execute(
                stmt.on_conflict_do_update(
                    index_elements=[webhook_cursors.c.name],
                    set_={"seq": stmt.excluded.seq, "updated_at": stmt.excluded.updated_at},
                )
            )

        self._guard(run, "save", write=True)

    def close(self) -> None:
        """Close every pooled connection; idempotent."""
        if not self._closed:
            self._closed = True
            self._engine.dispose()

    def _guard(self, fn: Callable[[Connection], _T], doing: str, *, write: bool = False) -> _T:
        if self._closed:
            raise StoreError(f"the webhook cursors at {self.path} are closed")
        try:
            with self._engine.connect() as conn:
                if write:
                    conn.execution_options(gpusm_write=True)
                with conn.begin():
                    return fn(conn)
        except SQLAlchemyError as exc:
            raise StoreError(
                f"cannot {doing} a webhook cursor at {self.path}: {_reason(exc)}"
            ) from exc


class MemoryCursorStore:
    """Cursors in a dict: the in-package fake (thread-safe; gone when the object is)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cursors: dict[str, int] = {}
        self._closed = False

    def seed(self, name: str, seq: int) -> int:
        """The cursor of ``name``, created at ``seq`` first if it has none."""
        with self._lock:
            self._check_open()
            return self._cursors.setdefault(name, seq)

    def load(self, name: str) -> int | None:
        """The cursor of ``name``, or None if it has none."""
        with self._lock:
            self._check_open()
            return self._cursors.get(name)

    def save(self, name: str, seq: int) -> None:
        """Set the cursor of ``name`` to ``seq``."""
        with self._lock:
            self._check_open()
            self._cursors[name] = seq

    def close(self) -> None:
        """Refuse further use; idempotent."""
        self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError("the webhook cursors are closed")


def _now() -> str:
    return encode_at(datetime.now(UTC), "cursor time")
