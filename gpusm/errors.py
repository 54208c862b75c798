"""Every error gpusm raises on purpose.

Foreign exceptions (SQLAlchemy, pynvml, docker, httpx, OS errors) are translated into
this tree at the adapter that meets them, so callers catch one family::

    GpusmError
    ├── ConfigError                 the config file is wrong; names file, key and fix
    ├── IllegalTransition           a trigger that the state machine forbids
    ├── StoreError                  the event store failed
    │   └── ConcurrencyConflict     another writer appended that stream version first
    ├── GpuProbeError               NVML (or the simulated GPU) could not be read
    ├── SimOutOfMemory              a simulated allocation beyond what is free (an OOM)
    ├── ServiceRuntimeError         a runtime could not do what was asked
    │   ├── ServiceStartFailed      the service did not launch or never became healthy
    │   └── ServiceStopFailed       the service could not be stopped
    ├── VramNotReclaimed            memory still held after a stop's settle timeout
    ├── CoordinatorBusy             another coordinator owns the state directory
    ├── UnknownName                 a phase or service that the config does not define
    ├── InsufficientVram            a request that cannot fit, even after evictions
    ├── ReloadRefused               a new config that cannot replace the running one
    └── RequestTimeout              a request that did not finish before its deadline
"""

from __future__ import annotations

__all__ = [
    "ConcurrencyConflict",
    "ConfigError",
    "CoordinatorBusy",
    "GpuProbeError",
    "GpusmError",
    "IllegalTransition",
    "InsufficientVram",
    "ReloadRefused",
    "RequestCancelled",
    "RequestTimeout",
    "ServiceRuntimeError",
    "ServiceStartFailed",
    "ServiceStopFailed",
    "SimOutOfMemory",
    "StoreError",
    "UnknownName",
    "VramNotReclaimed",
]


class GpusmError(Exception):
    """Base of every error gpusm raises on purpose; its message is meant for a person."""


class ConfigError(GpusmError):
    """The configuration is invalid.

    The message names the file, the key path (``services.tts.vram_mib``) and a fix.
    """

    def __init__(self, file: str, key: str, problem: str, fix: str) -> None:
        self.file = file
        self.key = key
        self.problem = problem
        self.fix = fix
        where = f"{file}: {key}" if key else file
        super().__init__(f"{where}: {problem}. Fix: {fix}")


class IllegalTransition(GpusmError):
    """A trigger that is not allowed from the service's current state; nothing was recorded."""

    def __init__(self, service: str, trigger: str, state: str) -> None:
        self.service = service
        self.trigger = trigger
        self.state = state
        super().__init__(f"service {service!r}: cannot {trigger!r} while {state}")


class StoreError(GpusmError):
    """The event store could not be opened, migrated, read or written."""


class ConcurrencyConflict(StoreError):
    """Another writer already appended this version of the stream; the batch was rejected whole."""

    def __init__(self, stream: str, version: int) -> None:
        self.stream = stream
        self.version = version
        super().__init__(f"stream {stream!r} already has version {version}; re-read and retry")


class GpuProbeError(GpusmError):
    """The GPU could not be read (NVML missing, GPU lost, call not supported…)."""


class SimOutOfMemory(GpusmError):
    """A simulated allocation asked for more than the simulated GPU had free; it was recorded."""

    def __init__(self, pid: int, requested_mib: int, free_mib: int) -> None:
        self.pid = pid
        self.requested_mib = requested_mib
        self.free_mib = free_mib
        super().__init__(
            f"simulated OOM: pid {pid} asked for {requested_mib} MiB with {free_mib} MiB free"
        )


class ServiceRuntimeError(GpusmError):
    """A runtime (native processes or Docker) failed to do what was asked for a service."""

    def __init__(self, service: str, message: str) -> None:
        self.service = service
        super().__init__(f"service {service!r}: {message}")


class ServiceStartFailed(ServiceRuntimeError):
    """The service could not be launched, or exited or failed health before it was ready."""


class ServiceStopFailed(ServiceRuntimeError):
    """The service could not be stopped (it survived SIGKILL, or the engine refused)."""


class VramNotReclaimed(GpusmError):
    """After a stop, the GPU still showed the memory held when ``settle_timeout_s`` ran out."""

    def __init__(
        self, service: str, waited_s: float, holders: dict[int, int], free_mib: int
    ) -> None:
        self.service = service
        self.waited_s = waited_s
        self.holders = holders
        self.free_mib = free_mib
        held = ", ".join(f"pid {pid}: {mib} MiB" for pid, mib in sorted(holders.items()))
        super().__init__(
            f"service {service!r}: VRAM not reclaimed after {waited_s:.2f}s "
            f"({free_mib} MiB free; still held: {held or 'by the driver, no pid listed'})"
        )


class CoordinatorBusy(GpusmError):
    """Another coordinator process holds the state directory's lock."""


class ReloadRefused(GpusmError):
    """A config reload that was refused: the new file is invalid, or it changes what only
    a restart can change. The running config stays as it was."""


class UnknownName(GpusmError):
    """A phase or service name that the configuration does not define."""

    def __init__(self, kind: str, name: str, known: list[str]) -> None:
        self.kind = kind
        self.name = name
        self.known = known
        super().__init__(f"unknown {kind} {name!r}; known: {', '.join(sorted(known)) or 'none'}")


class InsufficientVram(GpusmError):
    """The request cannot fit, even after every stop the policy allows."""

    def __init__(
        self, need_mib: int, free_mib: int, foreign_mib: int, blocked_by: list[str]
    ) -> None:
        self.need_mib = need_mib
        self.free_mib = free_mib
        self.foreign_mib = foreign_mib
        self.blocked_by = blocked_by
        super().__init__(
            f"need {need_mib} MiB, {free_mib} MiB free for admission, "
            f"{foreign_mib} MiB held by processes gpusm does not own; "
            f"blocked by: {', '.join(blocked_by) or 'nothing gpusm may stop'}"
        )


class RequestTimeout(GpusmError):
    """A request did not complete before its deadline."""


class RequestCancelled(RequestTimeout):
    """The requester stopped waiting (a proxied client hung up) before the request was
    done; what it alone had started is being stopped."""
