"""The in-memory event store: the reference implementation of :class:`gpusm.ports.EventStore`.

It follows the rules in :mod:`gpusm.store.validation` with the same checks as the
SQLite store (``gpusm.store.sql``), and one contract test suite runs against both.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC

from gpusm.domain.events import NewEvent, RecordedEvent
from gpusm.errors import StoreError
from gpusm.ports import EventQuery, StreamHead
from gpusm.store.validation import (
    ANY_EVENT,
    check_shape,
    check_versions,
    event_where,
    json_copy,
    query_types,
    validate_query,
)

__all__ = ["MemoryEventStore"]


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
        copies = [json_copy(e.data, event_where(i, e)) for i, e in enumerate(batch)]
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
