"""One contract for every EventStore: each backend class below only supplies ``make_store``."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from gpusm.domain.events import NewEvent
from gpusm.errors import ConcurrencyConflict, StoreError
from gpusm.ports import EventQuery, EventStore
from gpusm.store import MemoryEventStore, SqlEventStore

T0 = datetime(2026, 1, 31, 12, 0, 0, 123456, tzinfo=UTC)


def ev(
    stream: str,
    version: int,
    type_: str = "VramObserved",
    *,
    at: datetime | None = None,
    to: str | None = None,
    frm: str | None = None,
    data: dict[str, object] | None = None,
) -> NewEvent:
    return NewEvent(
        stream=stream,
        version=version,
        type=type_,
        at=at or T0 + timedelta(seconds=version),
        from_state=frm,
        to_state=to,
        data=data or {},
    )


class EventStoreContract:
    """Behaviour every event store promises (see gpusm.store.memory's docstring)."""

    def make_store(self, tmp_path: Path) -> EventStore:
        raise NotImplementedError

    @pytest.fixture
    def store(self, tmp_path: Path) -> Iterator[EventStore]:
        store = self.make_store(tmp_path)
        yield store
        store.close()

    # ------------------------------------------------------------ append / read
    def test_new_store_is_empty(self, store: EventStore) -> None:
        assert store.read() == []
        assert store.heads() == {}

    def test_reads_back_what_was_appended_in_order(self, store: EventStore) -> None:
        store.append([ev("a", 1, "StartRequested", to="starting", frm="stopped")])
        store.append([ev("a", 2, "ProcessLaunched", to="starting", frm="starting")])
        got = store.read()
        assert [(e.stream, e.version, e.type) for e in got] == [
            ("a", 1, "StartRequested"),
            ("a", 2, "ProcessLaunched"),
        ]
        assert got[0].from_state == "stopped"
        assert got[0].to_state == "starting"

    def test_append_returns_recorded_events_with_their_seq(self, store: EventStore) -> None:
        recorded = store.append([ev("a", 1), ev("b", 1)])
        assert [e.seq for e in recorded] == [1, 2]
        assert store.read() == recorded

    def test_seq_is_global_and_increases_by_one_across_streams(self, store: EventStore) -> None:
        store.append([ev("a", 1)])
        store.append([ev("b", 1), ev("a", 2)])
        store.append([ev("c", 1)])
        assert [e.seq for e in store.read()] == [1, 2, 3, 4]
        assert [e.stream for e in store.read()] == ["a", "b", "a", "c"]

    def test_empty_batch_writes_nothing(self, store: EventStore) -> None:
        assert store.append([]) == []
        assert store.read() == []

    # ------------------------------------------------------------ concurrency rules
    def test_duplicate_version_is_a_conflict_and_writes_nothing(self, store: EventStore) -> None:
        store.append([ev("a", 1)])
        with pytest.raises(ConcurrencyConflict) as info:
            store.append([ev("a", 1, "Other")])
        assert (info.value.stream, info.value.version) == ("a", 1)
        assert [e.type for e in store.read()] == ["VramObserved"]

    def test_version_gap_is_a_conflict(self, store: EventStore) -> None:
        store.append([ev("a", 1)])
        with pytest.raises(ConcurrencyConflict, match="must be version 2, not 3"):
            store.append([ev("a", 3)])
        with pytest.raises(ConcurrencyConflict):
            store.append([ev("new", 2)])
        assert len(store.read()) == 1

    def test_gap_inside_a_batch_is_a_conflict(self, store: EventStore) -> None:
        with pytest.raises(ConcurrencyConflict):
            store.append([ev("a", 1), ev("a", 3)])
        with pytest.raises(ConcurrencyConflict):
            store.append([ev("a", 1), ev("a", 1)])
        assert store.read() == []

    def test_batch_is_atomic_across_streams(self, store: EventStore) -> None:
        store.append([ev("b", 1)])
        with pytest.raises(ConcurrencyConflict):
            store.append([ev("a", 1), ev("c", 1), ev("b", 1)])
        assert [(e.stream, e.version) for e in store.read()] == [("b", 1)]
        assert set(store.heads()) == {"b"}
        # The seq numbers of the refused batch are not visible as a gap.
        assert [e.seq for e in store.append([ev("a", 1)])] == [2]

    def test_batch_may_append_several_versions_of_one_stream(self, store: EventStore) -> None:
        store.append([ev("a", 1), ev("a", 2), ev("b", 1), ev("a", 3)])
        assert store.heads()["a"].version == 3
        assert store.heads()["b"].version == 1

    def test_concurrent_appends_from_threads_never_lose_or_duplicate(
        self, store: EventStore
    ) -> None:
        def writer(name: str) -> None:
            for v in range(1, 26):
                store.append([ev(name, v)])

        threads = [threading.Thread(target=writer, args=(f"s{i}",)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        got = store.read()
        assert [e.seq for e in got] == list(range(1, 101))
        for i in range(4):
            assert [e.version for e in got if e.stream == f"s{i}"] == list(range(1, 26))

    # ------------------------------------------------------------ bad input
    @pytest.mark.parametrize(
        ("event", "message"),
        [
            (ev("", 1), "stream must be a non-empty string"),
            (ev("a", 1, ""), "type must be a non-empty string"),
            (ev("a", 0), "version must be 1 or more"),
            (ev("a", True), "version must be an integer"),
            (NewEvent("a", 1, "X", at=datetime(2026, 1, 1)), "timezone-aware"),
            (ev("a", 1, data={"x": object()}), "not JSON-serialisable"),
            (ev("a", 1, data={"x": float("nan")}), "not JSON-serialisable"),
        ],
    )
    def test_refuses_malformed_events_with_a_clear_message(
        self, store: EventStore, event: NewEvent, message: str
    ) -> None:
        with pytest.raises(StoreError, match=message):
            store.append([ev("ok", 1), event])
        assert store.read() == []

    @pytest.mark.parametrize(
        ("query", "message"),
        [
            (EventQuery(limit=-1), "limit must be 0 or more"),
            (EventQuery(after_seq=-1), "after_seq must be 0 or more"),
            (EventQuery(since=datetime(2026, 1, 1)), "since must be a timezone-aware"),
        ],
    )
    def test_refuses_meaningless_queries(
        self, store: EventStore, query: EventQuery, message: str
    ) -> None:
        with pytest.raises(StoreError, match=message):
            store.read(query)

    # ------------------------------------------------------------ heads
    def test_heads_reflect_latest_version_state_and_seq(self, store: EventStore) -> None:
        store.append([ev("a", 1, to="starting"), ev("b", 1, to="starting")])
        store.append([ev("a", 2, to="healthy", at=T0 + timedelta(hours=1))])
        heads = store.heads()
        assert heads["a"].version == 2
        assert heads["a"].state == "healthy"
        assert heads["a"].last_seq == 3
        assert heads["a"].at == T0 + timedelta(hours=1)
        assert heads["b"].state == "starting"
        assert heads["b"].last_seq == 2

    def test_heads_keep_the_last_state_through_events_without_one(self, store: EventStore) -> None:
        store.append([ev("a", 1, to="healthy")])
        store.append([ev("a", 2, to=None)])
        store.append([ev("a", 3, to=None), ev("a", 4, to=None)])
        head = store.heads()["a"]
        assert (head.version, head.state, head.last_seq) == (4, "healthy", 4)

    def test_heads_of_a_stream_without_states_have_none(self, store: EventStore) -> None:
        store.append([ev("coordinator", 1, "PhaseEntered")])
        assert store.heads()["coordinator"].state is None

    def test_state_in_a_batch_is_the_last_event_that_has_one(self, store: EventStore) -> None:
        store.append([ev("a", 1, to="starting"), ev("a", 2, to="healthy"), ev("a", 3)])
        assert store.heads()["a"].state == "healthy"

    # ------------------------------------------------------------ queries
    @pytest.fixture
    def filled(self, store: EventStore) -> EventStore:
        store.append(
            [
                ev("a", 1, "StartRequested", at=T0),
                ev("b", 1, "StartRequested", at=T0 + timedelta(seconds=10)),
                ev("a", 2, "HealthPassed", at=T0 + timedelta(seconds=20)),
                ev("coordinator", 1, "PhaseEntered", at=T0 + timedelta(seconds=30)),
                ev("a", 3, "DrainRequested", at=T0 + timedelta(seconds=40)),
                ev("a", 4, "Stopped", at=T0 + timedelta(seconds=50)),
            ]
        )
        return store

    def test_filters_by_stream(self, filled: EventStore) -> None:
        assert [e.version for e in filled.read(EventQuery(stream="a"))] == [1, 2, 3, 4]
        assert filled.read(EventQuery(stream="nobody")) == []

    def test_filters_by_types(self, filled: EventStore) -> None:
        got = filled.read(EventQuery(types=["StartRequested", "Stopped"]))
        assert [e.seq for e in got] == [1, 2, 6]
        assert [e.seq for e in filled.read(EventQuery(types="Stopped"))] == [6]
        assert filled.read(EventQuery(types=[])) == []

    def test_since_is_inclusive_and_until_exclusive(self, filled: EventStore) -> None:
        got = filled.read(
            EventQuery(since=T0 + timedelta(seconds=10), until=T0 + timedelta(seconds=30))
        )
        assert [e.seq for e in got] == [2, 3]

    def test_time_filters_compare_instants_whatever_the_zone(self, filled: EventStore) -> None:
        plus_two = timezone(timedelta(hours=2))
        since = (T0 + timedelta(seconds=40)).astimezone(plus_two)
        assert [e.seq for e in filled.read(EventQuery(since=since))] == [5, 6]

    def test_after_seq_reads_only_newer_events(self, filled: EventStore) -> None:
        assert [e.seq for e in filled.read(EventQuery(after_seq=4))] == [5, 6]
        assert filled.read(EventQuery(after_seq=6)) == []

    def test_limit_and_newest_first(self, filled: EventStore) -> None:
        assert [e.seq for e in filled.read(EventQuery(limit=2))] == [1, 2]
        assert [e.seq for e in filled.read(EventQuery(limit=2, newest_first=True))] == [6, 5]
        assert [e.seq for e in filled.read(EventQuery(newest_first=True))] == [6, 5, 4, 3, 2, 1]
        assert filled.read(EventQuery(limit=0)) == []

    def test_filters_combine(self, filled: EventStore) -> None:
        query = EventQuery(
            stream="a", types=["StartRequested", "DrainRequested", "Stopped"], after_seq=1, limit=1
        )
        assert [e.seq for e in filled.read(query)] == [5]

    # ------------------------------------------------------------ round trips
    def test_datetimes_round_trip_exactly_as_utc(self, store: EventStore) -> None:
        moments = [
            datetime(2026, 1, 31, 23, 59, 59, 999999, tzinfo=UTC),
            datetime(1999, 12, 31, 0, 0, 0, 1, tzinfo=UTC),
            datetime(2026, 6, 1, 1, 30, tzinfo=timezone(timedelta(hours=-5, minutes=-30))),
        ]
        store.append([ev("t", i + 1, at=at) for i, at in enumerate(moments)])
        got = [e.at for e in store.read()]
        assert got == moments
        assert all(at.utcoffset() == timedelta(0) for at in got)
        assert store.heads()["t"].at == moments[-1]

    def test_data_round_trips_as_json_including_nesting(self, store: EventStore) -> None:
        data: dict[str, object] = {
            "pid": 4242,
            "create_time": 1769860800.25,
            "reason": "idle for 600 s — evicted ✓",
            "nested": {"list": [1, "two", None, True, {"deep": [1.5]}]},
            "empty": {},
            "tuple": (1, 2),
        }
        store.append([ev("a", 1, data=data)])
        got = store.read()[0].data
        assert got == {**data, "tuple": [1, 2]}

    def test_returned_data_cannot_rewrite_history(self, store: EventStore) -> None:
        data: dict[str, object] = {"n": [1]}
        store.append([ev("a", 1, data=data)])
        data["n"] = [2]
        first = store.read()[0]
        first.data["n"].append(3)
        assert store.read()[0].data == {"n": [1]}

    # ------------------------------------------------------------ close
    def test_close_is_idempotent_and_later_use_is_an_error(self, tmp_path: Path) -> None:
        store = self.make_store(tmp_path)
        store.append([ev("a", 1)])
        store.close()
        store.close()
        with pytest.raises(StoreError, match="closed"):
            store.read()
        with pytest.raises(StoreError, match="closed"):
            store.append([ev("a", 2)])
        with pytest.raises(StoreError, match="closed"):
            store.heads()


class TestMemoryEventStore(EventStoreContract):
    def make_store(self, tmp_path: Path) -> EventStore:
        return MemoryEventStore()


class TestSqlEventStore(EventStoreContract):
    def make_store(self, tmp_path: Path) -> EventStore:
        return SqlEventStore(f"sqlite:///{tmp_path / 'events.db'}")

    def test_survives_reopening_the_file(self, tmp_path: Path) -> None:
        first = self.make_store(tmp_path)
        first.append([ev("a", 1, to="healthy", data={"k": "v"})])
        first.close()
        again = self.make_store(tmp_path)
        try:
            assert again.read()[0].data == {"k": "v"}
            assert again.heads()["a"].state == "healthy"
            again.append([ev("a", 2)])
        finally:
            again.close()
