"""An in-memory GPU for tests on fakes: memory held per (fake) pid, no files, no processes.

:class:`MemoryGpu` is the simulated GPU's rules without the shared folder: memory is
held by a pid; an allocation beyond what is free fails with
:class:`~gpusm.errors.SimOutOfMemory` and is recorded in :attr:`MemoryGpu.ooms`; the
memory of a process that exited is still counted as used (by no pid) for
``reclaim_lag_s`` on the clock, then dropped, as a driver does.

:meth:`MemoryGpu.attach` wires a :class:`~gpusm.runtimes.memory.MemoryRuntime` to it, so
that each fake process holds its service's VRAM while it lives and lets go when it ends.
A pid that no runtime knows (:meth:`MemoryGpu.hog`) is foreign usage.
:class:`MemoryProbe` reads it through the :class:`~gpusm.ports.GpuProbe` port.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from gpusm.clock import SystemClock
from gpusm.config import ServiceConfig
from gpusm.errors import GpuProbeError, SimOutOfMemory
from gpusm.ports import Clock, DeviceSnapshot, Handle, StopResult

__all__ = ["MEMORY_GPU_NAME", "MemoryGpu", "MemoryOom", "MemoryProbe"]

MEMORY_GPU_NAME = "gpusm in-memory GPU"


class FakeProcesses(Protocol):
    """What :meth:`MemoryGpu.attach` needs of a fake runtime (``MemoryRuntime`` has it)."""

    on_start: Callable[[Handle, ServiceConfig], None] | None
    on_exit: Callable[[Handle], None] | None

    def stop(self, handle: Handle, grace_s: float) -> StopResult:
        """Stop one fake instance."""
        ...


@dataclass(frozen=True)
class MemoryOom:
    """One refused allocation: who asked, how much, and how much was free then."""

    pid: int
    requested_mib: int
    free_mib: int


class MemoryGpu:
    """One GPU of ``total_mib`` MiB whose memory is held per pid; thread-safe.

    ``reclaim_lag_s`` (on ``clock``'s monotonic time) is how long an exited process's
    memory stays counted as used after :meth:`exited`; 0 frees it at once.
    """

    def __init__(
        self,
        total_mib: int,
        *,
        reclaim_lag_s: float = 0.0,
        clock: Clock | None = None,
        uuid: str | None = None,
        index: int = 0,
    ) -> None:
        if total_mib <= 0:
            raise GpuProbeError(f"in-memory GPU size must be above 0 MiB, got {total_mib}")
        if reclaim_lag_s < 0:
            raise GpuProbeError(f"reclaim lag must be 0 s or more, got {reclaim_lag_s}")
        self.total_mib = total_mib
        self.reclaim_lag_s = reclaim_lag_s
        self.clock: Clock = clock or SystemClock()
        self.index = index
        self.uuid = uuid or f"MEM-GPU-{index}"
        self._lock = threading.Lock()
        self._held: dict[int, int] = {}
        # Memory of exited processes that the "driver" has not freed yet: (freed at, MiB).
        self._lagging: list[tuple[float, int]] = []
        self._ooms: list[MemoryOom] = []

    # ------------------------------------------------------------ memory
    def allocate(self, pid: int, mib: int) -> None:
        """Add ``mib`` MiB to what ``pid`` holds, or record an OOM and raise SimOutOfMemory."""
        _require_positive("allocate", mib)
        with self._lock:
            free = self.total_mib - self._used()
            if mib > free:
                self._ooms.append(MemoryOom(pid, mib, free))
                raise SimOutOfMemory(pid, mib, free)
            self._held[pid] = self._held.get(pid, 0) + mib

    def hog(self, pid: int, mib: int) -> None:
        """Make ``pid`` — a process gpusm does not own — hold ``mib`` MiB (foreign usage)."""
        self.allocate(pid, mib)

    def release(self, pid: int, mib: int | None = None) -> None:
        """Free ``mib`` MiB (None: all) that ``pid`` holds, at once; more than held is an error."""
        if mib is not None:
            _require_positive("release", mib)
        with self._lock:
            held = self._held.get(pid, 0)
            if mib is not None and mib > held:
                raise GpuProbeError(f"pid {pid} holds {held} MiB; cannot release {mib} MiB")
            left = 0 if mib is None else held - mib
            if left:
                self._held[pid] = left
            else:
                self._held.pop(pid, None)

    def exited(self, pid: int) -> None:
        """``pid`` ended: its memory belongs to no pid now, and is freed after the lag."""
        with self._lock:
            mib = self._held.pop(pid, 0)
            if mib and self.reclaim_lag_s > 0:
                self._lagging.append((self.clock.monotonic() + self.reclaim_lag_s, mib))

    # ------------------------------------------------------------ reading
    @property
    def ooms(self) -> list[MemoryOom]:
        """Every refused allocation, oldest first (a copy)."""
        with self._lock:
            return list(self._ooms)

    def holders(self) -> dict[int, int]:
        """MiB held per live pid."""
        with self._lock:
            return dict(self._held)

    def snapshot(self) -> DeviceSnapshot:
        """Total, used (holders + memory still lagging), free, and the holders."""
        with self._lock:
            used = self._used()
            processes = dict(self._held)
        return DeviceSnapshot(
            index=self.index,
            uuid=self.uuid,
            name=MEMORY_GPU_NAME,
            total_mib=self.total_mib,
            used_mib=used,
            free_mib=self.total_mib - used,
            processes=processes,
        )

    # ------------------------------------------------------------ wiring
    def attach(self, runtime: FakeProcesses, sizes: Mapping[str, int] | None = None) -> None:
        """Make ``runtime``'s fake processes hold VRAM while they live.

        A started instance allocates ``sizes[service]`` MiB (default: its ``vram_mib``;
        0 allocates nothing) under its top pid; an instance that ends lets go (after the
        lag). An instance that does not fit is recorded as an OOM and exits at once, as a
        real server that hits CUDA OOM while loading would.
        """
        wanted = dict(sizes or {})

        def on_start(handle: Handle, config: ServiceConfig) -> None:
            mib = wanted.get(handle.service, config.vram_mib)
            if mib <= 0 or handle.pid is None:
                return
            try:
                self.allocate(handle.pid, mib)
            except SimOutOfMemory:
                runtime.stop(handle, 0.0)

        def on_exit(handle: Handle) -> None:
            if handle.pid is not None:
                self.exited(handle.pid)

        runtime.on_start = on_start
        runtime.on_exit = on_exit

    def _used(self) -> int:
        # Caller holds the lock. Lagging memory whose time has come is dropped here.
        now = self.clock.monotonic()
        self._lagging = [(at, mib) for at, mib in self._lagging if at > now]
        return sum(self._held.values()) + sum(mib for _, mib in self._lagging)


def _require_positive(what: str, mib: int) -> None:
    if mib <= 0:
        raise GpuProbeError(f"{what} needs a positive number of MiB, got {mib}")


class MemoryProbe:
    """The :class:`~gpusm.ports.GpuProbe` of one or more :class:`MemoryGpu` (device i is
    the i-th given).

    Setting ``unreadable`` to a reason makes every read fail with GpuProbeError, as a
    lost GPU or a broken driver would, until it is set back to None.
    """

    slack_mib = 0

    def __init__(self, gpu: MemoryGpu | Sequence[MemoryGpu]) -> None:
        self.gpus = [gpu] if isinstance(gpu, MemoryGpu) else list(gpu)
        self.gpu = self.gpus[0]
        self.unreadable: str | None = None

    def device_count(self) -> int:
        """How many in-memory GPUs it reads."""
        return len(self.gpus)

    def snapshot(self, device: int | str = 0) -> DeviceSnapshot:
        """One GPU, by index or UUID; anything else raises GpuProbeError."""
        if self.unreadable is not None:
            raise GpuProbeError(f"cannot read the in-memory GPU: {self.unreadable}")
        for index, gpu in enumerate(self.gpus):
            if device in (index, gpu.uuid):
                return gpu.snapshot()
        known = ", ".join(f"{i} ({g.uuid})" for i, g in enumerate(self.gpus))
        raise GpuProbeError(f"no GPU {device!r}: the in-memory GPUs are {known}")

    def oom_count(self) -> int | None:
        """Allocations the in-memory GPUs refused."""
        return sum(len(gpu.ooms) for gpu in self.gpus)

    def close(self) -> None:
        """Nothing to release; idempotent."""
