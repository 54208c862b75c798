"""Random command sequences on live aggregates; replaying the store gives the same states."""

from __future__ import annotations

import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from gpusm.domain import events as ev
from gpusm.domain.machine import ServiceMachine
from gpusm.errors import IllegalTransition
from gpusm.ports import EventQuery
from gpusm.store.sql import SqlEventStore

SERVICES = ["comfyui", "tts", "vidi"]
EVENTS: list[type[ev.ServiceEvent]] = [
    ev.StartRequested,
    ev.ProcessLaunched,
    ev.HealthPassed,
    ev.StartFailed,
    ev.DrainRequested,
    ev.Evicted,
    ev.Preempted,
    ev.Stopped,
    ev.Crashed,
    ev.GaveUp,
    ev.Reset,
    ev.Adopted,
    ev.VramObserved,
    ev.OrphanReaped,
]


class ReplayMatchesLive(RuleBasedStateMachine):
    """Live aggregates record into a real SQLite store; a fold of the store must agree."""

    def __init__(self) -> None:
        super().__init__()
        self._dir = tempfile.TemporaryDirectory()
        self.store = SqlEventStore(f"sqlite:///{Path(self._dir.name) / 'events.db'}")
        self.live = {name: ServiceMachine(name) for name in SERVICES}
        self.at = datetime(2026, 1, 1, tzinfo=UTC)
        self.refused = 0

    @rule(
        service=st.sampled_from(SERVICES),
        event=st.sampled_from(EVENTS),
        mib=st.integers(0, 24576),
    )
    def fire(self, service: str, event: type[ev.ServiceEvent], mib: int) -> None:
        machine = self.live[service]
        before = (machine.state, machine.version)
        self.at += timedelta(milliseconds=1)
        try:
            new = machine.record(event(data={"used_mib": mib}), self.at)
        except IllegalTransition:
            # Refused: nothing moved and nothing is appended.
            assert (machine.state, machine.version) == before
            self.refused += 1
            return
        self.store.append([new])

    @invariant()
    def replay_equals_live(self) -> None:
        heads = self.store.heads()
        for name, machine in self.live.items():
            stream = self.store.read(EventQuery(stream=name))
            rebuilt = ServiceMachine.fold(name, stream)
            assert (rebuilt.state, rebuilt.version) == (machine.state, machine.version)
            if machine.version:
                assert heads[name].state == machine.state.value
                assert heads[name].version == machine.version

    def teardown(self) -> None:
        self.store.close()
        self._dir.cleanup()


ReplayMatchesLive.TestCase.settings = settings(
    max_examples=40, stateful_step_count=30, deadline=None
)
test_replaying_the_store_rebuilds_every_live_aggregate = ReplayMatchesLive.TestCase
