"""Starting and stopping one service: intent recorded first, fact after.

``begin_start`` / ``begin_drain`` are decisions: they run under the engine's lock, commit
the intent (``StartRequested``, ``DrainRequested``/``Evicted``/``Preempted``) and mark
the service busy. ``run_start`` / ``finish_stop`` are the side effects, run by the
thread that owns the busy flag, outside the lock; each ends by committing the fact
(``HealthPassed``/``StartFailed``, ``Stopped``) and clearing the flag. A service drained
while it is still starting is stopped by its starting thread, which owns it.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from gpusm.crashpoints import crash_point
from gpusm.domain import events as ev
from gpusm.domain.states import RUNNING_STATES, State
from gpusm.engine.reclaim import unattributed_mib, wait_reclaimed
from gpusm.engine.state import Engine, Slot
from gpusm.errors import GpuProbeError, GpusmError, VramNotReclaimed

__all__ = [
    "begin_drain",
    "begin_start",
    "finish_stop",
    "in_background",
    "join_background",
    "releasing_on_error",
    "run_start",
    "wait_lease_released",
]

_log = logging.getLogger("gpusm")
_threads: set[threading.Thread] = set()
_threads_lock = threading.Lock()


def in_background(name: str, fn: Callable[[], Any]) -> threading.Thread:
    """Run ``fn`` in a daemon thread whose errors are already recorded as events."""

    def body() -> None:
        try:
            fn()
        except GpusmError:
            pass  # recorded by the step that failed; the waiting request reports it
        except Exception:  # a bug: say so, but never take the process down
            _log.exception("gpusm background task %s failed", name)
        finally:
            with _threads_lock:
                _threads.discard(thread)

    thread = threading.Thread(target=body, name=f"gpusm-{name}", daemon=True)
    with _threads_lock:
        # Started under the lock, so join_background never sees an unstarted thread.
        _threads.add(thread)
        thread.start()
    return thread


def join_background(timeout_s: float) -> None:
    """Wait (bounded) for every background start and stop to finish."""
    with _threads_lock:
        threads = list(_threads)
    for thread in threads:
        if thread is not threading.current_thread():
            thread.join(timeout=timeout_s)


def begin_start(
    engine: Engine,
    slot: Slot,
    data: dict[str, Any],
    fallback: bool = False,
    devices: tuple[int, ...] | None = None,
) -> None:
    """Commit ``StartRequested`` and take ownership (caller holds the lock).

    ``devices``: where it runs (None: where it ran last, or its pinned device); they
    are recorded with the intent. ``fallback``: the start follows a failed wake, by the
    thread that owns the slot.
    """
    slot.apply_pending()  # a start always runs the newest config
    slot.claim_start(engine.clock.monotonic(), fallback)
    try:
        if devices:
            slot.devices = devices
        vram = engine.vram_data(slot.device)
        placed = {"config": slot.config.fingerprint(), "devices": list(slot.placed)}
        engine.record(slot, ev.StartRequested(data={**data, **placed, **vram}))
    except BaseException:
        slot.release()
        raise


def run_start(engine: Engine, slot: Slot) -> None:
    """Launch, record ``ProcessLaunched``, wait for health, record the outcome.

    Whatever goes wrong, the busy flag is released: a start left STARTING without an
    owner is drained by the monitor, a stop left DRAINING is retried by it.
    """
    with releasing_on_error(engine, slot):
        _run_start(engine, slot)


def finish_stop(
    engine: Engine, slot: Slot, wait_for_leases: bool = False, keep_claim: bool = False
) -> None:
    """Stop the draining service, verify its VRAM is back, record ``Stopped``.

    ``keep_claim``: the caller goes on owning the slot afterwards (a failed wake's
    restart); on an error it is released all the same.
    """
    with releasing_on_error(engine, slot):
        _finish_stop(engine, slot, wait_for_leases, keep_claim)


@contextmanager
def releasing_on_error(engine: Engine, slot: Slot) -> Iterator[None]:
    """Whatever escapes the block, the slot's owner lets go of it (recording why)."""
    try:
        yield
    except BaseException as exc:
        with engine.cond:
            if slot.busy:
                slot.release(error=f"{type(exc).__name__}: {exc}")
            engine.cond.notify_all()
        raise


def _run_start(engine: Engine, slot: Slot) -> None:
    crash_point("after_start_requested")
    instance = uuid.uuid4().hex
    try:
        handle = engine.runtime(slot).start(slot.config, instance, engine.placement(slot))
    except GpusmError as exc:
        _start_failed(engine, slot, f"launch failed: {exc}")
        raise
    crash_point("after_spawn")
    with engine.cond:
        slot.attach(handle)
        draining = slot.state is State.DRAINING
        if not draining:
            engine.record(slot, ev.ProcessLaunched(data=handle.as_data()))
    if draining:
        finish_stop(engine, slot)
        return
    crash_point("after_launched")
    runtime = engine.runtime(slot)
    result = engine.health.wait_healthy(
        slot.config.health,
        slot.start_deadline,
        still_alive=lambda: slot.state is State.STARTING and runtime.is_alive(handle),
        started_at=slot.start_times[-1],
    )
    crash_point("before_health_passed")
    with engine.cond:
        if slot.state is State.STARTING and result.ok:
            slot.touch(engine.clock.monotonic())
            elapsed = engine.clock.monotonic() - slot.start_times[-1]
            slot.learn_load(elapsed)
            engine.record(
                slot,
                ev.HealthPassed(
                    data={"time_to_healthy_s": round(elapsed, 4), "probes": result.probes}
                ),
            )
            slot.release()
            return
        drained = slot.state is State.DRAINING
    if drained:
        finish_stop(engine, slot)
        return
    reason = result.reason or "health check failed"
    code = runtime.exit_code(handle) if not runtime.is_alive(handle) else None
    if code is not None:
        reason = f"{reason}; exit code {code}"
    log = _log_tail(engine, slot)
    _stop_quietly(engine, slot)
    _start_failed(engine, slot, f"{reason}{log}", exit_code=code)
    raise GpusmError(f"service {slot.name!r} failed to start: {reason}")


def _start_failed(engine: Engine, slot: Slot, reason: str, exit_code: int | None = None) -> None:
    with engine.cond:
        slot.detach(error=reason)
        if slot.state is State.STARTING:
            # STARTING -> STOPPED
            data: dict[str, Any] = {"reason": reason}
            if exit_code is not None:
                data["exit_code"] = exit_code
            engine.record(slot, ev.StartFailed(data=data))
        elif slot.state is State.DRAINING:
            # DRAINING -> STOPPED: drained while it was failing to start
            engine.record(slot, ev.Stopped(data={"reason": f"start aborted: {reason}"}))
        slot.release()
        engine.cond.notify_all()


def _log_tail(engine: Engine, slot: Slot) -> str:
    if slot.handle is None:
        return ""
    tail = engine.runtime(slot).log_tail(slot.handle, 5).strip()
    return f"; last log lines: {tail}" if tail else ""


def _stop_quietly(engine: Engine, slot: Slot) -> None:
    """Kill what is left of a failed start and wait (best effort) for its VRAM."""
    if slot.handle is None:
        return
    pids = engine.pids(slot)
    try:
        engine.runtime(slot).stop(slot.handle, slot.config.stop_timeout_s)
        for device in slot.placed:
            wait_reclaimed(
                engine.probe,
                service=slot.name,
                pids=pids,
                expect_free_mib=0,
                device=device,
                settle_timeout_s=engine.config.gpu.settle_timeout_s,
                clock=engine.clock,
            )
    except GpusmError:
        pass  # the start already failed; the reclaim state shows up in the next plan


def begin_drain(engine: Engine, slot: Slot, event: ev.ServiceEvent) -> bool:
    """Commit the drain intent; True if the caller now owns the stop (caller holds the lock).

    A service that is starting is owned by its starting thread, which sees the drain
    and stops it; the caller then only waits.
    """
    if slot.state not in RUNNING_STATES and slot.state is not State.PARKED:
        return False
    engine.record(slot, type(event)(data={**event.data, **engine.vram_data(slot.device)}))
    return slot.claim()


def _finish_stop(engine: Engine, slot: Slot, wait_for_leases: bool, keep_claim: bool) -> None:
    crash_point("after_drain_requested")
    if wait_for_leases:
        wait_lease_released(engine, slot)
    handle = slot.handle
    data: dict[str, Any] = {}
    pids = engine.pids(slot)
    held = {device: _held_mib(engine, device, pids) for device in slot.placed}
    if handle is not None:
        try:
            result = engine.runtime(slot).stop(handle, slot.config.stop_timeout_s)
        except GpusmError as exc:
            with engine.cond:
                slot.fail(str(exc))
                slot.release()  # still DRAINING: the monitor tries again
                engine.cond.notify_all()
            raise
        data.update(
            stop_s=round(result.duration_s, 4),
            escalated=result.escalated,
            already_dead=result.already_dead,
        )
    crash_point("after_signal")
    error: VramNotReclaimed | None = None
    try:
        # Every device it held memory on, one after the other: the slowest one counts.
        reclaim_s = 0.0
        for device, (_, unattributed) in held.items():
            reclaim_s = max(
                reclaim_s,
                wait_reclaimed(
                    engine.probe,
                    service=slot.name,
                    pids=pids,
                    expect_free_mib=0,
                    max_unattributed_mib=unattributed,
                    device=device,
                    settle_timeout_s=engine.config.gpu.settle_timeout_s,
                    clock=engine.clock,
                ),
            )
        data["reclaim_s"] = round(reclaim_s, 4)
        data["vram_reclaimed"] = True
    except VramNotReclaimed as exc:
        error = exc
        data.update(vram_reclaimed=False, error=str(exc))
    except GpuProbeError as exc:
        data.update(vram_reclaimed=False, error=str(exc))
    with engine.cond:
        data.update(held_mib=sum(mib for mib, _ in held.values()), **engine.vram_data(slot.device))
        if len(held) > 1:
            data["devices"] = list(held)
        slot.detach(error=data.get("error"))
        # DRAINING -> STOPPED
        engine.record(slot, ev.Stopped(data=data))
        if not keep_claim or error is not None:
            slot.release()
    if error is not None:
        raise error


def _held_mib(engine: Engine, device: int, pids: set[int]) -> tuple[int, int | None]:
    """What ``pids`` hold on ``device`` now, and the unattributed memory their exit may
    not leave behind there."""
    try:
        snap = engine.snapshot(device)
    except GpuProbeError:
        return 0, None
    # A real driver's unattributed memory (contexts, caches) wobbles a little.
    slack = engine.probe.slack_mib
    held = sum(snap.processes.get(pid, 0) for pid in pids)
    return held, unattributed_mib(snap) + slack


def wait_lease_released(engine: Engine, slot: Slot) -> None:
    """Preemption: no new dispatch; give the holders up to ``drain_timeout_s`` to let go;
    whoever still holds it then loses its lease."""
    deadline = engine.clock.monotonic() + slot.config.drain_timeout_s
    with engine.cond:
        while slot.name in engine.leased() and not engine.closed:
            left = deadline - engine.clock.monotonic()
            if left <= 0:
                break
            engine.cond.wait(min(left, 0.5))
        # Whoever still holds it loses its lease: a lease on a stopped service would make
        # the service look in use the next time it runs for someone else.
        timeout = slot.config.drain_timeout_s
        engine.revoke(slot.name, f"{slot.name} was preempted (drain_timeout_s {timeout:g} passed)")
