"""The VRAM timeline: who held which device's memory when, rebuilt from the event log.

:func:`build_timeline` folds recorded events (oldest first) into :class:`Segment` s —
one per service instance per device, from the event that took the service out of
``stopped``/``failed`` (``StartRequested``, or ``Adopted`` on recovery) to the one that
brought it back (``Stopped``, ``Crashed``, ``StartFailed``, ``GaveUp``…) — and
:class:`Marker` s for the moments a report asks about (evictions, preemptions, crashes,
failed starts, parks or wakes), each with the reason the event gives.

**What the areas measure.** A segment's :class:`Step` s carry ``reserved_mib``: what
admission counted for the service on that device at that moment — ``max(declared
vram_mib, the peak learned so far)`` while it runs, what the GPU showed it keep
(``held_mib``) while parked. The log records the peak only when it grows, so it holds
no trace of momentary use; the reservation is what kept others out, and it is exact.
``declared`` gives the configured ``vram_mib`` per service; without it the learned
peak alone is used.

**The window.** Every event before ``until`` is folded (what ran at ``since`` started
before it); segments and markers outside ``[since, until]`` are dropped and the rest
clipped to it. A segment still open at the end of the log ends at ``until`` or ``now``
and is marked ``open``.

Pure: no I/O, no clock; the daemon, the CLI and the renderers share it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime

from gpusm.domain.events import COORDINATOR_STREAM, RecordedEvent
from gpusm.domain.states import ACTIVE_STATES, State

__all__ = [
    "MARKER_KINDS",
    "TIMELINE_TYPES",
    "DeviceInfo",
    "Marker",
    "Segment",
    "Step",
    "Timeline",
    "build_timeline",
]

# Event type -> the marker it draws. A failed start, park or wake is where an
# out-of-memory exit or a refused allocation shows in the log.
MARKER_KINDS: Mapping[str, str] = {
    "Evicted": "evicted",
    "Preempted": "preempted",
    "Crashed": "crashed",
    "StartFailed": "start-failed",
    "WakeFailed": "wake-failed",
    "ParkFailed": "park-failed",
    "GaveUp": "gave-up",
    "PrefetchAbandoned": "prefetch-abandoned",
    "AdmissionRefused": "oom-refused",
}
_ACTIVE = frozenset(s.value for s in ACTIVE_STATES)
# States that hold the full reservation (parking has not given it back yet).
_FULL = frozenset(s.value for s in (State.STARTING, State.HEALTHY, State.WAKING, State.PARKING))
# The event types the timeline reads; the rest (leases, proxied requests…) change nothing.
TIMELINE_TYPES: tuple[str, ...] = tuple(
    sorted(
        {
            "StartRequested",
            "HealthPassed",
            "DrainRequested",
            "Stopped",
            "Adopted",
            "VramObserved",
            "ParkRequested",
            "Parked",
            "WakeRequested",
            "Woken",
            "Reset",
            "Recovered",
            *MARKER_KINDS,
        }
    )
)


@dataclass(frozen=True)
class Step:
    """From ``at`` on (until the next step or the segment's end), the service was in
    ``state`` and held ``reserved_mib`` on the segment's device."""

    at: datetime
    state: str
    reserved_mib: int


@dataclass(frozen=True)
class Segment:
    """One instance of ``service`` on ``device``, from ``start`` to ``end``.

    ``end_type`` is the event type that ended it (``None`` while ``open``: still running
    at the end of the log or the window). ``start_seq``/``end_seq`` are the seqs of
    those events. ``steps`` are never empty; the first is at ``start``.
    """

    service: str
    device: int
    start: datetime
    end: datetime
    open: bool
    start_type: str
    end_type: str | None
    start_seq: int
    end_seq: int | None
    steps: tuple[Step, ...]

    @property
    def peak_mib(self) -> int:
        """The most it held in the segment."""
        return max(s.reserved_mib for s in self.steps)


@dataclass(frozen=True)
class Marker:
    """An event worth a mark on the chart: ``kind`` (see :data:`MARKER_KINDS`), with the
    event's own ``reason`` (or a summary of its data)."""

    at: datetime
    seq: int
    service: str
    device: int | None
    kind: str
    type: str
    reason: str


@dataclass(frozen=True)
class DeviceInfo:
    """A device the log mentions; ``total_mib`` is its size as the events imply it
    (free + used at some moment), 0 if none said."""

    index: int
    total_mib: int


@dataclass(frozen=True)
class Timeline:
    """Segments and markers in ``[since, until]``; ``services``, those they name, in the
    order the log first names them;
    ``log_start`` is the time of the first event read (None: the log was empty), so a
    window longer than the log can be drawn from where the log begins."""

    since: datetime | None
    until: datetime | None
    log_start: datetime | None
    devices: tuple[DeviceInfo, ...]
    services: tuple[str, ...]
    segments: tuple[Segment, ...]
    markers: tuple[Marker, ...]

    def for_device(self, device: int) -> Timeline:
        """Only what happened on ``device``."""
        return replace(
            self,
            devices=tuple(d for d in self.devices if d.index == device),
            segments=tuple(s for s in self.segments if s.device == device),
            markers=tuple(m for m in self.markers if m.device in (device, None)),
        )


@dataclass
class _Open:
    """A segment being folded."""

    start: RecordedEvent
    devices: tuple[int, ...]
    steps: list[Step] = field(default_factory=list)


def _devices(data: Mapping[str, object], fallback: tuple[int, ...]) -> tuple[int, ...]:
    found = data.get("devices")
    if isinstance(found, list) and found and all(isinstance(d, int) for d in found):
        return tuple(found)
    gpu = data.get("gpu")
    if isinstance(gpu, int) and not isinstance(gpu, bool):
        return (gpu,)
    return fallback


def _int(data: Mapping[str, object], key: str) -> int | None:
    value = data.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _reason(event: RecordedEvent) -> str:
    reason = event.data.get("reason")
    if isinstance(reason, str) and reason:
        return reason
    error = event.data.get("error")
    if isinstance(error, str) and error:
        return error
    brief = ", ".join(f"{k}={v}" for k, v in event.data.items() if not isinstance(v, dict | list))
    return brief or event.type


class _Folder:
    """Folds events into segments and markers (see the module docstring)."""

    def __init__(self, declared: Mapping[str, int]) -> None:
        self.declared = declared
        self.peak: dict[str, int] = {}
        self.last_devices: dict[str, tuple[int, ...]] = {}
        self.open: dict[str, _Open] = {}
        self.done: list[tuple[_Open, RecordedEvent | None]] = []
        self.markers: list[Marker] = []
        self.totals: dict[int, int] = {}
        self.order: dict[str, None] = {}

    def full(self, service: str) -> int:
        return max(self.declared.get(service, 0), self.peak.get(service, 0))

    def fold(self, event: RecordedEvent) -> None:
        data = event.data
        gpu = _int(data, "gpu")
        free, used = _int(data, "free_mib"), _int(data, "used_mib")
        if gpu is not None and free is not None and used is not None:
            self.totals[gpu] = max(self.totals.get(gpu, 0), free + used)
        if event.stream == COORDINATOR_STREAM:
            if event.type in MARKER_KINDS:
                self.mark(event, COORDINATOR_STREAM, gpu)
            return
        name = event.stream
        if event.type == "VramObserved":
            peak = _int(data, "peak_mib") or _int(data, "used_mib") or 0
            self.peak[name] = max(self.peak.get(name, 0), peak)
        current = self.open.get(name)
        if current is None and event.to_state in _ACTIVE and event.from_state not in _ACTIVE:
            devices = _devices(data, self.last_devices.get(name, (0,)))
            self.last_devices[name] = devices
            current = self.open[name] = _Open(event, devices)
            self.order.setdefault(name, None)
        if event.type in MARKER_KINDS:
            known = current.devices if current else self.last_devices.get(name)
            self.mark(event, name, known[0] if known else gpu)
        if current is None:
            return
        if event.to_state is not None and event.to_state not in _ACTIVE:
            self.done.append((self.open.pop(name), event))
            return
        state = event.to_state or (current.steps[-1].state if current.steps else "starting")
        self.step(current, event, state)

    def step(self, current: _Open, event: RecordedEvent, state: str) -> None:
        previous = current.steps[-1].reserved_mib if current.steps else None
        if state in _FULL:
            held = self.full(event.stream)
        elif event.type == "Parked":
            held = _int(event.data, "held_mib") or _int(event.data, "residual_mib") or 0
        elif previous is not None:
            held = previous  # draining: what it held until its memory is seen free
        else:
            held = self.full(event.stream)
        last = current.steps[-1] if current.steps else None
        if last is None or last.state != state or last.reserved_mib != held:
            current.steps.append(Step(event.at, state, held))

    def mark(self, event: RecordedEvent, service: str, device: int | None) -> None:
        kind = MARKER_KINDS[event.type]
        if service != COORDINATOR_STREAM:
            self.order.setdefault(service, None)
        self.markers.append(
            Marker(event.at, event.seq, service, device, kind, event.type, _reason(event))
        )


def _clip(
    folded: _Open,
    end_event: RecordedEvent | None,
    since: datetime | None,
    until: datetime | None,
    now: datetime,
) -> list[Segment]:
    start = folded.start.at
    end = end_event.at if end_event is not None else (until or now)
    is_open = end_event is None
    if until is not None and end > until:
        end, is_open = until, True
    if since is not None and start < since:
        start = since
    # Touching the window's edge is not being in it.
    if (
        end < start
        or (since is not None and end <= since)
        or (until is not None and start >= until)
    ):
        return []
    steps: list[Step] = []
    for step in folded.steps:
        if step.at <= start:
            steps = [replace(step, at=start)]  # the one in force at the window's start
        elif step.at <= end:
            steps.append(step)
    if not steps:
        return []
    return [
        Segment(
            service=folded.start.stream,
            device=device,
            start=start,
            end=end,
            open=is_open,
            start_type=folded.start.type,
            end_type=None if is_open or end_event is None else end_event.type,
            start_seq=folded.start.seq,
            end_seq=None if is_open or end_event is None else end_event.seq,
            steps=tuple(steps),
        )
        for device in folded.devices
    ]


def build_timeline(
    events: Iterable[RecordedEvent],
    *,
    now: datetime,
    since: datetime | None = None,
    until: datetime | None = None,
    declared: Mapping[str, int] | None = None,
    device: int | None = None,
) -> Timeline:
    """The timeline of ``events`` (in ``seq`` order) within ``[since, until]``.

    ``now`` ends the segments still open when ``until`` is not given; ``declared`` is
    each service's configured ``vram_mib``; ``device`` keeps only that device.
    """
    folder = _Folder(declared or {})
    log_start: datetime | None = None
    for event in events:
        if log_start is None:
            log_start = event.at
        if until is not None and event.at > until:
            continue  # not break: seq order is not strictly time order across writers
        folder.fold(event)
    finished = [*folder.done, *((o, None) for o in folder.open.values())]
    segments = [s for o, e in finished for s in _clip(o, e, since, until, now)]
    segments.sort(key=lambda s: (s.start, s.start_seq, s.device))
    markers = [
        m
        for m in folder.markers
        if (since is None or m.at >= since) and (until is None or m.at <= until)
    ]
    indexes = sorted(set(folder.totals) | {s.device for s in segments})
    shown = {s.service for s in segments} | {m.service for m in markers}
    timeline = Timeline(
        since=since,
        until=until,
        log_start=log_start,
        devices=tuple(DeviceInfo(i, folder.totals.get(i, 0)) for i in indexes),
        services=tuple(n for n in folder.order if n in shown),
        segments=tuple(segments),
        markers=tuple(markers),
    )
    return timeline if device is None else timeline.for_device(device)
