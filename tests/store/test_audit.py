"""Audit queries over the log: filtered events, state timelines, and why a service stopped."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from gpusm.domain.events import (
    Crashed,
    DrainRequested,
    Evicted,
    HealthPassed,
    NewEvent,
    PhaseEntered,
    Preempted,
    ProcessLaunched,
    ServiceEvent,
    StartRequested,
    Stopped,
    VramObserved,
)
from gpusm.domain.machine import ServiceMachine
from gpusm.engine.audit import Interval, explain_stops, history, query_events
from gpusm.store import MemoryEventStore

T0 = datetime(2026, 1, 31, 12, 0, tzinfo=UTC)


class Recorder:
    """Drives a real ServiceMachine and appends what it records, at chosen offsets."""

    def __init__(self, store: MemoryEventStore) -> None:
        self.store = store
        self.machines: dict[str, ServiceMachine] = {}

    def __call__(self, service: str, at_s: float, event: ServiceEvent) -> None:
        machine = self.machines.setdefault(service, ServiceMachine(service))
        self.store.append([machine.record(event, T0 + timedelta(seconds=at_s))])


@pytest.fixture
def store() -> MemoryEventStore:
    return MemoryEventStore()


@pytest.fixture
def rec(store: MemoryEventStore) -> Recorder:
    return Recorder(store)


def test_query_events_filters_and_keeps_the_newest_with_limit(
    store: MemoryEventStore, rec: Recorder
) -> None:
    rec("tts", 0, StartRequested(data={"by": "w1"}))
    rec("vlm", 1, StartRequested())
    rec("tts", 2, ProcessLaunched(data={"pid": 10}))
    rec("tts", 3, HealthPassed())
    store.append([NewEvent("coordinator", 1, "PhaseEntered", T0 + timedelta(seconds=4))])

    assert [e.seq for e in query_events(store)] == [1, 2, 3, 4, 5]
    assert [e.seq for e in query_events(store, service="tts")] == [1, 3, 4]
    assert [e.seq for e in query_events(store, type="StartRequested")] == [1, 2]
    assert [e.seq for e in query_events(store, type=["HealthPassed", "PhaseEntered"])] == [4, 5]
    # limit keeps the newest, still oldest first.
    assert [e.seq for e in query_events(store, limit=2)] == [4, 5]
    assert [e.seq for e in query_events(store, service="tts", limit=2)] == [3, 4]
    window = query_events(store, since=T0 + timedelta(seconds=1), until=T0 + timedelta(seconds=3))
    assert [e.seq for e in window] == [2, 3]
    assert [e.seq for e in query_events(store, after_seq=3)] == [4, 5]


def test_history_gives_each_state_with_how_long_it_lasted(
    store: MemoryEventStore, rec: Recorder
) -> None:
    rec("tts", 0, StartRequested(data={"reason": "phase tts needs it"}))
    rec("tts", 2, ProcessLaunched(data={"pid": 10}))  # starting -> starting: no new interval
    rec("tts", 12.5, HealthPassed())
    rec("tts", 60, VramObserved(data={"used_mib": 4000}))
    rec("tts", 612.5, Evicted(data={"cause": "evict", "by": "w2"}))
    rec("tts", 615, Stopped(data={"free_mib": 20000}))

    timeline = history(store, "tts")
    assert [(i.state, i.duration_s, i.entered_by, i.reason) for i in timeline] == [
        ("starting", 12.5, "StartRequested", "phase tts needs it"),
        ("healthy", 600.0, "HealthPassed", None),
        ("draining", 2.5, "Evicted", "evict"),
        ("stopped", None, "Stopped", None),
    ]
    assert timeline[0].entered_at == T0
    assert timeline[0].left_at == T0 + timedelta(seconds=12.5)
    assert timeline[-1].left_at is None
    assert timeline[-1].seq == 6


def test_history_ignores_other_streams_and_stateless_events(store: MemoryEventStore) -> None:
    store.append(
        [
            NewEvent("tts", 1, "Note", T0),  # no to_state at all
            NewEvent("tts", 2, "StartRequested", T0, "stopped", "starting"),
            NewEvent("other", 1, "StartRequested", T0, "stopped", "starting"),
        ]
    )
    assert [i.state for i in history(store, "tts")] == ["starting"]
    assert history(store, "nobody") == []


def test_interval_as_dict_is_json_ready() -> None:
    interval = Interval("healthy", T0, T0 + timedelta(seconds=5), 5.0, "HealthPassed", None, 3)
    assert interval.as_dict() == {
        "state": "healthy",
        "entered_at": "2026-01-31T12:00:00+00:00",
        "left_at": "2026-01-31T12:00:05+00:00",
        "duration_s": 5.0,
        "entered_by": "HealthPassed",
        "reason": None,
        "seq": 3,
    }


def _start(rec: Recorder, service: str, at_s: float) -> None:
    rec(service, at_s, StartRequested())
    rec(service, at_s + 1, HealthPassed())


def test_explains_an_eviction_with_cause_client_phase_and_free_vram(
    store: MemoryEventStore, rec: Recorder
) -> None:
    _start(rec, "tts", 0)
    rec(
        "tts",
        100,
        Evicted(
            data={
                "cause": "evict",
                "reason": "room needed for vlm",
                "client": "worker-7",
                "phase": "caption",
                "free_mib": 900,
            }
        ),
    )
    rec("tts", 103, Stopped(data={"free_mib": 9100, "used_mib": 15000}))

    (stop,) = explain_stops(store, "tts")
    assert stop.kind == "Stopped"
    assert stop.at == T0 + timedelta(seconds=103)
    assert (stop.requested_by, stop.requested_at) == ("Evicted", T0 + timedelta(seconds=100))
    assert (stop.cause, stop.reason, stop.by, stop.phase) == (
        "evict",
        "room needed for vlm",
        "worker-7",
        "caption",
    )
    # The stop's own reading (after the exit) wins over the drain's.
    assert (stop.free_mib, stop.used_mib) == (9100, 15000)
    assert stop.summary() == (
        "2026-01-31T12:01:43+00:00 stopped after Evicted because evict, room needed for vlm "
        "for worker-7 (phase caption) with 9100 MiB free"
    )
    assert stop.as_dict()["requested_at"] == "2026-01-31T12:01:40+00:00"


def test_explains_each_stop_and_crash_in_order(store: MemoryEventStore, rec: Recorder) -> None:
    _start(rec, "vlm", 0)
    rec("vlm", 10, Preempted(data={"cause": "preempt", "by": "req-42", "free_mib": 100}))
    rec("vlm", 11, Stopped())
    _start(rec, "vlm", 20)
    rec("vlm", 30, Crashed(data={"reason": "exit code 137", "pid": 77}))
    _start(rec, "vlm", 40)
    rec("vlm", 50, DrainRequested(data={"cause": "release", "by": "cli"}))
    rec("vlm", 51, Crashed(data={"reason": "died while draining"}))

    stops = explain_stops(store, "vlm")
    assert [(s.kind, s.requested_by, s.cause, s.reason, s.by, s.free_mib) for s in stops] == [
        ("Stopped", "Preempted", "preempt", None, "req-42", 100),
        ("Crashed", None, None, "exit code 137", None, None),
        # Nobody asked for a crash, even one that happened during a drain.
        ("Crashed", None, None, "died while draining", None, None),
    ]
    assert stops[1].summary() == "2026-01-31T12:00:30+00:00 crashed because exit code 137"
    assert stops[1].as_dict()["requested_at"] is None


def test_a_stop_without_a_recorded_drain_still_gets_explained(store: MemoryEventStore) -> None:
    store.append(
        [
            NewEvent("tts", 1, "DrainRequested", T0, "healthy", "draining", {"free_mib": True}),
            NewEvent("tts", 2, "Stopped", T0, "draining", "stopped", {"by": "recovery"}),
            NewEvent("tts", 3, "Stopped", T0, "draining", "stopped", {"reason": "found dead"}),
        ]
    )
    first, second = explain_stops(store, "tts")
    assert (first.requested_by, first.by, first.free_mib) == ("DrainRequested", "recovery", None)
    assert (second.requested_by, second.reason) == (None, "found dead")
    assert explain_stops(store, "nobody") == []


def test_phase_events_on_the_coordinator_stream_do_not_count_as_stops(
    store: MemoryEventStore,
) -> None:
    store.append([NewEvent("coordinator", 1, PhaseEntered.type_name(), T0, data={"phase": "x"})])
    assert explain_stops(store, "coordinator") == []
