"""The rules every event store follows, checked by the same functions in each store.

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
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from gpusm.domain.events import NewEvent
from gpusm.errors import ConcurrencyConflict, StoreError
from gpusm.ports import EventQuery

__all__ = [
    "ANY_EVENT",
    "check_shape",
    "event_where",
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


def event_where(index: int, event: NewEvent) -> str:
    """How error messages name the ``index``-th event of a batch."""
    return f"event {index} ({event.type!r} on stream {event.stream!r})"


def check_shape(events: Sequence[NewEvent]) -> None:
    """Refuse events that no store could record: empty names, versions below 1, naive times."""
    for i, event in enumerate(events):
        where = event_where(i, event)
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
