"""The VRAM timeline folded from the event log: segments, steps, markers, windows, devices."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

from gpusm.domain.events import NewEvent, RecordedEvent
from gpusm.ports import EventQuery
from gpusm.store.memory import MemoryEventStore
from gpusm.timeline import TIMELINE_TYPES, build_timeline, read_timeline

T0 = datetime(2026, 1, 31, 12, 0, tzinfo=UTC)


class Log:
    """Builds a recorded event log, one event a second unless told otherwise."""

    def __init__(self) -> None:
        self.events: list[RecordedEvent] = []
        self.versions: dict[str, int] = {}

    def add(
        self,
        stream: str,
        type: str,
        move: tuple[str | None, str | None] = (None, None),
        at_s: float | None = None,
        **data: Any,
    ) -> RecordedEvent:
        at = T0 + timedelta(seconds=len(self.events) if at_s is None else at_s)
        self.versions[stream] = self.versions.get(stream, 0) + 1
        event = RecordedEvent(
            stream,
            self.versions[stream],
            type,
            at,
            move[0],
            move[1],
            data,
            seq=len(self.events) + 1,
        )
        self.events.append(event)
        return event

    def run(self, name: str, start_s: float, stop_s: float, gpu: int = 0, **start: Any) -> None:
        """A plain start, health, drain and stop of ``name``."""
        data = {"devices": [gpu], "gpu": gpu, "free_mib": 24576, "used_mib": 0, **start}
        self.add(name, "StartRequested", ("stopped", "starting"), start_s, **data)
        self.add(name, "HealthPassed", ("starting", "healthy"), start_s + 0.5)
        self.add(name, "DrainRequested", ("healthy", "draining"), stop_s - 0.25, reason="stop")
        self.add(name, "Stopped", ("draining", "stopped"), stop_s, held_mib=1)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def test_each_start_to_stop_is_one_segment_holding_the_declared_vram() -> None:
    log = Log()
    log.run("tts", 0, 10)
    log.run("tts", 20, 30)
    log.run("llm", 5, 25)
    timeline = build_timeline(log.events, now=at(60), declared={"tts": 4096, "llm": 18432})
    spans = [(s.service, s.start, s.end, s.end_type) for s in timeline.segments]
    assert spans == [
        ("tts", at(0), at(10), "Stopped"),
        ("llm", at(5), at(25), "Stopped"),
        ("tts", at(20), at(30), "Stopped"),
    ]
    assert [s.state for s in timeline.segments[0].steps] == ["starting", "healthy", "draining"]
    assert {s.reserved_mib for s in timeline.segments[1].steps} == {18432}
    assert timeline.services == ("tts", "llm")
    assert timeline.log_start == at(0)


def test_a_learned_peak_above_the_declared_size_raises_the_reservation_from_then_on() -> None:
    log = Log()
    log.add("tts", "StartRequested", ("stopped", "starting"), 0, devices=[0])
    log.add("tts", "VramObserved", ("starting", "starting"), 1, used_mib=5000, peak_mib=5000)
    log.add("tts", "HealthPassed", ("starting", "healthy"), 2)
    log.add("tts", "Crashed", ("healthy", "stopped"), 3, reason="exit code 3 (out of memory)")
    (segment,) = build_timeline(log.events, now=at(9), declared={"tts": 4096}).segments
    held = [(s.at, s.state, s.reserved_mib) for s in segment.steps]
    assert held == [(at(0), "starting", 4096), (at(1), "starting", 5000), (at(2), "healthy", 5000)]
    assert segment.end_type == "Crashed"
    assert segment.peak_mib == 5000


def test_a_parked_service_holds_what_the_gpu_showed_it_keep() -> None:
    log = Log()
    log.add("img", "StartRequested", ("stopped", "starting"), 0, devices=[0])
    log.add("img", "HealthPassed", ("starting", "healthy"), 1)
    log.add("img", "ParkRequested", ("healthy", "parking"), 2)
    log.add("img", "Parked", ("parking", "parked"), 3, held_mib=512)
    log.add("img", "WakeRequested", ("parked", "waking"), 4)
    log.add("img", "Woken", ("waking", "healthy"), 5)
    (segment,) = build_timeline(log.events, now=at(9), declared={"img": 20480}).segments
    held = [(s.state, s.reserved_mib) for s in segment.steps]
    assert held == [
        ("starting", 20480),
        ("healthy", 20480),
        ("parking", 20480),
        ("parked", 512),
        ("waking", 20480),
        ("healthy", 20480),
    ]
    assert (segment.open, segment.end, segment.end_type) == (True, at(9), None)


def test_evictions_preemptions_crashes_and_failed_starts_are_markers_with_their_reason() -> None:
    log = Log()
    log.add("a", "StartRequested", ("stopped", "starting"), 0, devices=[1])
    log.add("a", "HealthPassed", ("starting", "healthy"), 1)
    log.add("a", "Evicted", ("healthy", "draining"), 2, reason="idle, to make room for b")
    log.add("a", "Stopped", ("draining", "stopped"), 3)
    log.add("b", "StartRequested", ("stopped", "starting"), 4, devices=[1])
    log.add("b", "StartFailed", ("starting", "stopped"), 5, reason="exited with code 3")
    log.add("b", "GaveUp", ("stopped", "failed"), 6, reason="3 starts failed in 60s")
    log.add("coordinator", "PhaseEntered", at_s=7, phase="x")
    refusal = "client w, phase x refused: need 9000 MiB, 2000 MiB free"
    log.add("coordinator", "AdmissionRefused", at_s=8, reason=refusal, need_mib=9000)
    timeline = build_timeline(log.events, now=at(9))
    marks = [(m.service, m.device, m.kind, m.reason) for m in timeline.markers]
    assert marks == [
        ("a", 1, "evicted", "idle, to make room for b"),
        ("b", 1, "start-failed", "exited with code 3"),
        ("b", 1, "gave-up", "3 starts failed in 60s"),
        ("coordinator", None, "oom-refused", refusal),
    ]
    assert [s.end_type for s in timeline.segments] == ["Stopped", "StartFailed"]


def test_a_window_clips_segments_and_keeps_what_ran_across_its_start() -> None:
    log = Log()
    log.run("early", 0, 5)
    log.run("across", 2, 20)
    log.run("inside", 11, 12)
    log.run("late", 30, 40)
    log.add("inside", "Crashed", ("stopped", "stopped"), 41)  # outside: no marker
    timeline = build_timeline(
        log.events, now=at(99), since=at(10), until=at(15), declared={"across": 100}
    )
    spans = [(s.service, s.start, s.end, s.open) for s in timeline.segments]
    assert spans == [("across", at(10), at(15), True), ("inside", at(11), at(12), False)]
    across = timeline.segments[0]
    # The step in force at the window's start begins there.
    assert [(s.at, s.state) for s in across.steps] == [(at(10), "healthy")]
    assert timeline.markers == ()
    assert timeline.services == ("across", "inside")


def test_several_devices_each_get_their_segments_and_a_spanning_service_is_on_each() -> None:
    log = Log()
    log.run("small", 0, 5, gpu=0, free_mib=20000, used_mib=4576)
    log.run("small", 6, 8, gpu=1, free_mib=81920, used_mib=0)
    log.run("tp2", 1, 9, devices=[0, 1])
    timeline = build_timeline(log.events, now=at(20))
    assert [(d.index, d.total_mib) for d in timeline.devices] == [(0, 24576), (1, 81920)]
    assert [(s.service, s.device) for s in timeline.segments] == [
        ("small", 0),
        ("tp2", 0),
        ("tp2", 1),
        ("small", 1),
    ]
    one = build_timeline(log.events, now=at(20), device=1)
    assert [(s.service, s.start) for s in one.segments] == [("tp2", at(1)), ("small", at(6))]
    assert [d.index for d in one.devices] == [1]


def test_an_adopted_service_starts_a_segment_and_an_empty_log_draws_nothing() -> None:
    log = Log()
    log.add("llm", "Adopted", ("stopped", "healthy"), 0, gpu=0)
    log.add("llm", "VramObserved", ("healthy", "healthy"), 1, used_mib=9000, peak_mib=9000)
    (segment,) = build_timeline(log.events, now=at(5)).segments
    assert [(s.state, s.reserved_mib) for s in segment.steps] == [("healthy", 0), ("healthy", 9000)]
    assert segment.start_type == "Adopted"
    empty = build_timeline([], now=at(5))
    assert (empty.segments, empty.markers, empty.devices, empty.log_start) == ((), (), (), None)


def test_the_types_the_timeline_reads_include_every_start_stop_and_marker() -> None:
    for name in ("StartRequested", "Adopted", "Stopped", "Crashed", "StartFailed", "Evicted"):
        assert name in TIMELINE_TYPES
    assert "ProxiedRequest" not in TIMELINE_TYPES


def _scenario() -> MemoryEventStore:
    """A log with parks, wakes, a learned peak, crashes, a failed start, a spanning
    service and evictions on two devices, in time order."""
    gpu0 = {"gpu": 0, "devices": [0], "free_mib": 20000, "used_mib": 4576}
    gpu1 = {"gpu": 1, "devices": [1], "free_mib": 40000, "used_mib": 0}
    script: list[tuple[float, str, str, str | None, str | None, dict[str, Any]]] = [
        (0, "coordinator", "Recovered", None, None, {"gpu": 0, "free_mib": 24576, "used_mib": 0}),
        (0.5, "a", "StartRequested", "stopped", "starting", gpu0),
        (1, "a", "VramObserved", "starting", "starting", {"used_mib": 5000, "peak_mib": 5000}),
        (2, "a", "HealthPassed", "starting", "healthy", {}),
        (3, "c", "StartRequested", "stopped", "starting", {"devices": [0, 1], "gpu": 0}),
        (4, "c", "HealthPassed", "starting", "healthy", {}),
        (5, "b", "StartRequested", "stopped", "starting", gpu1),
        (6, "b", "HealthPassed", "starting", "healthy", {}),
        (10, "a", "ParkRequested", "healthy", "parking", {"reason": "idle"}),
        (11, "a", "Parked", "parking", "parked", {"held_mib": 500}),
        (15, "b", "Crashed", "healthy", "stopped", {"reason": "exit code 3"}),
        (16, "b", "StartRequested", "stopped", "starting", gpu1),
        (17, "b", "StartFailed", "starting", "stopped", {"reason": "health deadline"}),
        (18, "b", "GaveUp", "stopped", "failed", {"reason": "budget spent"}),
        (19, "b", "Reset", "failed", "stopped", {}),
        (20, "a", "WakeRequested", "parked", "waking", {}),
        (21, "a", "Woken", "waking", "healthy", {}),
        (25, "b", "StartRequested", "stopped", "starting", gpu1),
        (26, "b", "HealthPassed", "starting", "healthy", {}),
        (30, "a", "DrainRequested", "healthy", "draining", {"reason": "stop"}),
        (31, "a", "Stopped", "draining", "stopped", {}),
        (35, "c", "Preempted", "healthy", "draining", {"reason": "room for d"}),
        (36, "c", "Stopped", "draining", "stopped", {}),
        (40, "a", "StartRequested", "stopped", "starting", gpu0),
        (41, "a", "HealthPassed", "starting", "healthy", {}),
        (44, "a", "ParkRequested", "healthy", "parking", {}),
        (45, "a", "Parked", "parking", "parked", {"held_mib": 600}),
        (47, "a", "Evicted", "parked", "draining", {"reason": "room for e"}),
        (51, "a", "Stopped", "draining", "stopped", {}),
    ]
    store = MemoryEventStore()
    versions: dict[str, int] = {}
    for seconds, stream, kind, before, after, data in script:
        versions[stream] = versions.get(stream, 0) + 1
        store.append([NewEvent(stream, versions[stream], kind, at(seconds), before, after, data)])
    return store


def test_reading_only_the_window_gives_what_folding_the_whole_log_gives() -> None:
    store = _scenario()
    everything = store.read(EventQuery())
    declared = {"a": 4000, "b": 30000, "c": 8000}
    for start in range(-1, 56):
        for length in (None, 0.5, 3, 9, 30):
            since = at(start + 0.25)
            until = None if length is None else since + timedelta(seconds=length)
            whole = build_timeline(
                everything, now=at(60), since=since, until=until, declared=declared
            )
            read = read_timeline(
                store.read,
                services=["a", "b", "c"],
                now=at(60),
                since=since,
                until=until,
                declared=declared,
            )
            where = f"since {start + 0.25}s, for {length}s"
            assert read.segments == whole.segments, where
            assert set(read.services) == set(whole.services), where
            assert read.log_start == whole.log_start, where
            # A marker of a service stopped when the window opened may not know its
            # device (None: drawn on every device); all else is the same.
            assert len(read.markers) == len(whole.markers), where
            for mine, truth in zip(read.markers, whole.markers, strict=True):
                assert mine.device in (truth.device, None), where
                assert replace(mine, device=truth.device) == truth, where
