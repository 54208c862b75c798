"""Parking and waking one service: the sleep and wake steps, verified on the GPU.

Like starts and stops, each is a decision and a side effect. ``begin_park`` /
``begin_wake`` run under the engine's lock, commit the intent (``ParkRequested``,
``WakeRequested``) and take the slot. ``finish_park`` / ``run_wake`` run outside the lock
in the thread that owns the slot and end by committing the fact:

* park: the sleep steps, then the GPU must show the service's pids holding at most its
  residual plus the tolerance within ``park.settle_timeout_s`` -> ``Parked``; otherwise
  ``ParkFailed`` with the numbers, then a full stop with verified reclaim.
* wake: the wake steps, the health check, the warm-up steps -> ``Woken``; otherwise
  ``WakeFailed``, a verified stop, and a fresh start in its place (the same request
  waits for it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from gpusm.crashpoints import crash_point
from gpusm.domain import events as ev
from gpusm.domain.states import State
from gpusm.engine.lifecycle import (
    begin_start,
    finish_stop,
    in_background,
    releasing_on_error,
    run_start,
    wait_lease_released,
)
from gpusm.engine.reclaim import wait_parked
from gpusm.engine.state import Engine, Slot
from gpusm.errors import GpuProbeError, GpusmError, IllegalTransition, RequestTimeout
from gpusm.park_config import ParkStep, ParkSteps
from gpusm.results import StopNote

__all__ = ["begin_park", "begin_wake", "finish_park", "park_now", "run_wake"]


def begin_park(engine: Engine, slot: Slot, event: ev.ParkRequested) -> bool:
    """Commit ``ParkRequested`` and own the park; False (nothing recorded) unless the
    service is HEALTHY, can park and nobody owns it (caller holds the lock)."""
    if slot.state is not State.HEALTHY or slot.busy or slot.parking is None:
        return False
    data = {**event.data, "residual_mib": slot.residual_mib}
    # HEALTHY -> PARKING
    engine.record(slot, ev.ParkRequested(data={**data, **engine.vram_data(slot.device)}))
    return slot.claim()


def park_now(engine: Engine, slot: Slot, by: str, deadline: float) -> StopNote:
    """Park ``slot`` at once (its leases end) and wait until the park is verified or
    failed; the note's ``action`` is "park", or "stop" when the park failed and the
    service was stopped instead. A service already parked is left as it is."""
    reason = f"park requested by {by}"
    with engine.cond:
        if slot.state is State.PARKED:
            return StopNote(slot.name, "park", "already parked", "park")
        if slot.parking is None:
            raise GpusmError(f"service {slot.name!r} cannot park: its config has no park:")
        if slot.state is not State.HEALTHY or slot.busy:
            raise IllegalTransition(slot.name, "request_park", slot.state.value)
        engine.revoke(slot.name, f"{slot.name} was parked by {by}")
        with engine.decision():
            begin_park(engine, slot, ev.ParkRequested(data={"reason": reason, "by": by}))
        in_background(f"park-{slot.name}", lambda: finish_park(engine, slot))
        while _state_of(slot) in (State.PARKING, State.DRAINING):
            left = deadline - engine.clock.monotonic()
            if left <= 0:
                raise RequestTimeout(f"parking {slot.name} took too long")
            engine.cond.wait(min(left, 0.2))
        if _state_of(slot) is State.PARKED:
            return StopNote(slot.name, "park", reason, "park")
        failed = engine.last_event(slot.name, ["ParkFailed"])
        why = failed.data.get("reason") if failed is not None else slot.last_error
        return StopNote(slot.name, "park", f"{reason}; park failed: {why}; stopped instead")


def _state_of(slot: Slot) -> State:
    # Read afresh: other threads move the state while this one waits.
    return slot.state


def finish_park(engine: Engine, slot: Slot, wait_for_leases: bool = False) -> None:
    """Send the sleep steps, verify the memory came back, record ``Parked`` (or
    ``ParkFailed`` and stop it)."""
    with releasing_on_error(engine, slot):
        _finish_park(engine, slot, wait_for_leases)


def _finish_park(engine: Engine, slot: Slot, wait_for_leases: bool) -> None:
    crash_point("after_park_requested")
    if wait_for_leases:
        wait_lease_released(engine, slot)
    steps = slot.parking
    assert steps is not None  # begin_park checked it
    began = engine.clock.monotonic()
    failure = _run_steps(engine, slot, steps.sleep, "sleep")
    held = None
    if failure is None:
        failure, held = _verify_parked(engine, slot, steps)
    with engine.cond:
        residual = slot.residual_mib or 0
        numbers: dict[str, Any] = {"held_mib": held, "residual_mib": residual}
        numbers.update(tolerance_mib=steps.tolerance_mib, **engine.vram_data(slot.device))
        if failure is None and slot.state is State.PARKING:
            assert held is not None
            slot.learn_residual(held)
            park_s = round(engine.clock.monotonic() - began, 4)
            # PARKING -> PARKED
            engine.record(slot, ev.Parked(data={**numbers, "park_s": park_s}))
            slot.release()
            return
        if slot.state is not State.PARKING:
            slot.release()  # e.g. a crash was recorded meanwhile: nothing left to park
            return
        slot.fail(f"park failed: {failure}")
        # PARKING -> DRAINING: a park the GPU does not confirm becomes a stop
        engine.record(slot, ev.ParkFailed(data={"reason": failure, **numbers}))
    finish_stop(engine, slot)


def _verify_parked(engine: Engine, slot: Slot, steps: ParkSteps) -> tuple[str | None, int | None]:
    """(None, held) once the pids hold at most residual + tolerance; else (why, held)."""
    handle = slot.handle
    if handle is None:
        return "no running instance to park", None
    runtime = engine.runtime(slot)
    limit = (slot.residual_mib or 0) + steps.tolerance_mib
    parked, held, waited = True, 0, 0.0
    try:
        # On each of its devices (the residual is per device, as vram_mib is).
        for device in slot.placed:
            ok, held, took = wait_parked(
                engine.probe,
                pids_of=lambda: engine.pids(slot),
                max_held_mib=limit,
                device=device,
                settle_timeout_s=max(0.0, steps.settle_timeout_s - waited),
                clock=engine.clock,
                alive=lambda: runtime.is_alive(handle),
            )
            waited += took
            if not ok:
                parked = False
                break
    except GpuProbeError as exc:
        return f"cannot read the GPU to verify the park: {exc}", None
    if parked:
        return None, held
    if not runtime.is_alive(handle):
        return "the process exited while parking", held
    return (
        f"still holding {held} MiB after {waited:.1f}s, more than its residual "
        f"{slot.residual_mib} MiB + tolerance {steps.tolerance_mib} MiB",
        held,
    )


def begin_wake(engine: Engine, slot: Slot, data: dict[str, Any]) -> None:
    """Commit ``WakeRequested`` and own the wake (caller holds the lock; PARKED, idle)."""
    slot.claim_wake(engine.clock.monotonic())
    try:
        # PARKED -> WAKING
        engine.record(slot, ev.WakeRequested(data={**data, **engine.vram_data(slot.device)}))
    except BaseException:
        slot.release()
        raise


def run_wake(engine: Engine, slot: Slot) -> None:
    """Send the wake steps, wait for health, warm up, record ``Woken``; a wake that fails
    is recorded (``WakeFailed``), stopped and replaced by a fresh start."""
    with releasing_on_error(engine, slot):
        _run_wake(engine, slot)


def _run_wake(engine: Engine, slot: Slot) -> None:
    crash_point("after_wake_requested")
    steps = slot.parking
    failure = "it has no park: config any more" if steps is None else None
    if steps is not None:
        failure = _run_steps(engine, slot, steps.wake, "wake")
    if failure is None:
        failure = _wait_healthy(engine, slot)
    if failure is None and steps is not None:
        failure = _run_steps(engine, slot, steps.warmup, "warmup")
    with engine.cond:
        if slot.state is State.WAKING and failure is None:
            now = engine.clock.monotonic()
            slot.touch(now)
            # WAKING -> HEALTHY
            engine.record(slot, ev.Woken(data={"wake_s": round(now - slot.wake_started, 4)}))
            slot.release()
            return
        if slot.state is State.WAKING:
            slot.fail(f"wake failed: {failure}")
            # WAKING -> DRAINING: stop it, then start it afresh
            data = {"reason": failure, **engine.vram_data(slot.device)}
            engine.record(slot, ev.WakeFailed(data=data))
            restart = True
        else:
            restart = False  # drained while waking: whoever drained it wants it stopped
    if slot.state is not State.DRAINING:
        with engine.cond:
            slot.release()  # e.g. a crash was recorded meanwhile
        return
    finish_stop(engine, slot, keep_claim=restart)
    if restart:
        _restart(engine, slot, failure or "")


def _restart(engine: Engine, slot: Slot, failure: str) -> None:
    with engine.cond:
        if engine.closed or slot.state is not State.STOPPED:
            slot.release()
            return
        data = {"reason": f"wake failed ({failure}); starting afresh", "by": "wake fallback"}
        # STOPPED -> STARTING, by the thread that still owns the slot
        begin_start(engine, slot, data, fallback=True)
    run_start(engine, slot)


def _wait_healthy(engine: Engine, slot: Slot) -> str | None:
    handle = slot.handle
    if handle is None:
        return "no running instance to wake"
    runtime = engine.runtime(slot)
    result = engine.health.wait_healthy(
        slot.config.health,
        slot.start_deadline,
        still_alive=lambda: slot.state is State.WAKING and runtime.is_alive(handle),
        started_at=slot.wake_started,
    )
    return None if result.ok else (result.reason or "health check failed")


def _run_steps(engine: Engine, slot: Slot, steps: Sequence[ParkStep], what: str) -> str | None:
    """Send each step in order; the first failure, as a reason, or None."""
    for step in steps:
        if step.signal is not None:
            handle = slot.handle
            if handle is None:
                return f"{what}: no running instance to signal"
            try:
                engine.runtime(slot).signal(handle, step.signal)
            except GpusmError as exc:
                return f"{what}: {exc}"
        elif step.http is not None:
            if engine.control is None:
                return f"{what}: no service control to send {step.describe()}"
            result = engine.control.call(step.http)
            if not result.ok:
                return f"{what}: {result.reason}"
    return None
