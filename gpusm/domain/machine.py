"""The service state machine: one transition table, driven by ``transitions``.

A :class:`ServiceMachine` is the aggregate for one service stream. ``record`` checks a
trigger against the table, moves the state and returns the :class:`NewEvent` to append;
``apply`` folds an already-recorded event. An illegal trigger raises
:class:`~gpusm.errors.IllegalTransition` and changes nothing.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Final

from transitions import Machine, MachineError

from gpusm.domain.events import EVENT_TYPES, NewEvent, ServiceEvent
from gpusm.domain.states import ACTIVE_STATES, State
from gpusm.errors import IllegalTransition

__all__ = ["TRANSITIONS", "TRIGGERS", "ServiceMachine"]

_ALL = list(State)

# trigger, sources, destination (None = internal: recorded, state unchanged)
TRANSITIONS: Final[list[tuple[str, list[State], State | None]]] = [
    ("request_start", [State.STOPPED], State.STARTING),
    ("launched", [State.STARTING], None),
    ("health_passed", [State.STARTING], State.HEALTHY),
    ("start_failed", [State.STARTING], State.STOPPED),
    # A waking service is owned by its waking thread, which sees the drain (as a start).
    ("drain", [State.STARTING, State.HEALTHY, State.PARKED, State.WAKING], State.DRAINING),
    ("stopped", [State.DRAINING], State.STOPPED),
    ("crashed", [*ACTIVE_STATES], State.STOPPED),
    # Parking: the sleep action, then the GPU must show the memory back.
    ("request_park", [State.HEALTHY], State.PARKING),
    ("parked", [State.PARKING], State.PARKED),
    # A park the GPU does not confirm, or a wake that fails, becomes a verified stop.
    ("park_failed", [State.PARKING], State.DRAINING),
    ("request_wake", [State.PARKED], State.WAKING),
    # PARKED -> HEALTHY: recovery found a parked service holding its full memory.
    ("woken", [State.WAKING, State.PARKED], State.HEALTHY),
    ("wake_failed", [State.WAKING], State.DRAINING),
    # STARTING -> FAILED when the last allowed start fails; STOPPED -> FAILED when a
    # crash leaves no budget for the restart.
    ("give_up", [State.STARTING, State.STOPPED], State.FAILED),
    ("reset", [State.FAILED], State.STOPPED),
    # Recovery keeps what it finds alive and healthy, whatever the log last believed.
    ("adopt", [State.STOPPED, State.STARTING, State.HEALTHY], State.HEALTHY),
    # ... and a parked one that still holds no more than its residual stays parked.
    ("adopt", [State.PARKED], None),
    ("observe", _ALL, None),
]

TRIGGERS: Final[frozenset[str]] = frozenset(t for t, _, _ in TRANSITIONS)

# The same table as a lookup, for replay: folding a long log through the machine's
# trigger dispatch costs ~20 µs an event; this costs a dictionary read.
_NEXT: Final[dict[tuple[State, str], State]] = {
    (src, trigger): dest or src for trigger, sources, dest in TRANSITIONS for src in sources
}


class ServiceMachine:
    """One service's state and stream version, rebuilt by folding its events."""

    state: State

    def __init__(self, name: str, state: State = State.STOPPED, version: int = 0) -> None:
        self.name = name
        self.version = version
        self._machine = Machine(
            model=self,
            states=State,
            transitions=[
                {"trigger": t, "source": src, "dest": dest} for t, src, dest in TRANSITIONS
            ],
            initial=state,
            auto_transitions=False,
        )

    def can(self, trigger: str) -> bool:
        """Whether ``trigger`` is legal from the current state."""
        return bool(self._machine.get_transitions(trigger, source=self.state))

    def record(self, event: ServiceEvent, at: datetime) -> NewEvent:
        """Fire ``event``'s trigger and return the event to append at the next version."""
        source = self.state
        self._fire(event.TRIGGER)
        self.version += 1
        return NewEvent(
            stream=self.name,
            version=self.version,
            type=event.type_name(),
            at=at,
            from_state=source.value,
            to_state=self.state.value,
            data=dict(event.data),
        )

    def apply(self, event: NewEvent) -> None:
        """Fold one recorded event of this stream (replay)."""
        cls = EVENT_TYPES.get(event.type)
        if cls is not None and issubclass(cls, ServiceEvent):
            dest = _NEXT.get((self.state, cls.TRIGGER))
            if dest is None:
                raise IllegalTransition(self.name, cls.TRIGGER, self.state.value)
            if dest is not self.state:
                self.state = dest  # no callbacks to run: the plain attribute is the state
        self.version = event.version

    @classmethod
    def fold(cls, name: str, events: Iterable[NewEvent]) -> ServiceMachine:
        """Rebuild a service from its whole stream, oldest first."""
        machine = cls(name)
        for event in events:
            machine.apply(event)
        return machine

    def _fire(self, trigger: str) -> None:
        if not self.can(trigger):
            raise IllegalTransition(self.name, trigger, self.state.value)
        try:
            self._machine.events[trigger].trigger(self)
        except MachineError as exc:  # pragma: no cover - guarded by can() above
            raise IllegalTransition(self.name, trigger, self.state.value) from exc
