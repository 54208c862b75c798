"""The in-memory event store, and the rules every event store follows.

:class:`MemoryEventStore` is the reference implementation of
:class:`gpusm.ports.EventStore`: the SQLite store (``gpusm.store.sql``) checks batches
and queries with the same functions defined here, and one contract test suite runs
against both. The rules:

- A batch is appended whole or not at all. Within it, each stream's versions must run
  on from the stream's head with no gap: a version already taken, or one that skips
  ahead, raises :class:`~gpusm.errors.ConcurrencyConflict`.
- ``seq`` is global, starts at 1 and increases by one per event.
- Times must be timezone-aware; they come back as UTC. ``data`` must be JSON and comes
  back as a fresh JSON copy (tuples become lists).
- Queries: ``since <= at < until``, ``seq > after_seq``, results in ``seq`` order (or
  reversed with ``newest_first``, so ``limit`` keeps the newest). An empty ``types``
  list matches nothing.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from gpusm.domain.events import NewEvent, RecordedEvent
from gpusm.errors import ConcurrencyConflict, StoreError
from gpusm.ports import EventQuery, StreamHead

__all__ = [
    "ANY_EVENT",
    "MemoryEventStore",
    "check_shape",
    "check_versions",
    "json_copy",
    "query_types",
    "require_aware",
    "validate_query",
]


# The query that matches every event (the default of ``read``).
ANY_EVENT = EventQuery()


def require_aware(at: datetime, what: str) -> datetime:
    """``at`` in UTC; StoreError if it is naive (its zone would be a guess)."""
    if not isinstance(at, datetime) or at.tzinfo is None or at.utcoffset() is None:
        raise StoreError(f"{what} must be a timezone-aware datetime, got {at!r}")
    return at.astimezone(UTC)


def json_copy(data: Any, where: str) -> dict[str, Any]:
    """A JSON round-trip copy of ``data``; StoreError naming ``where`` if it is not JSON."""
    try:
        value = json.loads(json.dumps(dict(data), allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise StoreError(f"{where}: data is not JSON-serialisable ({exc})") from exc
    assert isinstance(value, dict)
    return value


def _where(index: int, event: NewEvent) -> str:
    return f"event {index} ({event.type!r} on stream {event.stream!r})"


def check_shape(events: Sequence[NewEvent]) -> None:
    """Refuse events that no store could record: empty names, versions below 1, naive times."""
    for i, event in enumerate(events):
        where = _where(i, event)
        if not isinstance(event.stream, str) or not event.stream:
            raise StoreError(f"{where}: stream must be a non-empty string")
        if not isinstance(event.type, str) or not event.type:
            raise StoreError(f"{where}: type must be a non-empty string")
        if isinstance(event.version, bool) or not isinstance(event.version, int):
            raise StoreError(f"{where}: version must be an integer, got {event.version!r}")
        if event.version < 1:
            raise StoreError(f"{where}: version must be 1 or more, got {event.version}")
        require_aware(event.at, f"{where}: at")


def check_versions(events: Sequence[NewEvent], head_version: Callable[[str], int]) -> None:
    """ConcurrencyConflict unless each stream's versions run on from its head (0 if new)."""
    expected: dict[str, int] = {}
    for event in events:
        want = expected.get(event.stream)
        if want is None:
            want = head_version(event.stream) + 1
        if event.version < want:
            raise ConcurrencyConflict(event.stream, event.version)
        if event.version > want:
            conflict = ConcurrencyConflict(event.stream, event.version)
            # The stock message says "already has"; for a gap that would be false.
            conflict.args = (
                f"stream {event.stream!r} is at version {want - 1}, so the next event must be "
                f"version {want}, not {event.version}; re-read and retry",
            )
            raise conflict
        expected[event.stream] = want + 1


def query_types(query: EventQuery) -> list[str] | None:
    """The type filter as a list (a bare string counts as one type), or None for any."""
    if query.types is None:
        return None
    if isinstance(query.types, str):
        return [query.types]
    return list(query.types)


def validate_query(query: EventQuery) -> tuple[datetime | None, datetime | None]:
    """StoreError for a query that means nothing; returns ``since`` and ``until`` in UTC."""
    if query.limit is not None and query.limit < 0:
        raise StoreError(f"limit must be 0 or more, got {query.limit}")
    if query.after_seq < 0:
        raise StoreError(f"after_seq must be 0 or more, got {query.after_seq}")
    since = None if query.since is None else require_aware(query.since, "since")
    until = None if query.until is None else require_aware(query.until, "until")
    return since, until


class MemoryEventStore:
    """An event store in a list: thread-safe, same semantics as SQLite, gone on exit."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._log: list[RecordedEvent] = []
        self._heads: dict[str, StreamHead] = {}
        self._closed = False

    def append(self, events: Sequence[NewEvent]) -> list[RecordedEvent]:
        """Append atomically; a taken or skipped version raises ConcurrencyConflict."""
        batch = list(events)
        check_shape(batch)
        copies = [json_copy(e.data, _where(i, e)) for i, e in enumerate(batch)]
        with self._lock:
            self._check_open()
            check_versions(batch, self._head_version)
            recorded = []
            for event, data in zip(batch, copies, strict=True):
                new = RecordedEvent(
                    stream=event.stream,
                    version=event.version,
                    type=event.type,
                    at=event.at.astimezone(UTC),
                    from_state=event.from_state,
                    to_state=event.to_state,
                    data=data,
                    seq=len(self._log) + 1,
                )
                self._log.append(new)
                recorded.append(new)
                old = self._heads.get(new.stream)
                state = new.to_state if new.to_state is not None else (old.state if old else None)
                self._heads[new.stream] = StreamHead(
                    stream=new.stream, version=new.version, state=state, last_seq=new.seq, at=new.at
                )
            return [_fresh(e) for e in recorded]

    def read(self, query: EventQuery = ANY_EVENT) -> list[RecordedEvent]:
        """Events matching ``query``, in ``seq`` order (or newest first)."""
        since, until = validate_query(query)
        types = query_types(query)
        with self._lock:
            self._check_open()
            # seq n sits at index n - 1, so after_seq is a slice.
            candidates = self._log[query.after_seq :]
        found = [
            e
            for e in candidates
            if (query.stream is None or e.stream == query.stream)
            and (types is None or e.type in types)
            and (since is None or e.at >= since)
            and (until is None or e.at < until)
        ]
        if query.newest_first:
            found.reverse()
        if query.limit is not None:
            found = found[: query.limit]
        return [_fresh(e) for e in found]

    def heads(self) -> dict[str, StreamHead]:
        """Latest version and state of every stream."""
        with self._lock:
            self._check_open()
            return dict(self._heads)

    def close(self) -> None:
        """Refuse further use; idempotent."""
        with self._lock:
            self._closed = True

    def _head_version(self, stream: str) -> int:
        head = self._heads.get(stream)
        return 0 if head is None else head.version

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError("the event store is closed")


def _fresh(event: RecordedEvent) -> RecordedEvent:
    # Callers get their own copy of data, so mutating it cannot rewrite history.
    return replace(event, data=json.loads(json.dumps(event.data)))
