"""Recovery before serving: replay the log, observe reality, reconcile, record each fix.

=====================  ==========================  =========================================
believed (replay)      observed                    action (event)
=====================  ==========================  =========================================
stopped                nothing running             none
stopped / starting,    a process or container      adopt if healthy (``Adopted``), else
no pid yet             carrying our marker         reap (``OrphanReaped``; starting ->
                                                   ``StartFailed``)
starting, pid known    alive                       resume the health wait within the
                                                   original deadline
healthy                alive and healthy           ``Adopted``
healthy / starting     dead, or pid reused         ``Crashed``
healthy                alive, failing health       stop it, ``Crashed``
draining               alive or dead               finish the stop, ``Stopped``
parked                 alive, holding <= residual  ``Adopted`` (stays parked)
                       + tolerance
parked                 alive, holding more         probe health: ``Woken`` (treated as
                                                   healthy, the numbers recorded), else stop
                                                   it, ``Crashed``
parking                alive                       finish the park: sleep steps again (they
                                                   are idempotent), verify -> ``Parked``, or
                                                   ``ParkFailed`` and a verified stop
waking                 alive                       finish the wake -> ``Woken``, or
                                                   ``WakeFailed``, a verified stop, a restart
parked / parking /     dead                        ``Crashed``
waking
any                    memory held by a pid that   counted as foreign usage, never touched
                       is not ours
=====================  ==========================  =========================================

Recovery reads only each stream's head and its latest few events, so its cost does not
grow with the length of the log.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from gpusm.domain import events as ev
from gpusm.domain.events import COORDINATOR_STREAM
from gpusm.domain.machine import ServiceMachine
from gpusm.domain.states import ACTIVE_STATES, State
from gpusm.engine.lifecycle import finish_stop
from gpusm.engine.parking import finish_park, run_wake
from gpusm.engine.state import Engine, Slot
from gpusm.errors import GpusmError
from gpusm.ports import EventQuery, Handle

__all__ = ["reap", "recover"]

_HANDLE_EVENTS = ("StartRequested", "ProcessLaunched", "Adopted")


def recover(engine: Engine) -> dict[str, Any]:
    """Bring memory and the log in line with what really runs; returns what was corrected."""
    heads = engine.store.heads()
    if COORDINATOR_STREAM in heads:
        engine.coordinator_version = heads[COORDINATOR_STREAM].version
    for name, slot in engine.slots.items():
        head = heads.get(name)
        machine = slot.machine
        if head is not None:
            state = State(head.state) if head.state else State.STOPPED
            machine = ServiceMachine(name, state, head.version)
        _restore(engine, slot, machine)
    orphans = _orphans(engine)
    fixes: list[str] = []
    for slot in engine.slots.values():
        mine = [h for h in orphans if h.service == slot.name]
        believed = slot.handle
        extra = [h for h in mine if believed is None or h.instance != believed.instance]
        fixes += _reconcile(engine, slot, extra)
        for handle in extra:
            if slot.handle is None or handle.instance != slot.handle.instance:
                fixes.append(reap(engine, handle, slot))
    for handle in orphans:
        if handle.service not in engine.slots:
            fixes.append(reap(engine, handle, None))
    summary = {"corrections": fixes, **engine.vram_data(0)}
    engine.note(ev.Recovered(data=summary))
    return summary


def _restore(engine: Engine, slot: Slot, machine: ServiceMachine) -> None:
    last = engine.last_event(slot.name, _HANDLE_EVENTS)
    handle = None
    if (
        machine.state in ACTIVE_STATES
        and last is not None
        and last.type != "StartRequested"
        and last.data.get("instance")
    ):
        handle = Handle.from_data(slot.name, last.data)
    peak = engine.last_event(slot.name, ["VramObserved"])
    peak_mib = int(peak.data.get("peak_mib", 0)) if peak is not None else 0
    slot.restore(machine, handle, peak_mib, engine.clock.monotonic())
    parked = engine.last_event(slot.name, ["Parked"])
    if parked is not None and isinstance(parked.data.get("held_mib"), int):
        slot.learn_residual(int(parked.data["held_mib"]))
    _restore_history(engine, slot)
    loads = engine.store.read(
        EventQuery(stream=slot.name, types=["HealthPassed"], newest_first=True, limit=9)
    )
    for passed in reversed(loads):
        seconds = passed.data.get("time_to_healthy_s")
        if isinstance(seconds, int | float):
            slot.learn_load(float(seconds))
    started = engine.last_event(slot.name, ["StartRequested"])
    if started is not None and isinstance(started.data.get("devices"), list):
        # Where its instance was placed (logs from before placement name none: pinned/0).
        slot.devices = tuple(int(d) for d in started.data["devices"])
    recorded = started.data.get("config") if started is not None else None
    if slot.state in ACTIVE_STATES and recorded and recorded != slot.config.fingerprint():
        # Started with another config than the one in force now (a reload or an edit
        # the crash or restart cut short): it keeps serving, and restarts once idle.
        slot.pending = slot.config
    if started is not None and slot.state is State.STARTING:
        # The original deadline, carried over from wall time to this process's timers.
        elapsed = (engine.clock.now() - started.at).total_seconds()
        slot.resume_start(engine.clock.monotonic() - elapsed)


# Events that say how a service's last start or run ended.
_OUTCOMES = ("StartRequested", "HealthPassed", "StartFailed", "Crashed", "GaveUp", "Stopped")
_FAILURES = ("StartFailed", "Crashed", "GaveUp")


def _restore_history(engine: Engine, slot: Slot) -> None:
    """Time in state and the last error from the log, not from this process's memory."""
    recent = engine.store.read(EventQuery(stream=slot.name, newest_first=True, limit=32))
    moved = next((e for e in recent if e.from_state != e.to_state), None)
    if moved is not None:
        ago = (engine.clock.now() - moved.at).total_seconds()
        slot.state_since = engine.clock.monotonic() - max(0.0, ago)
    outcome = next((e for e in recent if e.type in _OUTCOMES), None)
    if outcome is None:
        return
    if outcome.type in _FAILURES:
        slot.fail(str(outcome.data.get("reason") or outcome.type))
    elif outcome.type == "Stopped" and outcome.data.get("error"):
        slot.fail(str(outcome.data["error"]))


def _orphans(engine: Engine) -> list[Handle]:
    found: list[Handle] = []
    for kind, runtime in engine.runtimes.items():
        try:
            found += runtime.find_orphans()
        except GpusmError as exc:
            # E.g. the Docker engine is down: what it runs cannot be seen, let alone
            # touched; the services themselves are reconciled below.
            engine.note(ev.Recovered(data={"warning": f"{kind} runtime unreachable: {exc}"}))
    return found


def _alive(engine: Engine, slot: Slot) -> bool:
    if slot.handle is None:
        return False
    try:
        return engine.runtime(slot).is_alive(slot.handle)
    except GpusmError:
        return False  # unobservable (engine down) counts as lost; a later recovery reaps it


def _reconcile(engine: Engine, slot: Slot, extra: list[Handle]) -> list[str]:
    state = slot.state
    handle = slot.handle
    if state in (State.STARTING, State.HEALTHY) and handle and handle.kind != slot.config.runtime:
        return [_retire(engine, slot, handle.kind)]
    if state is State.STOPPED or (state is State.STARTING and slot.handle is None):
        return _adopt_or_reap(engine, slot, extra)
    if state is State.STARTING:
        if not _alive(engine, slot):
            return [_crashed(engine, slot, "found dead on recovery while starting")]
        return [_resume_start(engine, slot)]
    if state is State.HEALTHY:
        if not _alive(engine, slot):
            return [_crashed(engine, slot, "found dead on recovery (or its pid was reused)")]
        result = engine.health.wait_healthy(
            slot.config.health,
            engine.clock.monotonic()
            + slot.config.health.probe_timeout_s * slot.config.health.failures_before_crash,
            still_alive=lambda: _alive(engine, slot),
        )
        if result.ok:
            engine.record(
                slot, ev.Adopted(data={**_handle_data(slot), "reason": "alive and healthy"})
            )
            return [f"{slot.name}: adopted"]
        _stop_handle(engine, slot)
        return [_crashed(engine, slot, f"alive but unhealthy on recovery: {result.reason}")]
    if state in (State.PARKED, State.PARKING, State.WAKING):
        return [_reconcile_parked(engine, slot)]
    if state is State.DRAINING:
        if slot.handle is None and extra:
            # Drained before its launch was recorded: the marked instance is what to stop.
            slot.attach(extra.pop(0))
        slot.claim()
        try:
            finish_stop(engine, slot)
        except GpusmError as exc:
            return [f"{slot.name}: stop finished with an error: {exc}"]
        return [f"{slot.name}: finished the interrupted stop"]
    return []


def _reconcile_parked(engine: Engine, slot: Slot) -> str:
    state = slot.state
    if not _alive(engine, slot):
        return _crashed(engine, slot, f"found dead on recovery while {state.value}")
    if slot.parking is None:
        # Its config lost park: since: it cannot be woken, only stopped.
        reason = "no park: config any more"
        engine.record(slot, ev.DrainRequested(data={"reason": reason, "by": "recovery"}))
        slot.claim()
        return _finish(engine, slot, "stopped: no park: config any more")
    if state is State.PARKING:
        slot.claim()
        return _finish(engine, slot, "finished the interrupted park", finish_park)
    if state is State.WAKING:
        slot.claim_wake(engine.clock.monotonic())
        return _finish(engine, slot, "finished the interrupted wake", run_wake)
    held = _held(engine, slot)
    limit = (slot.residual_mib or 0) + slot.parking.tolerance_mib
    if held is not None and held <= limit:
        data = {**_handle_data(slot), "held_mib": held, "reason": "alive and parked"}
        engine.record(slot, ev.Adopted(data=data))
        return f"{slot.name}: adopted, parked"
    result = engine.health.probe(slot.config.health)
    if result.ok:
        reason = f"found holding {held} MiB on recovery, more than {limit} MiB: awake"
        engine.record(slot, ev.Woken(data={"reason": reason, "held_mib": held}))
        return f"{slot.name}: {reason}"
    _stop_handle(engine, slot)
    return _crashed(engine, slot, f"parked, holding {held} MiB, unhealthy: {result.reason}")


def _finish(
    engine: Engine, slot: Slot, done: str, step: Callable[[Engine, Slot], None] = finish_stop
) -> str:
    """Run the interrupted step to its end (the slot is claimed); what it did."""
    try:
        step(engine, slot)
    except GpusmError as exc:
        return f"{slot.name}: {done}, with an error: {exc}"
    return f"{slot.name}: {done} ({slot.state.value})"


def _devices_holding(engine: Engine, slot: Slot) -> tuple[int, ...]:
    """The devices where the instance's pids hold memory (an adopted orphan stays there)."""
    pids = engine.pids(slot)
    found = []
    for device in engine.allowed(slot):
        try:
            snap = engine.snapshot(device)
        except GpusmError:
            continue
        if any(snap.processes.get(pid, 0) > 0 for pid in pids):
            found.append(device)
    return tuple(found)


def _held(engine: Engine, slot: Slot) -> int | None:
    """MiB the service's processes hold now; None if the GPU cannot be read."""
    try:
        snap = engine.snapshot(slot.device)
    except GpusmError:
        return None
    return sum(snap.processes.get(pid, 0) for pid in engine.pids(slot))


def _retire(engine: Engine, slot: Slot, kind: str) -> str:
    """The instance runs under another runtime than the config names now: stop it through
    the runtime that started it; the next start uses the new one."""
    reason = f"its runtime changed from {kind} to {slot.config.runtime}"
    if not _alive(engine, slot):
        return _crashed(engine, slot, f"found dead on recovery ({reason})")
    # STARTING | HEALTHY -> DRAINING -> STOPPED
    engine.record(slot, ev.DrainRequested(data={"reason": reason, "by": "recovery"}))
    slot.claim()
    try:
        finish_stop(engine, slot)
    except GpusmError as exc:
        return f"{slot.name}: stop after a runtime change finished with an error: {exc}"
    return f"{slot.name}: stopped, {reason}"


def _adopt_or_reap(engine: Engine, slot: Slot, extra: list[Handle]) -> list[str]:
    was_starting = slot.state is State.STARTING
    # The health check asks the service's port, not an instance: of several marked
    # instances the newest is the one a client last reached; the others are reaped.
    for handle in sorted(extra, key=lambda h: h.create_time or 0.0, reverse=True):
        if handle.kind != slot.config.runtime:
            continue  # started under another runtime than the config names: reaped below
        if (
            engine.runtime_of(handle).is_alive(handle)
            and engine.health.probe(slot.config.health).ok
        ):
            extra.remove(handle)
            slot.attach(handle)
            slot.devices = _devices_holding(engine, slot) or slot.placed
            reason = "orphan carrying our marker, alive and healthy"
            data = {**handle.as_data(), "devices": list(slot.placed), "reason": reason}
            engine.record(slot, ev.Adopted(data=data))
            return [f"{slot.name}: adopted orphan {handle.instance}"]
    if was_starting:
        reason = "the coordinator stopped before the launch was recorded"
        engine.record(slot, ev.StartFailed(data={"reason": reason}))
        return [f"{slot.name}: start interrupted before launch"]
    return []


def _resume_start(engine: Engine, slot: Slot) -> str:
    assert slot.handle is not None
    handle = slot.handle
    runtime = engine.runtime(slot)
    result = engine.health.wait_healthy(
        slot.config.health,
        slot.start_deadline,
        still_alive=lambda: runtime.is_alive(handle),
        started_at=slot.start_times[-1] if slot.start_times else None,
    )
    if not result.ok and runtime.is_alive(handle):
        # Past its deadline the wait probes nothing; one that loaded while the
        # coordinator was down still deserves one look before it is killed.
        result = engine.health.probe(slot.config.health)
    if result.ok:
        engine.record(slot, ev.HealthPassed(data={"reason": "health wait resumed on recovery"}))
        return f"{slot.name}: resumed start, healthy"
    _stop_handle(engine, slot)
    slot.detach()
    # STARTING -> STOPPED
    engine.record(slot, ev.StartFailed(data={"reason": f"resumed on recovery: {result.reason}"}))
    return f"{slot.name}: resumed start failed"


def _crashed(engine: Engine, slot: Slot, reason: str) -> str:
    slot.detach(error=reason)
    # STARTING | HEALTHY -> STOPPED
    engine.record(slot, ev.Crashed(data={"reason": reason, **engine.vram_data(slot.device)}))
    return f"{slot.name}: {reason}"


def _stop_handle(engine: Engine, slot: Slot) -> None:
    if slot.handle is not None:
        # A process that cannot be stopped must not keep the coordinator from serving:
        # its memory then shows up as foreign usage.
        with contextlib.suppress(GpusmError):
            engine.runtime(slot).stop(slot.handle, slot.config.stop_timeout_s)


def reap(
    engine: Engine,
    handle: Handle,
    slot: Slot | None,
    reason: str = "no running state explains it",
) -> str:
    """Stop an instance carrying our marker that no running state explains; record it."""
    data: dict[str, Any] = {**handle.as_data(), "reason": reason}
    try:
        engine.runtime_of(handle).stop(handle, slot.config.stop_timeout_s if slot else 5.0)
    except GpusmError as exc:
        data["stop_error"] = str(exc)
    event = ev.OrphanReaped(data=data)
    if slot is not None:
        engine.record(slot, event)
    else:
        engine.note(ev.OrphanReaped(data={**event.data, "service": handle.service}))
    return f"{handle.service}: reaped orphan {handle.instance}"


def _handle_data(slot: Slot) -> dict[str, Any]:
    return slot.handle.as_data() if slot.handle else {}
