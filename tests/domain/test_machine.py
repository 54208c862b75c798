"""The service state machine: every (state, trigger) pair, legal or not."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from gpusm.domain import events as ev
from gpusm.domain.machine import TRANSITIONS, TRIGGERS, ServiceMachine
from gpusm.domain.states import ACTIVE_STATES, RUNNING_STATES, State
from gpusm.errors import IllegalTransition

AT = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
S = State

# The whole truth, written out by hand: (state, trigger) -> destination.
EXPECTED: dict[tuple[State, str], State] = {
    (S.STOPPED, "request_start"): S.STARTING,
    (S.STARTING, "launched"): S.STARTING,
    (S.STARTING, "health_passed"): S.HEALTHY,
    (S.STARTING, "start_failed"): S.STOPPED,
    (S.STARTING, "drain"): S.DRAINING,
    (S.HEALTHY, "drain"): S.DRAINING,
    (S.DRAINING, "stopped"): S.STOPPED,
    (S.STARTING, "crashed"): S.STOPPED,
    (S.HEALTHY, "crashed"): S.STOPPED,
    (S.DRAINING, "crashed"): S.STOPPED,
    (S.STARTING, "give_up"): S.FAILED,
    (S.STOPPED, "give_up"): S.FAILED,
    (S.FAILED, "reset"): S.STOPPED,
    (S.STOPPED, "adopt"): S.HEALTHY,
    (S.STARTING, "adopt"): S.HEALTHY,
    (S.HEALTHY, "adopt"): S.HEALTHY,
    # The parked tier.
    (S.HEALTHY, "request_park"): S.PARKING,
    (S.PARKING, "parked"): S.PARKED,
    (S.PARKING, "park_failed"): S.DRAINING,
    (S.PARKED, "request_wake"): S.WAKING,
    (S.WAKING, "woken"): S.HEALTHY,
    (S.PARKED, "woken"): S.HEALTHY,
    (S.WAKING, "wake_failed"): S.DRAINING,
    (S.PARKED, "drain"): S.DRAINING,
    (S.WAKING, "drain"): S.DRAINING,
    (S.PARKING, "crashed"): S.STOPPED,
    (S.PARKED, "crashed"): S.STOPPED,
    (S.WAKING, "crashed"): S.STOPPED,
    (S.PARKED, "adopt"): S.PARKED,
    **{(state, "observe"): state for state in S},
}

EVENT_FOR_TRIGGER = {
    "request_start": ev.StartRequested,
    "launched": ev.ProcessLaunched,
    "health_passed": ev.HealthPassed,
    "start_failed": ev.StartFailed,
    "drain": ev.DrainRequested,
    "stopped": ev.Stopped,
    "crashed": ev.Crashed,
    "give_up": ev.GaveUp,
    "reset": ev.Reset,
    "adopt": ev.Adopted,
    "observe": ev.VramObserved,
    "request_park": ev.ParkRequested,
    "parked": ev.Parked,
    "park_failed": ev.ParkFailed,
    "request_wake": ev.WakeRequested,
    "woken": ev.Woken,
    "wake_failed": ev.WakeFailed,
}

ALL_PAIRS = [(state, trigger) for state in S for trigger in sorted(TRIGGERS)]


def test_every_trigger_has_an_event_class() -> None:
    assert set(EVENT_FOR_TRIGGER) == TRIGGERS
    for cls in ev.EVENT_TYPES.values():
        if issubclass(cls, ev.ServiceEvent):
            assert cls.TRIGGER in TRIGGERS


def test_table_has_no_unexpected_moves() -> None:
    declared = {
        (src, trig): (dest or src) for trig, sources, dest in TRANSITIONS for src in sources
    }
    assert declared == EXPECTED


@pytest.mark.parametrize(("state", "trigger"), ALL_PAIRS, ids=[f"{s}-{t}" for s, t in ALL_PAIRS])
def test_each_state_trigger_pair_moves_or_is_refused(state: State, trigger: str) -> None:
    machine = ServiceMachine("svc", state=state, version=7)
    event_cls = EVENT_FOR_TRIGGER[trigger]
    if (state, trigger) in EXPECTED:
        new = machine.record(event_cls(data={"why": "test"}), AT)
        assert machine.state is EXPECTED[state, trigger]
        assert (new.from_state, new.to_state) == (state.value, EXPECTED[state, trigger].value)
        assert new.version == 8
        assert new.type == event_cls.__name__
        assert new.data == {"why": "test"}
        assert new.stream == "svc"
        assert new.at == AT
    else:
        with pytest.raises(IllegalTransition) as info:
            machine.record(event_cls(), AT)
        assert machine.state is state
        assert machine.version == 7
        assert info.value.trigger == trigger
        assert f"while {state.value}" in str(info.value)


def test_eviction_and_preemption_are_drains_with_their_own_names() -> None:
    machine = ServiceMachine("svc", state=S.HEALTHY)
    assert machine.record(ev.Evicted(), AT).type == "Evicted"
    machine = ServiceMachine("svc", state=S.HEALTHY)
    new = machine.record(ev.Preempted(data={"by": "video"}), AT)
    assert (new.type, new.to_state) == ("Preempted", "draining")


def test_folding_a_stream_rebuilds_state_and_version() -> None:
    live = ServiceMachine("svc")
    recorded = [
        live.record(ev.StartRequested(), AT),
        live.record(ev.ProcessLaunched(data={"pid": 4}), AT),
        live.record(ev.HealthPassed(), AT),
        live.record(ev.VramObserved(data={"used_mib": 10}), AT),
        live.record(ev.Preempted(), AT),
        live.record(ev.Stopped(), AT),
    ]
    rebuilt = ServiceMachine.fold("svc", recorded)
    assert (rebuilt.state, rebuilt.version) == (S.STOPPED, 6) == (live.state, live.version)


def test_fold_ignores_event_types_it_does_not_know() -> None:
    live = ServiceMachine("svc")
    first = live.record(ev.StartRequested(), AT)
    odd = ev.NewEvent(stream="svc", version=2, type="FromTheFuture", at=AT)
    rebuilt = ServiceMachine.fold("svc", [first, odd])
    assert (rebuilt.state, rebuilt.version) == (S.STARTING, 2)


def test_state_groups() -> None:
    assert RUNNING_STATES < ACTIVE_STATES
    assert S.STOPPED not in ACTIVE_STATES
    assert S.FAILED not in ACTIVE_STATES
    assert S.DRAINING in ACTIVE_STATES - RUNNING_STATES
    # A parked process is alive and holds its residual; it is not counted on for work.
    assert {S.PARKING, S.PARKED} <= ACTIVE_STATES - RUNNING_STATES
    assert S.WAKING in RUNNING_STATES


def test_can_reports_legality_without_moving() -> None:
    machine = ServiceMachine("svc")
    assert machine.can("request_start")
    assert not machine.can("stopped")
    assert machine.state is S.STOPPED
