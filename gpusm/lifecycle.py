"""Starting and stopping one service: intent recorded first, fact after.

``begin_start`` / ``begin_drain`` are decisions: they run under the core's lock, commit
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

from gpusm.core import Core, Slot
from gpusm.crashpoints import crash_point
from gpusm.domain import events as ev
from gpusm.domain.states import RUNNING_STATES, State
from gpusm.errors import GpuProbeError, GpusmError, VramNotReclaimed
from gpusm.reclaim import unattributed_mib, wait_reclaimed

__all__ = [
    "begin_drain",
    "begin_start",
    "finish_stop",
    "in_background",
    "join_background",
    "run_start",
]

_NVML_SLACK_MIB = 64
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


def begin_start(core: Core, slot: Slot, data: dict[str, Any]) -> None:
    """Commit ``StartRequested`` and take ownership (caller holds the lock)."""
    now = core.clock.monotonic()
    slot.busy = True
    slot.last_error = None
    slot.health_failures = 0
    slot.generation += 1
    slot.start_times.append(now)
    slot.start_deadline = now + slot.config.health.timeout_s
    try:
        core.record(slot, ev.StartRequested(data={**data, **core.vram_data(slot.config.gpu)}))
    except BaseException:
        slot.busy = False
        raise


def run_start(core: Core, slot: Slot) -> None:
    """Launch, record ``ProcessLaunched``, wait for health, record the outcome.

    Whatever goes wrong, the busy flag is released: a start left STARTING without an
    owner is drained by the monitor, a stop left DRAINING is retried by it.
    """
    with _releasing_on_error(core, slot):
        _run_start(core, slot)


def finish_stop(core: Core, slot: Slot, wait_for_leases: bool = False) -> None:
    """Stop the draining service, verify its VRAM is back, record ``Stopped``."""
    with _releasing_on_error(core, slot):
        _finish_stop(core, slot, wait_for_leases)


@contextmanager
def _releasing_on_error(core: Core, slot: Slot) -> Iterator[None]:
    try:
        yield
    except BaseException as exc:
        with core.cond:
            if slot.busy:
                slot.busy = False
                slot.last_error = slot.last_error or f"{type(exc).__name__}: {exc}"
            core.cond.notify_all()
        raise


def _run_start(core: Core, slot: Slot) -> None:
    crash_point("after_start_requested")
    instance = uuid.uuid4().hex
    try:
        handle = core.runtime(slot).start(slot.config, instance)
    except GpusmError as exc:
        _start_failed(core, slot, f"launch failed: {exc}")
        raise
    crash_point("after_spawn")
    with core.cond:
        slot.handle = handle
        draining = slot.state is State.DRAINING
        if not draining:
            core.record(slot, ev.ProcessLaunched(data=handle.as_data()))
    if draining:
        finish_stop(core, slot)
        return
    crash_point("after_launched")
    runtime = core.runtime(slot)
    result = core.health.wait_healthy(
        slot.config.health,
        slot.start_deadline,
        still_alive=lambda: slot.state is State.STARTING and runtime.is_alive(handle),
        started_at=slot.start_times[-1],
    )
    crash_point("before_health_passed")
    with core.cond:
        if slot.state is State.STARTING and result.ok:
            slot.last_used = max(slot.last_used, core.clock.monotonic())
            elapsed = core.clock.monotonic() - slot.start_times[-1]
            core.record(
                slot,
                ev.HealthPassed(
                    data={"time_to_healthy_s": round(elapsed, 4), "probes": result.probes}
                ),
            )
            slot.busy = False
            return
        drained = slot.state is State.DRAINING
    if drained:
        finish_stop(core, slot)
        return
    reason = result.reason or "health check failed"
    log = _log_tail(core, slot)
    _stop_quietly(core, slot)
    _start_failed(core, slot, f"{reason}{log}")
    raise GpusmError(f"service {slot.name!r} failed to start: {reason}")


def _start_failed(core: Core, slot: Slot, reason: str) -> None:
    with core.cond:
        slot.last_error = reason
        slot.handle = None
        if slot.state is State.STARTING:
            core.record(slot, ev.StartFailed(data={"reason": reason}))
        elif slot.state is State.DRAINING:
            core.record(slot, ev.Stopped(data={"reason": f"start aborted: {reason}"}))
        slot.busy = False
        core.cond.notify_all()


def _log_tail(core: Core, slot: Slot) -> str:
    tail_fn = getattr(core.runtime(slot), "log_tail", None)
    if tail_fn is None or slot.config.runtime != "native":
        return ""
    try:
        tail = str(tail_fn(slot.name, 5)).strip()
    except (OSError, GpusmError):
        return ""
    return f"; last log lines: {tail}" if tail else ""


def _stop_quietly(core: Core, slot: Slot) -> None:
    """Kill what is left of a failed start and wait (best effort) for its VRAM."""
    if slot.handle is None:
        return
    pids = core.pids(slot)
    try:
        core.runtime(slot).stop(slot.handle, slot.config.stop_timeout_s)
        wait_reclaimed(
            core.probe,
            service=slot.name,
            pids=pids,
            expect_free_mib=0,
            device=slot.config.gpu,
            settle_timeout_s=core.config.gpu.settle_timeout_s,
            clock=core.clock,
        )
    except GpusmError:
        pass  # the start already failed; the reclaim state shows up in the next plan


def begin_drain(core: Core, slot: Slot, event: ev.ServiceEvent) -> bool:
    """Commit the drain intent; True if the caller now owns the stop (caller holds the lock).

    A service that is starting is owned by its starting thread, which sees the drain
    and stops it; the caller then only waits.
    """
    if slot.state not in RUNNING_STATES:
        return False
    core.record(slot, type(event)(data={**event.data, **core.vram_data(slot.config.gpu)}))
    if slot.busy:
        return False
    slot.busy = True
    return True


def _finish_stop(core: Core, slot: Slot, wait_for_leases: bool) -> None:
    crash_point("after_drain_requested")
    if wait_for_leases:
        _wait_lease_released(core, slot)
    handle = slot.handle
    data: dict[str, Any] = {}
    pids = core.pids(slot)
    held, unattributed = _held_mib(core, slot, pids)
    if handle is not None:
        try:
            result = core.runtime(slot).stop(handle, slot.config.stop_timeout_s)
        except GpusmError as exc:
            with core.cond:
                slot.last_error = str(exc)
                slot.busy = False  # still DRAINING: the monitor tries again
                core.cond.notify_all()
            raise
        data.update(
            stop_s=round(result.duration_s, 4),
            escalated=result.escalated,
            already_dead=result.already_dead,
        )
    crash_point("after_signal")
    error: VramNotReclaimed | None = None
    try:
        data["reclaim_s"] = round(
            wait_reclaimed(
                core.probe,
                service=slot.name,
                pids=pids,
                expect_free_mib=0,
                max_unattributed_mib=unattributed,
                device=slot.config.gpu,
                settle_timeout_s=core.config.gpu.settle_timeout_s,
                clock=core.clock,
            ),
            4,
        )
        data["vram_reclaimed"] = True
    except VramNotReclaimed as exc:
        error = exc
        data.update(vram_reclaimed=False, error=str(exc))
    except GpuProbeError as exc:
        data.update(vram_reclaimed=False, error=str(exc))
    with core.cond:
        data.update(held_mib=held, **core.vram_data(slot.config.gpu))
        slot.handle = None
        slot.last_error = data.get("error")
        core.record(slot, ev.Stopped(data=data))
        slot.busy = False
    if error is not None:
        raise error


def _held_mib(core: Core, slot: Slot, pids: set[int]) -> tuple[int, int | None]:
    """What the service holds now, and the unattributed memory its exit may not leave behind."""
    try:
        snap = core.snapshot(slot.config.gpu)
    except GpuProbeError:
        return 0, None
    # A real driver's unattributed memory (contexts, caches) wobbles a little; the
    # simulated GPU's is exact.
    slack = 0 if core.config.gpu.backend == "sim" else _NVML_SLACK_MIB
    held = sum(snap.processes.get(pid, 0) for pid in pids)
    return held, unattributed_mib(snap) + slack


def _wait_lease_released(core: Core, slot: Slot) -> None:
    """Preemption: no new dispatch; give the holders up to ``drain_timeout_s`` to let go."""
    deadline = core.clock.monotonic() + slot.config.drain_timeout_s
    with core.cond:
        while slot.name in core.leased() and not core.closed:
            left = deadline - core.clock.monotonic()
            if left <= 0:
                break
            core.cond.wait(min(left, 0.5))
