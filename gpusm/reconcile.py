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
any                    memory held by a pid that   counted as foreign usage, never touched
                       is not ours
=====================  ==========================  =========================================

Recovery reads only each stream's head and its latest few events, so its cost does not
grow with the length of the log.
"""

from __future__ import annotations

import contextlib
from typing import Any

from gpusm.core import Core, Slot
from gpusm.domain import events as ev
from gpusm.domain.events import COORDINATOR_STREAM
from gpusm.domain.machine import ServiceMachine
from gpusm.domain.states import ACTIVE_STATES, State
from gpusm.errors import GpusmError
from gpusm.lifecycle import finish_stop
from gpusm.ports import Handle, Runtime

__all__ = ["recover"]

_HANDLE_EVENTS = ("StartRequested", "ProcessLaunched", "Adopted")


def recover(core: Core) -> dict[str, Any]:
    """Bring memory and the log in line with what really runs; returns what was corrected."""
    heads = core.store.heads()
    if COORDINATOR_STREAM in heads:
        core.coordinator_version = heads[COORDINATOR_STREAM].version
    for name, slot in core.slots.items():
        head = heads.get(name)
        if head is not None:
            state = State(head.state) if head.state else State.STOPPED
            slot.machine = ServiceMachine(name, state, head.version)
        _restore_handle(core, slot)
        slot.state_since = core.clock.monotonic()
    orphans = _orphans(core)
    fixes: list[str] = []
    for slot in core.slots.values():
        mine = [h for h in orphans if h.service == slot.name]
        believed = slot.handle
        extra = [h for h in mine if believed is None or h.instance != believed.instance]
        fixes += _reconcile(core, slot, extra)
        for handle in extra:
            if slot.handle is None or handle.instance != slot.handle.instance:
                fixes.append(_reap(core, core.runtime(slot), handle, slot))
    for handle in orphans:
        if handle.service not in core.slots:
            runtime = _runtime_for(core, handle)
            fixes.append(_reap(core, runtime, handle, None))
    summary = {"corrections": fixes, **core.vram_data(0)}
    core.note(ev.Recovered(data=summary))
    return summary


def _restore_handle(core: Core, slot: Slot) -> None:
    last = core.last_event(slot.name, _HANDLE_EVENTS)
    believed_running = slot.state in ACTIVE_STATES
    if (
        believed_running
        and last is not None
        and last.type != "StartRequested"
        and last.data.get("instance")
    ):
        data = last.data
        slot.handle = Handle(
            service=slot.name,
            instance=str(data["instance"]),
            pid=data.get("pid"),
            create_time=data.get("create_time"),
            container_id=data.get("container_id"),
        )
    peak = core.last_event(slot.name, ["VramObserved"])
    if peak is not None:
        slot.learned_peak_mib = int(peak.data.get("peak_mib", 0))
    started = core.last_event(slot.name, ["StartRequested"])
    if started is not None and slot.state is State.STARTING:
        # The original deadline, carried over from wall time to this process's timers.
        elapsed = (core.clock.now() - started.at).total_seconds()
        slot.start_deadline = core.clock.monotonic() + slot.config.health.timeout_s - elapsed
        slot.start_times.append(core.clock.monotonic() - elapsed)


def _orphans(core: Core) -> list[Handle]:
    found: list[Handle] = []
    for kind, runtime in core.runtimes.items():
        try:
            found += runtime.find_orphans()
        except GpusmError as exc:
            # E.g. the Docker engine is down: what it runs cannot be seen, let alone
            # touched; the services themselves are reconciled below.
            core.note(ev.Recovered(data={"warning": f"{kind} runtime unreachable: {exc}"}))
    return found


def _runtime_for(core: Core, handle: Handle) -> Runtime:
    return core.runtimes["docker" if handle.container_id else "native"]


def _alive(core: Core, slot: Slot) -> bool:
    if slot.handle is None:
        return False
    try:
        return core.runtime(slot).is_alive(slot.handle)
    except GpusmError:
        return False  # unobservable (engine down) counts as lost; a later recovery reaps it


def _reconcile(core: Core, slot: Slot, extra: list[Handle]) -> list[str]:
    state = slot.state
    if state is State.STOPPED or (state is State.STARTING and slot.handle is None):
        return _adopt_or_reap(core, slot, extra)
    if state is State.STARTING:
        if not _alive(core, slot):
            return [_crashed(core, slot, "found dead on recovery while starting")]
        return [_resume_start(core, slot)]
    if state is State.HEALTHY:
        if not _alive(core, slot):
            return [_crashed(core, slot, "found dead on recovery (or its pid was reused)")]
        result = core.health.wait_healthy(
            slot.config.health,
            core.clock.monotonic()
            + slot.config.health.probe_timeout_s * slot.config.health.failures_before_crash,
            still_alive=lambda: _alive(core, slot),
        )
        if result.ok:
            core.record(
                slot, ev.Adopted(data={**_handle_data(slot), "reason": "alive and healthy"})
            )
            return [f"{slot.name}: adopted"]
        _stop_handle(core, slot)
        return [_crashed(core, slot, f"alive but unhealthy on recovery: {result.reason}")]
    if state is State.DRAINING:
        if slot.handle is None and extra:
            # Drained before its launch was recorded: the marked instance is what to stop.
            slot.handle = extra.pop(0)
        slot.busy = True
        try:
            finish_stop(core, slot)
        except GpusmError as exc:
            return [f"{slot.name}: stop finished with an error: {exc}"]
        return [f"{slot.name}: finished the interrupted stop"]
    return []


def _adopt_or_reap(core: Core, slot: Slot, extra: list[Handle]) -> list[str]:
    was_starting = slot.state is State.STARTING
    for handle in extra:
        if core.runtime(slot).is_alive(handle) and core.health.probe(slot.config.health).ok:
            extra.remove(handle)
            slot.handle = handle
            reason = "orphan carrying our marker, alive and healthy"
            core.record(slot, ev.Adopted(data={**handle.as_data(), "reason": reason}))
            return [f"{slot.name}: adopted orphan {handle.instance}"]
    if was_starting:
        reason = "the coordinator stopped before the launch was recorded"
        core.record(slot, ev.StartFailed(data={"reason": reason}))
        return [f"{slot.name}: start interrupted before launch"]
    return []


def _resume_start(core: Core, slot: Slot) -> str:
    assert slot.handle is not None
    handle = slot.handle
    runtime = core.runtime(slot)
    result = core.health.wait_healthy(
        slot.config.health,
        slot.start_deadline,
        still_alive=lambda: runtime.is_alive(handle),
        started_at=slot.start_times[-1] if slot.start_times else None,
    )
    if not result.ok and runtime.is_alive(handle):
        # Past its deadline the wait probes nothing; one that loaded while the
        # coordinator was down still deserves one look before it is killed.
        result = core.health.probe(slot.config.health)
    if result.ok:
        core.record(slot, ev.HealthPassed(data={"reason": "health wait resumed on recovery"}))
        return f"{slot.name}: resumed start, healthy"
    _stop_handle(core, slot)
    slot.handle = None
    core.record(slot, ev.StartFailed(data={"reason": f"resumed on recovery: {result.reason}"}))
    return f"{slot.name}: resumed start failed"


def _crashed(core: Core, slot: Slot, reason: str) -> str:
    slot.handle = None
    core.record(slot, ev.Crashed(data={"reason": reason, **core.vram_data(slot.config.gpu)}))
    return f"{slot.name}: {reason}"


def _stop_handle(core: Core, slot: Slot) -> None:
    if slot.handle is not None:
        # A process that cannot be stopped must not keep the coordinator from serving:
        # its memory then shows up as foreign usage.
        with contextlib.suppress(GpusmError):
            core.runtime(slot).stop(slot.handle, slot.config.stop_timeout_s)


def _reap(core: Core, runtime: Runtime, handle: Handle, slot: Slot | None) -> str:
    data: dict[str, Any] = {**handle.as_data(), "reason": "no running state explains it"}
    try:
        runtime.stop(handle, slot.config.stop_timeout_s if slot else 5.0)
    except GpusmError as exc:
        data["stop_error"] = str(exc)
    event = ev.OrphanReaped(data=data)
    if slot is not None:
        core.record(slot, event)
    else:
        core.note(ev.OrphanReaped(data={**event.data, "service": handle.service}))
    return f"{handle.service}: reaped orphan {handle.instance}"


def _handle_data(slot: Slot) -> dict[str, Any]:
    return slot.handle.as_data() if slot.handle else {}
