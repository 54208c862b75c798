"""Liveness: a background thread that notices crashes, failing health, growth and idleness.

Each tick it (1) records ``Crashed`` for a healthy service whose process is gone, or
that failed its health check ``failures_before_crash`` times in a row (after stopping
it); (2) restarts crashed services that a client still needs, with exponential backoff
and a start budget per window, after which the service goes to ``failed``; (3) records
``VramObserved`` when a service's measured use exceeds its learned peak; (4) stops idle
services whose ``idle_ttl_s`` has passed; (5) retries stops that failed.
"""

from __future__ import annotations

import logging
import threading
from functools import partial

from gpusm.core import Core, Slot
from gpusm.domain import events as ev
from gpusm.domain import policy
from gpusm.domain.states import State
from gpusm.errors import GpusmError
from gpusm.lifecycle import begin_drain, begin_start, finish_stop, in_background, run_start

__all__ = ["Monitor"]

_log = logging.getLogger("gpusm")


class Monitor:
    """Runs :meth:`tick` every ``interval_s`` until stopped."""

    def __init__(self, core: Core, interval_s: float = 0.25) -> None:
        self.core = core
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gpusm-monitor", daemon=True)
        self._last_probe: dict[str, float] = {}
        # The start generation each scheduled restart was for; a start since makes it moot.
        self._restart_for: dict[str, int] = {}

    def start(self) -> None:
        """Start the background thread."""
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread and wait for its current tick."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.tick()
            except GpusmError:
                continue  # e.g. the GPU was unreadable this tick; try again next tick
            except Exception:  # a bug: log it, and keep watching the services
                _log.exception("gpusm monitor tick failed")

    def tick(self) -> None:
        """One pass over every service."""
        core = self.core
        for slot in list(core.slots.values()):
            if core.closed:
                return
            # One service's trouble (an engine that is down, a stop that failed) must
            # not blind the monitor to the others.
            try:
                self._check_slot(slot)
            except GpusmError:
                continue
        for step in (self._observe_vram, self._restart_due, self._expire_idle):
            try:
                step()
            except GpusmError:
                continue

    def _check_slot(self, slot: Slot) -> None:
        core = self.core
        if slot.state is State.HEALTHY and not slot.busy:
            self._check_liveness(slot)
        with core.cond:
            if slot.busy or core.closed:
                return
            if slot.state is State.STARTING:
                # A start whose owner gave up on an error: nobody will finish it.
                reason = f"start abandoned: {slot.last_error or 'its owner failed'}"
                if not begin_drain(core, slot, ev.DrainRequested(data={"reason": reason})):
                    return
            elif slot.state is State.DRAINING:
                slot.busy = True  # a stop that failed before: try again
            else:
                return
        in_background(f"stop-{slot.name}", partial(finish_stop, core, slot))

    # ---------------------------------------------------------------- crashes
    def _check_liveness(self, slot: Slot) -> None:
        core = self.core
        handle = slot.handle
        if handle is None or not core.runtime(slot).is_alive(handle):
            self._crashed(slot, "process exited", None)
            return
        now = core.clock.monotonic()
        interval = slot.config.health.interval_s or 1.0
        if now - self._last_probe.get(slot.name, 0.0) < interval:
            return
        self._last_probe[slot.name] = now
        result = core.health.probe(slot.config.health)
        with core.cond:
            slot.health_failures = 0 if result.ok else slot.health_failures + 1
            failing = slot.health_failures >= slot.config.health.failures_before_crash
        if failing:
            core.runtime(slot).stop(handle, slot.config.stop_timeout_s)
            self._crashed(slot, f"health failed {slot.health_failures} times: {result.reason}", 0)

    def _crashed(self, slot: Slot, reason: str, code: int | None) -> None:
        core = self.core
        exit_code = code
        exit_fn = getattr(core.runtime(slot), "exit_code", None)
        if exit_code is None and exit_fn is not None and slot.handle is not None:
            exit_code = exit_fn(slot.handle)
        with core.cond:
            if slot.state is not State.HEALTHY or slot.busy:
                return
            slot.handle = None
            slot.health_failures = 0
            slot.last_error = reason
            data = {"reason": reason, "exit_code": exit_code, **core.vram_data(slot.config.gpu)}
            core.record(slot, ev.Crashed(data=data))
            self._schedule_restart(slot)

    def _schedule_restart(self, slot: Slot) -> None:
        restart = slot.config.restart
        if restart.policy != "on-failure" or slot.name not in self.core.leased():
            return
        now = self.core.clock.monotonic()
        if not policy.start_budget_left(
            slot.start_times, now, restart.max_starts, restart.window_s
        ):
            reason = f"{restart.max_starts} starts within {restart.window_s:g}s; giving up"
            slot.last_error = reason
            self.core.record(slot, ev.GaveUp(data={"reason": reason}))
            return
        # Backoff grows with the starts inside the window: 1 s, 2 s, 4 s… capped.
        attempt = max(1, sum(1 for t in slot.start_times if now - t < restart.window_s))
        delay = policy.restart_delay(attempt, restart.backoff_initial_s, restart.backoff_max_s)
        slot.restart_at = now + delay
        self._restart_for[slot.name] = slot.generation

    def _restart_due(self) -> None:
        core = self.core
        now = core.clock.monotonic()
        with core.cond:
            for slot in core.slots.values():
                if slot.restart_at is not None and (
                    self._restart_for.get(slot.name) != slot.generation
                ):
                    # Started by someone else since the crash: whatever stopped it since
                    # (an eviction, an operator) was meant, so the restart is void.
                    slot.restart_at = None
                due = slot.restart_at is not None and slot.restart_at <= now
                if not due or slot.state is not State.STOPPED or slot.busy:
                    continue
                if slot.name not in core.leased():
                    slot.restart_at = None
                    continue
                views = core.views(slot.config.gpu)
                gpu, _, _ = core.gpu_view(slot.config.gpu)
                if policy.free_for_admission(views, gpu) < slot.reservation:
                    slot.restart_at = now + 1.0  # no room yet; never evict for a restart
                    continue
                reason = f"restart after crash ({slot.last_error})"
                begin_start(core, slot, {"reason": reason, "by": "monitor"})
                slot.restart_at = None  # only once the start is recorded
                in_background(f"restart-{slot.name}", partial(self._restart, slot))

    def _restart(self, slot: Slot) -> None:
        try:
            run_start(self.core, slot)
        except GpusmError:
            with self.core.cond:
                # STARTING -> STOPPED by a failed restart: back off again, or give up once
                # the budget is spent, as after a crash.
                if slot.state is State.STOPPED and not slot.busy:
                    self._schedule_restart(slot)
            raise

    # ---------------------------------------------------------------- VRAM and TTL
    def _observe_vram(self) -> None:
        core = self.core
        for device in core.devices():
            snap = core.snapshot(device)
            with core.cond:
                usage: dict[str, int] = {}
                for pid, owner in core.our_pids(device).items():
                    usage[owner] = usage.get(owner, 0) + snap.processes.get(pid, 0)
                for name, used in usage.items():
                    slot = core.slots[name]
                    # Loading is often when a service peaks: learn from STARTING too.
                    active = slot.state in (State.STARTING, State.HEALTHY)
                    if used > slot.learned_peak_mib and active:
                        slot.learned_peak_mib = used
                        core.record(
                            slot,
                            ev.VramObserved(
                                data={"used_mib": used, "peak_mib": used, "free_mib": snap.free_mib}
                            ),
                        )

    def _expire_idle(self) -> None:
        core = self.core
        with core.cond:
            names = policy.idle_expired(
                core.views(), core.other_leases(None), core.clock.monotonic()
            )
            for name in names:
                slot = core.slots[name]
                ttl = slot.config.idle_ttl_s
                event = ev.DrainRequested(
                    data={"reason": f"idle for {ttl:g}s (idle_ttl_s)", "by": "monitor"}
                )
                if begin_drain(core, slot, event):
                    in_background(f"stop-{name}", partial(finish_stop, core, slot))
