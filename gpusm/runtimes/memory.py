"""An in-memory Runtime for coordinator tests: fake processes, same contract as the real one.

Nothing is launched. Each start records a fake process with a fresh fake pid (far
above any real pid) and a create time from the clock; ``kill`` simulates a crash;
``stop`` honours the grace like the native runtime (a service listed in
``ignore_term`` is "killed" only after the whole grace, which the clock sleeps).

Several ``MemoryRuntime`` objects can share one fake machine (``reopen()``), so a
test can drop a coordinator and let a new one find the old one's instances as orphans.
A fake GPU can attribute memory to the fake pids through ``on_start`` / ``on_exit``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from gpusm.clock import SystemClock
from gpusm.errors import ServiceRuntimeError, ServiceStartFailed
from gpusm.ports import Clock, Handle, Placement, Runtime, StopResult

if TYPE_CHECKING:
    from gpusm.config import ServiceConfig

__all__ = ["FAKE_PID_BASE", "FakeProcess", "MemoryRuntime"]

# Linux pids stay below 2**22, so fake pids can never be confused with real ones.
FAKE_PID_BASE = 10_000_000


@dataclass
class FakeProcess:
    """One fake instance: its top pid, its fake children, and how it ended."""

    handle: Handle
    config: ServiceConfig
    children: list[int] = field(default_factory=list)
    exit_code: int | None = None
    # Monotonic time at which it exits by itself (``crash_after_s``), if ever, and how.
    exits_at: float | None = None
    exits_with: int = 1

    @property
    def alive(self) -> bool:
        """Still running (no exit code yet)."""
        return self.exit_code is None

    @property
    def pids(self) -> set[int]:
        """The top pid and its children's."""
        assert self.handle.pid is not None
        return {self.handle.pid, *self.children}


class _Machine:
    """The fake process table, shared by every runtime opened on it."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.next_pid = FAKE_PID_BASE
        self.procs: dict[int, FakeProcess] = {}

    def new_pid(self) -> int:
        self.next_pid += 1
        return self.next_pid


class MemoryRuntime:
    """A fake :class:`gpusm.ports.Runtime` whose processes live in a dict.

    Test knobs (all public attributes):

    - ``fail_next_start``: raised by the next ``start`` (then cleared); a plain
      exception is wrapped in ServiceStartFailed.
    - ``ignore_term``: services that ignore SIGTERM; their stop takes the whole grace
      and escalates.
    - ``term_delay_s``: per service, how long it takes to exit after SIGTERM.
    - ``children``: per service, how many child processes a start also creates.
    - ``crash_after_s``: per service, seconds (on the clock) after which an instance
      exits by itself; noticed whenever the runtime is next asked.
    - ``crash_exit_code``: per service, the code such an exit ends with (default 1).
    - ``on_start(handle, config)`` / ``on_exit(handle)``: called when an instance
      starts and when it ends (stop, kill), e.g. to make a fake GPU allocate and free.
    - ``logs``: per service, what every instance of it wrote (``log_tail``'s source).
    - ``on_signal(handle, name)``: what a signal does (``signals`` lists those sent).
    """

    def __init__(
        self,
        clock: Clock | None = None,
        *,
        kind: str = "memory",
        _machine: _Machine | None = None,
    ) -> None:
        self.kind = kind
        self.clock: Clock = clock or SystemClock()
        self._machine = _machine or _Machine()
        self.fail_next_start: Exception | None = None
        self.ignore_term: set[str] = set()
        self.term_delay_s: dict[str, float] = {}
        self.children: dict[str, int] = {}
        self.crash_after_s: dict[str, float] = {}
        self.crash_exit_code: dict[str, int] = {}
        self.on_start: Callable[[Handle, ServiceConfig], None] | None = None
        self.on_exit: Callable[[Handle], None] | None = None
        self.logs: dict[str, str] = {}
        self.started: list[Handle] = []
        # instance -> the devices it was started on.
        self.placements: dict[str, Placement] = {}
        # Every signal sent (``signal``), and what each one does to an instance.
        self.signals: list[tuple[Handle, str]] = []
        self.on_signal: Callable[[Handle, str], None] | None = None
        self.stopped: list[tuple[Handle, StopResult]] = []

    def reopen(self) -> MemoryRuntime:
        """A new runtime on the same fake machine (as a restarted coordinator would see it)."""
        return MemoryRuntime(self.clock, kind=self.kind, _machine=self._machine)

    # ------------------------------------------------------------ the Runtime port
    def start(
        self, service: ServiceConfig, instance: str, placement: Placement | None = None
    ) -> Handle:
        """Record a new fake instance (and its ``placement``, in ``placements``); raise
        ``fail_next_start`` if one is set."""
        if self.fail_next_start is not None:
            exc, self.fail_next_start = self.fail_next_start, None
            if isinstance(exc, ServiceStartFailed):
                raise exc
            raise ServiceStartFailed(service.name, str(exc)) from exc
        m = self._machine
        with m.lock:
            pid = m.new_pid()
            handle = Handle(
                service=service.name,
                instance=instance,
                pid=pid,
                create_time=self.clock.now().timestamp(),
                kind=self.kind,
            )
            children = [m.new_pid() for _ in range(self.children.get(service.name, 0))]
            proc = FakeProcess(handle, service, children)
            if service.name in self.crash_after_s:
                proc.exits_at = self.clock.monotonic() + self.crash_after_s[service.name]
                proc.exits_with = self.crash_exit_code.get(service.name, 1)
            m.procs[pid] = proc
        self.started.append(handle)
        self.placements[instance] = placement or Placement()
        if self.on_start is not None:
            self.on_start(handle, service)
        return handle

    def is_alive(self, handle: Handle) -> bool:
        """Whether this exact fake instance runs (pid and create time must both match)."""
        return self._find(handle) is not None

    def stop(self, handle: Handle, grace_s: float) -> StopResult:
        """Like the native stop: TERM, wait (on the clock) up to the grace, then KILL."""
        began = self.clock.monotonic()
        proc = self._find(handle)
        if proc is None:
            result = StopResult(duration_s=0.0, escalated=False, already_dead=True)
        else:
            name = handle.service
            takes = float("inf") if name in self.ignore_term else self.term_delay_s.get(name, 0.0)
            escalated = takes > grace_s
            self.clock.sleep(grace_s if escalated else takes)
            self._end(proc, -9 if escalated else -15)
            result = StopResult(duration_s=self.clock.monotonic() - began, escalated=escalated)
        self.stopped.append((handle, result))
        return result

    def pids_of(self, handle: Handle) -> set[int]:
        """The fake pid and its fake children; empty once the instance ended."""
        proc = self._find(handle)
        return set() if proc is None else proc.pids

    def attribute(self, pids: Collection[int], handles: Sequence[Handle]) -> dict[int, Handle]:
        """The fake pids of each live instance among ``handles``."""
        owners: dict[int, Handle] = {}
        for handle in handles:
            for pid in self.pids_of(handle) & set(pids):
                owners[pid] = handle
        return owners

    def find_orphans(self) -> list[Handle]:
        """Every live fake instance on the machine, whoever started it."""
        self._expire()
        with self._machine.lock:
            return [p.handle for p in self._machine.procs.values() if p.alive]

    # ------------------------------------------------------------ extras
    def kill(self, service: str, exit_code: int = -9) -> list[Handle]:
        """Simulate a crash of every live instance of ``service``; returns their handles."""
        with self._machine.lock:
            victims = [
                p for p in self._machine.procs.values() if p.alive and p.handle.service == service
            ]
        for proc in victims:
            self._end(proc, exit_code)
        return [p.handle for p in victims]

    def signal(self, handle: Handle, name: str) -> None:
        """Record the signal and call ``on_signal``; ServiceRuntimeError if it is gone."""
        if self._find(handle) is None:
            raise ServiceRuntimeError(handle.service, f"cannot send {name}: it is not running")
        self.signals.append((handle, name))
        if self.on_signal is not None:
            self.on_signal(handle, name)
        elif name in ("SIGKILL", "SIGTERM", "SIGINT"):
            proc = self._find(handle)
            if proc is not None:
                self._end(proc, -9 if name == "SIGKILL" else -15)

    def exit_code(self, handle: Handle) -> int | None:
        """How the instance ended (negative: by that signal); None while it runs."""
        self._expire()
        proc = self._known(handle)
        return None if proc is None else proc.exit_code

    def log_tail(self, handle: Handle, lines: int = 20) -> str:
        """The last ``lines`` lines of ``logs[service]``; "" for an instance never started."""
        if lines <= 0 or self._known(handle) is None:
            return ""
        return "\n".join(self.logs.get(handle.service, "").splitlines()[-lines:])

    def close(self) -> None:
        """Nothing to release (the fake instances keep running); idempotent."""

    def pid_alive(self, pid: int) -> bool:
        """Whether a fake pid (top or child) belongs to a live instance."""
        self._expire()
        with self._machine.lock:
            return any(p.alive and pid in p.pids for p in self._machine.procs.values())

    def live(self) -> list[Handle]:
        """Handles of every live instance, oldest first."""
        return self.find_orphans()

    def _find(self, handle: Handle) -> FakeProcess | None:
        """The live fake instance ``handle`` names, if any."""
        self._expire()
        proc = self._known(handle)
        return proc if proc is not None and proc.alive else None

    def _known(self, handle: Handle) -> FakeProcess | None:
        """The fake instance ``handle`` names (pid and create time), live or ended."""
        with self._machine.lock:
            proc = self._machine.procs.get(handle.pid or -1)
        if proc is None or proc.handle.create_time != handle.create_time:
            return None
        return proc

    def _expire(self) -> None:
        now = self.clock.monotonic()
        with self._machine.lock:
            due = [
                p
                for p in self._machine.procs.values()
                if p.alive and p.exits_at is not None and p.exits_at <= now
            ]
        for proc in due:
            self._end(proc, proc.exits_with)

    def _end(self, proc: FakeProcess, exit_code: int) -> None:
        with self._machine.lock:
            if not proc.alive:
                return
            proc.exit_code = exit_code
        if self.on_exit is not None:
            self.on_exit(proc.handle)


_: type[Runtime] = MemoryRuntime  # mypy checks that it implements the port
