"""Liveness: a background thread that notices crashes, failing health, growth and idleness.

Each tick it (1) records ``Crashed`` for a healthy or parked service whose process is
gone, or a healthy one that failed its health check ``failures_before_crash`` times in a
row (after stopping it); (2) restarts crashed services that a client still needs, with
exponential backoff and a start budget per window, after which the service goes to
``failed``; (3) records ``VramObserved`` when a service's measured use exceeds its
learned peak; (4) parks (if it can) or stops idle services whose ``idle_ttl_s`` has
passed, and stops parked ones idle for another TTL; (5) retries stops that failed, and
turns starts, parks and wakes that lost their owner into stops; (6) every
``sweep_interval_s``, reaps marked processes that outlived their instance (``sweep``).
"""

from __future__ import annotations

import logging
import threading
from functools import partial

from gpusm.domain import events as ev
from gpusm.domain import policy
from gpusm.domain.states import State
from gpusm.engine.lifecycle import begin_drain, begin_start, finish_stop, in_background, run_start
from gpusm.engine.parking import begin_park, finish_park
from gpusm.engine.reload import retire_stale
from gpusm.engine.state import Engine, Slot
from gpusm.engine.sweep import SWEEP_INTERVAL_S, sweep
from gpusm.errors import GpusmError
from gpusm.ports import Handle

__all__ = ["Monitor"]

_log = logging.getLogger("gpusm")


class Monitor:
    """Runs :meth:`tick` every ``interval_s`` until stopped."""

    def __init__(
        self, engine: Engine, interval_s: float = 0.25, sweep_interval_s: float = SWEEP_INTERVAL_S
    ) -> None:
        self.engine = engine
        self.interval_s = interval_s
        self.sweep_interval_s = sweep_interval_s
        self._next_sweep = engine.clock.monotonic() + sweep_interval_s
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
        engine = self.engine
        for slot in list(engine.slots.values()):
            if engine.closed:
                return
            # One service's trouble (an engine that is down, a stop that failed) must
            # not blind the monitor to the others.
            try:
                self._check_slot(slot)
            except GpusmError:
                continue
        steps = (
            self._expire_leases,
            self._retire_stale,
            self._observe_vram,
            self._restart_due,
            self._expire_idle,
            self._sweep_due,
        )
        for step in steps:
            try:
                step()
            except GpusmError:
                continue

    def _check_slot(self, slot: Slot) -> None:
        engine = self.engine
        if slot.state is State.HEALTHY and not slot.busy:
            self._check_liveness(slot)
        elif slot.state is State.PARKED and not slot.busy:
            # A parked server is not asked for health (it may answer only once awake).
            handle = slot.handle
            if handle is None or not engine.runtime(slot).is_alive(handle):
                self._crashed(slot, handle, "process exited while parked", None)
                return
        with engine.cond:
            if slot.busy or engine.closed:
                return
            abandoned = f"abandoned: {slot.last_error or 'its owner failed'}"
            if slot.state is State.STARTING:
                # A start whose owner gave up on an error: nobody will finish it.
                event = ev.DrainRequested(data={"reason": f"start {abandoned}"})
                if not begin_drain(engine, slot, event):
                    return
            elif slot.state in (State.PARKING, State.WAKING):
                # A park or wake whose owner gave up: stop it (verified), as a failed one.
                failed = ev.ParkFailed if slot.state is State.PARKING else ev.WakeFailed
                engine.record(slot, failed(data={"reason": f"{slot.state.value} {abandoned}"}))
                slot.claim()
            elif slot.state is State.DRAINING:
                slot.claim()  # a stop that failed before: try again
            else:
                return
        in_background(f"stop-{slot.name}", partial(finish_stop, engine, slot))

    # ---------------------------------------------------------------- crashes
    def _check_liveness(self, slot: Slot) -> None:
        engine = self.engine
        handle = slot.handle
        if handle is None or not engine.runtime(slot).is_alive(handle):
            self._crashed(slot, handle, "process exited", None)
            return
        now = engine.clock.monotonic()
        interval = slot.config.health.interval_s or 1.0
        if now - self._last_probe.get(slot.name, 0.0) < interval:
            return
        self._last_probe[slot.name] = now
        result = engine.health.probe(slot.config.health)
        with engine.cond:
            if slot.handle != handle:
                return  # replaced while the probe ran: the verdict is about another instance
            failures = slot.count_probe(result.ok)
        if failures >= slot.config.health.failures_before_crash:
            engine.runtime(slot).stop(handle, slot.config.stop_timeout_s)
            self._crashed(slot, handle, f"health failed {failures} times: {result.reason}", 0)

    def _crashed(self, slot: Slot, handle: Handle | None, reason: str, code: int | None) -> None:
        """``handle`` (the instance that was checked) died; nothing if it was replaced."""
        engine = self.engine
        exit_code = code
        if exit_code is None and handle is not None:
            exit_code = engine.runtime_of(handle).exit_code(handle)
        with engine.cond:
            watched = (State.HEALTHY, State.PARKED)
            if slot.state not in watched or slot.busy or slot.handle != handle:
                return
            slot.detach(error=reason)
            slot.count_probe(True)
            data = {"reason": reason, "exit_code": exit_code, **engine.vram_data(slot.device)}
            # HEALTHY | PARKED -> STOPPED: it died unasked
            engine.record(slot, ev.Crashed(data=data))
            self._schedule_restart(slot)

    def _schedule_restart(self, slot: Slot) -> None:
        restart = slot.config.restart
        if restart.policy != "on-failure" or slot.name not in self.engine.leased():
            return
        now = self.engine.clock.monotonic()
        if not policy.start_budget_left(
            slot.start_times, now, restart.max_starts, restart.window_s
        ):
            reason = f"{restart.max_starts} starts within {restart.window_s:g}s; giving up"
            slot.fail(reason)
            # STOPPED -> FAILED
            self.engine.record(slot, ev.GaveUp(data={"reason": reason}))
            return
        # Backoff grows with the starts inside the window: 1 s, 2 s, 4 s… capped.
        attempt = max(1, sum(1 for t in slot.start_times if now - t < restart.window_s))
        delay = policy.restart_delay(attempt, restart.backoff_initial_s, restart.backoff_max_s)
        slot.schedule_restart(now + delay)
        self._restart_for[slot.name] = slot.generation

    def _restart_due(self) -> None:
        engine = self.engine
        now = engine.clock.monotonic()
        with engine.decision():
            for slot in engine.slots.values():
                if slot.restart_at is not None and (
                    self._restart_for.get(slot.name) != slot.generation
                ):
                    # Started by someone else since the crash: whatever stopped it since
                    # (an eviction, an operator) was meant, so the restart is void.
                    slot.schedule_restart(None)
                due = slot.restart_at is not None and slot.restart_at <= now
                if not due or slot.state is not State.STOPPED or slot.busy:
                    continue
                if slot.name not in engine.leased():
                    slot.schedule_restart(None)
                    continue
                # It restarts where it ran, if there is room on each of its devices.
                room = min(
                    policy.free_for_admission(engine.views(d), engine.gpu_view(d)[0])
                    for d in slot.placed
                )
                if room < slot.reservation:
                    slot.schedule_restart(now + 1.0)  # no room yet; never evict for a restart
                    continue
                reason = f"restart after crash ({slot.last_error})"
                begin_start(engine, slot, {"reason": reason, "by": "monitor"})
                slot.schedule_restart(None)  # only once the start is recorded
                in_background(f"restart-{slot.name}", partial(self._restart, slot))

    def _restart(self, slot: Slot) -> None:
        try:
            run_start(self.engine, slot)
        except GpusmError:
            with self.engine.cond:
                # STARTING -> STOPPED by a failed restart: back off again, or give up once
                # the budget is spent, as after a crash.
                if slot.state is State.STOPPED and not slot.busy:
                    self._schedule_restart(slot)
            raise

    def _retire_stale(self) -> None:
        with self.engine.decision():
            stale = retire_stale(self.engine)
        for slot in stale:
            in_background(f"stop-{slot.name}", partial(finish_stop, self.engine, slot))

    def _expire_leases(self) -> None:
        with self.engine.cond:
            if self.engine.expire_leases():
                self.engine.cond.notify_all()

    def _sweep_due(self) -> None:
        now = self.engine.clock.monotonic()
        if now >= self._next_sweep:
            self._next_sweep = now + self.sweep_interval_s
            sweep(self.engine)

    # ---------------------------------------------------------------- VRAM and TTL
    def _observe_vram(self) -> None:
        engine = self.engine
        for device in engine.devices():
            with engine.decision():
                _, snap, owners = engine.gpu_view(device)
                usage: dict[str, int] = {}
                for pid, owner in owners.items():
                    usage[owner] = usage.get(owner, 0) + snap.processes.get(pid, 0)
                for name, used in usage.items():
                    slot = engine.slots[name]
                    # Loading is often when a service peaks: learn from STARTING (and
                    # from a wake) too; never from a park, which is meant to shrink.
                    active = slot.state in (State.STARTING, State.HEALTHY, State.WAKING)
                    if active and slot.learn_peak(used):
                        engine.record(
                            slot,
                            ev.VramObserved(
                                data={"used_mib": used, "peak_mib": used, "free_mib": snap.free_mib}
                            ),
                        )

    def _expire_idle(self) -> None:
        engine = self.engine
        with engine.cond:
            names = policy.idle_expired(
                engine.views(), engine.other_leases(None), engine.clock.monotonic()
            )
            for name in names:
                slot = engine.slots[name]
                ttl = slot.config.idle_ttl_s
                data = {"reason": f"idle for {ttl:g}s (idle_ttl_s)", "by": "monitor"}
                # A service that can park parks first; parked for another TTL, it stops.
                if begin_park(engine, slot, ev.ParkRequested(data=data)):
                    in_background(f"park-{name}", partial(finish_park, engine, slot))
                elif begin_drain(engine, slot, ev.DrainRequested(data=data)):
                    in_background(f"stop-{name}", partial(finish_stop, engine, slot))
