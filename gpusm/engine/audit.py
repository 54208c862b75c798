"""Questions asked of the event log: what happened, how long each state lasted, why it stopped.

Everything here reads through the :class:`~gpusm.ports.EventStore` port and computes
in memory; nothing writes. The ``data`` keys it understands (and that the coordinator
writes) are:

``reason``        a person-readable why (``"idle for 600 s"``, ``"health deadline passed"``)
``cause``         a machine-readable why (``evict``, ``preempt``, ``ttl``, ``release``, ``api``)
``by``            who asked: a client or request id, or ``api`` / ``cli`` / ``recovery``
``client``        the client whose phase request led to the event
``phase``         the phase that client entered
``free_mib``      VRAM free on the service's GPU at that moment (driver-reported)
``used_mib``      VRAM used on that GPU at that moment
``pid``           host pid of the instance (with ``create_time``, its identity)
``create_time``   the pid's create time, so a reused pid is not mistaken for ours
``container_id``  the Docker container of the instance
``caused_by``     the ``seq`` of the event that led to this one (e.g. the request)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from gpusm.domain.events import (
    Crashed,
    DrainRequested,
    Evicted,
    Parked,
    ParkFailed,
    ParkRequested,
    Preempted,
    RecordedEvent,
    Stopped,
    WakeFailed,
)
from gpusm.ports import EventQuery, EventStore

__all__ = ["Interval", "StopExplanation", "explain_stops", "history", "query_events"]

# The intents that lead to a stop (or a park): a failed park or wake becomes a stop.
_DRAINS = frozenset(
    t.type_name()
    for t in (DrainRequested, Evicted, Preempted, ParkRequested, ParkFailed, WakeFailed)
)
_STOPS = frozenset(t.type_name() for t in (Stopped, Crashed, Parked))


def query_events(
    store: EventStore,
    *,
    service: str | None = None,
    type: str | Sequence[str] | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int | None = None,
    after_seq: int = 0,
) -> list[RecordedEvent]:
    """Matching events oldest first; with ``limit``, the newest ``limit`` of them.

    ``service`` is a stream name (``coordinator`` for coordinator events); ``type`` one
    event type or several; ``since`` is inclusive and ``until`` exclusive.
    """
    types = [type] if isinstance(type, str) else (None if type is None else list(type))
    query = EventQuery(
        stream=service,
        types=types,
        since=since,
        until=until,
        after_seq=after_seq,
        limit=limit,
        # The newest `limit` events, turned back into reading order below.
        newest_first=limit is not None,
    )
    found = store.read(query)
    if limit is not None:
        found.reverse()
    return found


@dataclass(frozen=True)
class Interval:
    """A stretch of time a service spent in one state; the last one is still open."""

    state: str
    entered_at: datetime
    left_at: datetime | None
    duration_s: float | None
    entered_by: str
    reason: str | None
    seq: int

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (times as ISO-8601)."""
        return {
            "state": self.state,
            "entered_at": self.entered_at.isoformat(),
            "left_at": None if self.left_at is None else self.left_at.isoformat(),
            "duration_s": self.duration_s,
            "entered_by": self.entered_by,
            "reason": self.reason,
            "seq": self.seq,
        }


def _why(data: Mapping[str, Any]) -> str | None:
    value = data.get("reason") or data.get("cause")
    return None if value is None else str(value)


def history(store: EventStore, service: str) -> list[Interval]:
    """The service's state timeline, oldest first, with how long each state lasted.

    A new interval starts at every event whose ``to_state`` differs from the current
    state; events that leave the state as it was (launch notes, VRAM readings) do not
    split an interval. The last interval has ``left_at`` and ``duration_s`` of None.
    """
    intervals: list[Interval] = []
    for event in store.read(EventQuery(stream=service)):
        if event.to_state is None:
            continue
        current = intervals[-1] if intervals else None
        if current is not None and current.state == event.to_state:
            continue
        if current is not None:
            intervals[-1] = Interval(
                state=current.state,
                entered_at=current.entered_at,
                left_at=event.at,
                duration_s=(event.at - current.entered_at).total_seconds(),
                entered_by=current.entered_by,
                reason=current.reason,
                seq=current.seq,
            )
        intervals.append(
            Interval(
                state=event.to_state,
                entered_at=event.at,
                left_at=None,
                duration_s=None,
                entered_by=event.type,
                reason=_why(event.data),
                seq=event.seq,
            )
        )
    return intervals


@dataclass(frozen=True)
class StopExplanation:
    """One stop or crash of a service: when, why, at whose request, with how much VRAM free.

    ``requested_by`` is the drain event (DrainRequested, Evicted or Preempted) that led
    to a ``Stopped``; a crash, or a stop without a recorded drain, has None there.
    """

    seq: int
    at: datetime
    kind: str
    requested_by: str | None
    requested_at: datetime | None
    reason: str | None
    cause: str | None
    by: str | None
    phase: str | None
    free_mib: int | None
    used_mib: int | None

    def summary(self) -> str:
        """One sentence for a person."""
        verbs = {Crashed.type_name(): "crashed", Parked.type_name(): "parked"}
        verb = verbs.get(self.kind, "stopped")
        parts = [f"{self.at.isoformat()} {verb}"]
        if self.requested_by is not None:
            parts.append(f"after {self.requested_by}")
        why = ", ".join(x for x in (self.cause, self.reason) if x)
        if why:
            parts.append(f"because {why}")
        if self.by:
            parts.append(f"for {self.by}" + (f" (phase {self.phase})" if self.phase else ""))
        if self.free_mib is not None:
            parts.append(f"with {self.free_mib} MiB free")
        return " ".join(parts)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (times as ISO-8601)."""
        return {
            "seq": self.seq,
            "at": self.at.isoformat(),
            "kind": self.kind,
            "requested_by": self.requested_by,
            "requested_at": None if self.requested_at is None else self.requested_at.isoformat(),
            "reason": self.reason,
            "cause": self.cause,
            "by": self.by,
            "phase": self.phase,
            "free_mib": self.free_mib,
            "used_mib": self.used_mib,
        }


def _first(key: str, *sources: Mapping[str, Any]) -> Any:
    for source in sources:
        if source.get(key) is not None:
            return source[key]
    return None


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def _mib(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def explain_stops(store: EventStore, service: str) -> list[StopExplanation]:
    """Every ``Stopped``, ``Crashed`` and ``Parked`` of ``service``, oldest first, with its
    explanation (a park's is its ``ParkRequested``; a stop after a failed park or wake
    is explained by the failure).

    The stop's own data wins over its drain's (the stop knows the VRAM after the exit);
    a crash never borrows from an earlier drain, because nobody asked for it.
    """
    explained: list[StopExplanation] = []
    drain: RecordedEvent | None = None
    for event in store.read(EventQuery(stream=service)):
        if event.type in _DRAINS:
            drain = event
            continue
        if event.type not in _STOPS:
            continue
        asked = drain if event.type != Crashed.type_name() else None
        sources = (event.data,) if asked is None else (event.data, asked.data)
        explained.append(
            StopExplanation(
                seq=event.seq,
                at=event.at,
                kind=event.type,
                requested_by=None if asked is None else asked.type,
                requested_at=None if asked is None else asked.at,
                reason=_text(_first("reason", *sources)),
                cause=_text(_first("cause", *sources)),
                by=_text(_first("by", *sources) or _first("client", *sources)),
                phase=_text(_first("phase", *sources)),
                free_mib=_mib(_first("free_mib", *sources)),
                used_mib=_mib(_first("used_mib", *sources)),
            )
        )
        drain = None
    return explained
