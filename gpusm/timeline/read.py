"""Reading just enough of the log for a timeline window, however long the log is.

Folding the whole log for "the last 15 minutes" grows with the daemon's age. With a
``since``, :func:`read_timeline` reads instead the window's events and, per service,
the few events before it that say what was running when the window opened: the
service's last event before ``since`` (its state then) and, if that state holds
memory, the event that started the instance, its last park (what it kept) and the
last learned peak. A handful of indexed reads per service; the result is what folding
the whole log gives (tests/test_timeline.py proves it window by window).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from datetime import datetime

from gpusm.domain.events import COORDINATOR_STREAM, RecordedEvent
from gpusm.domain.states import ACTIVE_STATES
from gpusm.ports import EventQuery
from gpusm.timeline.fold import TIMELINE_TYPES, Timeline, build_timeline

__all__ = ["Reader", "read_timeline"]

Reader = Callable[[EventQuery], Sequence[RecordedEvent]]
_ACTIVE = frozenset(s.value for s in ACTIVE_STATES)
# How many start-like events to look back through for the one that opened an instance
# (an Adopted of a service already running opens nothing).
_OPENERS_LOOKBACK = 20
# A service's newest events before the window: its state then, and the step before.
_RECENT = 8


def _last(
    read: Reader, stream: str, types: Sequence[str], before: datetime
) -> RecordedEvent | None:
    found = read(EventQuery(stream=stream, types=types, until=before, newest_first=True, limit=1))
    return found[0] if found else None


def _prefix(read: Reader, name: str, since: datetime) -> list[RecordedEvent]:
    """What ``name`` was doing at ``since``, as the few events that say it."""
    picked: dict[int, RecordedEvent] = {}
    peak = _last(read, name, ["VramObserved"], since)
    if peak is not None:
        picked[peak.seq] = peak
    recent = read(
        EventQuery(stream=name, types=TIMELINE_TYPES, until=since, newest_first=True, limit=_RECENT)
    )
    if not recent or recent[0].to_state not in _ACTIVE:
        return list(picked.values())
    openers = read(
        EventQuery(
            stream=name,
            types=["StartRequested", "Adopted"],
            until=since,
            newest_first=True,
            limit=_OPENERS_LOOKBACK,
        )
    )
    opener = next((e for e in openers if e.from_state not in _ACTIVE), None)
    if opener is None:
        return list(picked.values())  # no start in reach: seen from the window on only
    picked[opener.seq] = opener
    # Its last park says what it kept parked; its last few events say its state at
    # ``since`` and, when draining, what it held before.
    parked = _last(read, name, ["Parked"], since)
    for event in [*recent, *([parked] if parked else [])]:
        if event.seq > opener.seq:
            picked[event.seq] = event
    return list(picked.values())


def read_timeline(
    read: Reader,
    *,
    services: Iterable[str],
    now: datetime,
    since: datetime | None = None,
    until: datetime | None = None,
    declared: Mapping[str, int] | None = None,
    device: int | None = None,
) -> Timeline:
    """:func:`~gpusm.timeline.fold.build_timeline` over the events ``read`` returns,
    reading only what the window needs (see the module docstring). ``services`` are
    the streams to look back for (the configured services; streams seen in the
    window are added)."""
    if since is None:
        events = list(read(EventQuery(types=TIMELINE_TYPES, until=until)))
    else:
        window = list(read(EventQuery(types=TIMELINE_TYPES, since=since, until=until)))
        names = (set(services) | {e.stream for e in window}) - {COORDINATOR_STREAM}
        before = [e for name in sorted(names) for e in _prefix(read, name, since)]
        # The devices' sizes, as the last recovery saw them.
        recovered = _last(read, COORDINATOR_STREAM, ["Recovered"], since)
        before += [recovered] if recovered else []
        events = sorted({e.seq: e for e in [*before, *window]}.values(), key=_seq)
    timeline = build_timeline(
        events, now=now, since=since, until=until, declared=declared, device=device
    )
    if since is not None:
        first = read(EventQuery(limit=1))
        timeline = replace(timeline, log_start=first[0].at if first else None)
    return timeline


def _seq(event: RecordedEvent) -> int:
    return event.seq
