"""A process-accurate simulated GPU, shared by every process on the machine through a folder.

The state of device 0 lives in ``<dir>/state.json``, that of device i ≥ 1 in
``<dir>/device-<i>/state.json`` (same format; each device has its own ``SIM-<uuid4>``
UUID and lock); every operation on a device takes an exclusive ``flock`` on
``<dir>/lock``, reads the state, changes it and writes it back atomically (temp file +
``os.replace``), so any number of processes can allocate at once and the sum of what
they hold never exceeds the total.

Memory is attributed to an OS process, identified by (pid, create time), so a reused
pid never inherits memory. Nothing is freed when a process forgets to release: like a
real driver, the memory of a process that died (gone, zombie, or its pid reused) is
still counted as used for ``reclaim_lag_s`` after the first read that saw it dead, then
dropped. An allocation beyond what is free fails with
:class:`~gpusm.errors.SimOutOfMemory` and is recorded as an OOM, so tests can prove that
none happened.

:meth:`SimGpu.open_all` opens (or creates) every device of a folder, :class:`SimProbe`
reads them all, and :func:`select_devices` picks the ones a ``CUDA_VISIBLE_DEVICES``
value names (indices or UUIDs), as the fake model server does.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from gpusm import procs
from gpusm.errors import GpuProbeError, SimOutOfMemory
from gpusm.ports import DeviceSnapshot

__all__ = [
    "DEFAULT_RECLAIM_LAG_S",
    "MAX_SIM_DEVICES",
    "SIM_GPU_NAME",
    "SimAllocation",
    "SimGpu",
    "SimProbe",
    "UnknownSimDevice",
    "select_devices",
]

SIM_GPU_NAME = "gpusm simulated GPU"
DEFAULT_RECLAIM_LAG_S = 0.2
# As many as the config allows (gpu.sim.devices).
MAX_SIM_DEVICES = 16
_STATE = "state.json"
_DEVICE_DIR = "device-{index}"
_LOCK = "lock"
_FORMAT = 1
# Keep the file small however long a test hammers it: only the newest OOMs are kept.
_MAX_OOM_RECORDS = 1000
# Create times derive from boot time + start ticks; JSON round-trips floats exactly, the
# tolerance only absorbs the rounding of two computations of the same value.
_CREATE_TIME_TOLERANCE_S = procs.CREATE_TIME_TOLERANCE_S


@dataclass(frozen=True)
class SimAllocation:
    """Memory held by one process (pid + create time); ``exited_at`` is set once it is seen dead."""

    pid: int
    create_time: float
    mib: int
    cmdline: tuple[str, ...]
    since: float
    exited_at: float | None = None

    @property
    def alive(self) -> bool:
        """Whether the process was alive at the last read."""
        return self.exited_at is None


def _start_time(pid: int) -> float | None:
    """Create time of a live, non-zombie process; None if there is none."""
    return procs.live_create_time(pid)


def _process_identity(pid: int) -> tuple[float, list[str]] | None:
    """(create time, argv) of a live, non-zombie process; None if there is none."""
    create_time = _start_time(pid)
    if create_time is None:
        return None
    # An empty argv (another user's process, or it died just now) is fine: the create
    # time is what counts.
    return create_time, procs.cmdline(pid)


def _same_process(record: dict[str, Any], create_time: float | None) -> bool:
    return (
        create_time is not None
        and abs(create_time - float(record["create_time"])) < _CREATE_TIME_TOLERANCE_S
    )


class UnknownSimDevice(GpuProbeError):
    """A device named (by index or UUID, e.g. in ``CUDA_VISIBLE_DEVICES``) that the sim lacks."""


class SimGpu:
    """Handle on one simulated GPU in ``directory``; cheap, and safe to use from many processes.

    Opening an existing folder reads its size and lag. A missing one is created when
    ``total_mib`` is given, else :class:`GpuProbeError` says how to create it. Giving
    ``total_mib`` or ``reclaim_lag_s`` for an existing GPU applies them (a resize is refused
    while more than the new size is in use). ``time_fn`` is the wall clock shared by all
    processes (injectable for tests). ``index`` is the device's index among the devices of
    its sim folder (device i ≥ 1 lives in ``<sim folder>/device-<i>``, see :meth:`open_all`).
    """

    def __init__(
        self,
        directory: Path,
        total_mib: int | None = None,
        reclaim_lag_s: float | None = None,
        *,
        time_fn: Callable[[], float] = time.time,
        index: int = 0,
    ) -> None:
        self.directory = Path(directory)
        self.index = index
        self._time = time_fn
        # Refreshed from the shared state on every operation (another process may resize).
        self.total_mib = 0
        self.reclaim_lag_s = 0.0
        if total_mib is not None and total_mib <= 0:
            raise GpuProbeError(f"simulated GPU size must be above 0 MiB, got {total_mib}")
        if reclaim_lag_s is not None and reclaim_lag_s < 0:
            raise GpuProbeError(f"reclaim lag must be 0 s or more, got {reclaim_lag_s}")
        if not (self.directory / _STATE).exists() and total_mib is None:
            if index > 0:
                raise UnknownSimDevice(
                    f"no simulated GPU device {index} at {self.directory}; create it with "
                    f"`gpusm sim create --devices {index + 1} --total-mib N`"
                )
            raise GpuProbeError(
                f"no simulated GPU at {self.directory}; create it with "
                "`gpusm sim create --total-mib N` (or pass --total-mib N)"
            )
        if total_mib is not None:
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise GpuProbeError(
                    f"cannot create the simulated GPU folder {self.directory}: {exc.strerror}"
                ) from exc
        with self._locked(create=(total_mib, reclaim_lag_s)) as state:
            self.uuid = str(state["uuid"])

    # ------------------------------------------------------------ public API
    @staticmethod
    def exists(directory: Path) -> bool:
        """Whether a simulated GPU was created in ``directory``."""
        return (Path(directory) / _STATE).is_file()

    @staticmethod
    def device_dir(directory: Path, index: int) -> Path:
        """The folder of device ``index`` of the sim in ``directory`` (device 0: itself)."""
        if index < 0:
            raise UnknownSimDevice(f"no simulated GPU device {index}: indices start at 0")
        root = Path(directory)
        return root if index == 0 else root / _DEVICE_DIR.format(index=index)

    @staticmethod
    def count(directory: Path) -> int:
        """How many devices the sim in ``directory`` has: 0 if none was created, else device
        0 and every ``device-<i>`` after it without a gap."""
        n = 0
        while n < MAX_SIM_DEVICES and SimGpu.exists(SimGpu.device_dir(directory, n)):
            n += 1
        return n

    @classmethod
    def open_all(
        cls,
        directory: Path,
        total_mib: int | Sequence[int] | None = None,
        reclaim_lag_s: float | None = None,
        *,
        devices: int | None = None,
        apply: bool = False,
        time_fn: Callable[[], float] = time.time,
    ) -> list[SimGpu]:
        """Every device of the sim in ``directory``, device 0 first; missing ones created.

        How many: ``devices`` if given, else as many sizes as ``total_mib`` lists (when more
        than one), else as many as exist (at least 1). ``total_mib`` is one size for every
        device or one per device; a device that must be created needs one. An existing
        device keeps its size and lag unless ``apply`` (then a resize is refused while
        more than the new size is in use). With ``devices`` and ``apply``, the devices past
        ``devices`` are removed (refused while a live process holds memory on one);
        without ``apply`` they are left alone and not returned.
        """
        existing = cls.count(directory)
        if devices is None:
            if not isinstance(total_mib, int) and total_mib is not None and len(total_mib) > 1:
                devices = len(total_mib)
            else:
                devices = max(existing, 1)
        if not 1 <= devices <= MAX_SIM_DEVICES:
            raise GpuProbeError(
                f"a simulated GPU has 1 to {MAX_SIM_DEVICES} devices, not {devices}"
            )
        if total_mib is None or isinstance(total_mib, int):
            sizes: list[int | None] = [total_mib] * devices
        elif len(total_mib) == 1:
            sizes = [total_mib[0]] * devices
        elif len(total_mib) == devices:
            sizes = list(total_mib)
        else:
            raise GpuProbeError(
                f"{len(total_mib)} sizes for {devices} simulated devices; "
                "give one size, or one per device"
            )
        opened = []
        for index, size in enumerate(sizes):
            folder = cls.device_dir(directory, index)
            if cls.exists(folder) and not apply:
                opened.append(cls(folder, time_fn=time_fn, index=index))
            else:
                opened.append(cls(folder, size, reclaim_lag_s, time_fn=time_fn, index=index))
        if apply:
            for index in range(existing - 1, devices - 1, -1):
                cls(cls.device_dir(directory, index), time_fn=time_fn, index=index)._remove()
        return opened

    def allocate(self, mib: int, pid: int | None = None) -> None:
        """Add ``mib`` MiB to what ``pid`` (default: this process) holds, or raise SimOutOfMemory.

        A refused allocation changes nothing but the OOM log, which records when, who,
        how much was asked and how much was free.
        """
        if mib <= 0:
            raise GpuProbeError(f"allocate needs a positive number of MiB, got {mib}")
        pid = os.getpid() if pid is None else pid
        identity = _process_identity(pid)
        if identity is None:
            raise GpuProbeError(f"no live process with pid {pid} to hold simulated memory")
        with self._locked() as state:
            free = int(state["total_mib"]) - self._used(state)
            if mib > free:
                state["ooms"].append(
                    {
                        "at": datetime.fromtimestamp(self._time(), UTC).isoformat(),
                        "pid": pid,
                        "requested_mib": mib,
                        "free_mib": free,
                        "cmdline": identity[1],
                    }
                )
                del state["ooms"][:-_MAX_OOM_RECORDS]
                raise SimOutOfMemory(pid, mib, free)
            for record in state["allocations"]:
                mine = record["pid"] == pid and record["exited_at"] is None
                if mine and _same_process(record, identity[0]):
                    record["mib"] += mib
                    return
            state["allocations"].append(
                {
                    "pid": pid,
                    "create_time": identity[0],
                    "mib": mib,
                    "cmdline": identity[1],
                    "since": self._time(),
                    "exited_at": None,
                }
            )

    def release(self, mib: int | None = None, pid: int | None = None) -> None:
        """Free ``mib`` MiB (None: all) held by ``pid`` (default: this process) right away.

        For a pid that is no longer alive every record under that pid is dropped (an
        administrator's explicit free). Releasing more than is held raises GpuProbeError.
        """
        if mib is not None and mib <= 0:
            raise GpuProbeError(f"release needs a positive number of MiB, got {mib}")
        pid = os.getpid() if pid is None else pid
        started = _start_time(pid)
        with self._locked() as state:
            mine = [
                r
                for r in state["allocations"]
                if r["pid"] == pid and (started is None or _same_process(r, started))
            ]
            held = sum(int(r["mib"]) for r in mine)
            if mib is not None and mib > held:
                raise GpuProbeError(f"pid {pid} holds {held} MiB; cannot release {mib} MiB")
            remaining = held if mib is None else mib
            for record in mine:
                taken = min(int(record["mib"]), remaining)
                record["mib"] -= taken
                remaining -= taken
            state["allocations"] = [r for r in state["allocations"] if r["mib"] > 0]

    def snapshot(self) -> DeviceSnapshot:
        """Total, used (live holders + dead ones still within the lag), free, live holders."""
        with self._locked() as state:
            total = int(state["total_mib"])
            used = self._used(state)
            processes = self._holders(state)
        return DeviceSnapshot(
            index=self.index,
            uuid=self.uuid,
            name=SIM_GPU_NAME,
            total_mib=total,
            used_mib=used,
            free_mib=total - used,
            processes=processes,
        )

    def holders(self) -> dict[int, int]:
        """MiB held per live pid (a dead process's memory, while lagging, belongs to no pid)."""
        with self._locked() as state:
            return self._holders(state)

    def allocations(self) -> list[SimAllocation]:
        """Every counted allocation, live or within the reclaim lag, oldest first."""
        with self._locked() as state:
            return [
                SimAllocation(
                    pid=int(r["pid"]),
                    create_time=float(r["create_time"]),
                    mib=int(r["mib"]),
                    cmdline=tuple(r["cmdline"]),
                    since=float(r["since"]),
                    exited_at=r["exited_at"],
                )
                for r in state["allocations"]
            ]

    def ooms(self) -> list[dict[str, Any]]:
        """The recorded OOMs, oldest first: ``{at, pid, requested_mib, free_mib, cmdline}``."""
        with self._locked() as state:
            return [dict(o) for o in state["ooms"]]

    def reset(self, force: bool = False) -> tuple[int, int]:
        """Forget dead processes' memory and the OOM log; returns (allocations, OOMs) dropped.

        Refused with GpuProbeError while a live process holds memory, unless ``force``,
        which forgets live holders' memory too.
        """
        with self._locked() as state:
            live = self._holders(state)
            if live and not force:
                pids = ", ".join(f"{pid} ({mib} MiB)" for pid, mib in sorted(live.items()))
                raise GpuProbeError(
                    f"live processes hold simulated memory: {pids}; stop them or pass --force"
                )
            dropped = (len(state["allocations"]), len(state["ooms"]))
            state["allocations"] = []
            state["ooms"] = []
            return dropped

    # ------------------------------------------------------------ internals
    def _remove(self) -> None:
        """Delete this device's folder (never device 0's); refused while live holders exist."""
        if self.index == 0:
            raise GpuProbeError("device 0 is the sim folder itself and cannot be removed")
        with self._locked() as state:
            live = self._holders(state)
            if live:
                pids = ", ".join(f"{pid} ({mib} MiB)" for pid, mib in sorted(live.items()))
                raise GpuProbeError(
                    f"cannot remove simulated GPU device {self.index}: live processes hold "
                    f"memory on it: {pids}"
                )
            try:
                (self.directory / _STATE).unlink()
            except OSError as exc:
                raise GpuProbeError(
                    f"cannot remove simulated GPU device {self.index}: {exc.strerror}"
                ) from exc
            state.clear()  # nothing to write back
        shutil.rmtree(self.directory, ignore_errors=True)

    @staticmethod
    def _used(state: dict[str, Any]) -> int:
        return sum(int(r["mib"]) for r in state["allocations"])

    @staticmethod
    def _holders(state: dict[str, Any]) -> dict[int, int]:
        out: dict[int, int] = {}
        for r in state["allocations"]:
            if r["exited_at"] is None:
                out[int(r["pid"])] = out.get(int(r["pid"]), 0) + int(r["mib"])
        return out

    def _collect_garbage(self, state: dict[str, Any]) -> None:
        """Mark newly dead holders; drop those dead for longer than the lag (the 'driver')."""
        now = self._time()
        lag = float(state["reclaim_lag_s"])
        kept = []
        for record in state["allocations"]:
            if record["exited_at"] is None and not _same_process(
                record, _start_time(int(record["pid"]))
            ):
                record["exited_at"] = now
            if record["exited_at"] is not None and now >= float(record["exited_at"]) + lag:
                continue
            kept.append(record)
        state["allocations"] = kept

    @contextlib.contextmanager
    def _locked(
        self, create: tuple[int | None, float | None] | None = None
    ) -> Iterator[dict[str, Any]]:
        """Hold the lock, yield the garbage-collected state, write it back if it changed."""
        state_path = self.directory / _STATE
        try:
            lock_fd = os.open(self.directory / _LOCK, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise GpuProbeError(
                f"cannot open the simulated GPU at {self.directory}: {exc.strerror}"
            ) from exc
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            state = self._read(state_path, create)
            # A state just made up by _read has no file yet: "" forces the first write.
            before = json.dumps(state, sort_keys=True) if state_path.exists() else ""
            if create is not None:
                self._apply_settings(state, *create)
            # Another process may have resized the GPU or changed its lag since we opened it.
            self.total_mib = int(state["total_mib"])
            self.reclaim_lag_s = float(state["reclaim_lag_s"])
            self._collect_garbage(state)
            try:
                yield state
            finally:
                # Written even when the body raised: an OOM record must persist. An emptied
                # state is a device being removed: nothing to write.
                if state and json.dumps(state, sort_keys=True) != before:
                    self._write(state_path, state)
        finally:
            os.close(lock_fd)  # closing the descriptor releases the flock

    def _read(self, path: Path, create: tuple[int | None, float | None] | None) -> dict[str, Any]:
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            if create is None or create[0] is None:
                raise GpuProbeError(
                    f"no simulated GPU at {self.directory} (state file gone); "
                    "create it with `gpusm sim create --total-mib N`"
                ) from None
            return {
                "format": _FORMAT,
                "uuid": f"SIM-{uuid.uuid4()}",
                "total_mib": create[0],
                "reclaim_lag_s": DEFAULT_RECLAIM_LAG_S if create[1] is None else create[1],
                "allocations": [],
                "ooms": [],
            }
        except OSError as exc:
            raise GpuProbeError(f"cannot read {path}: {exc.strerror}") from exc
        try:
            state = json.loads(text)
            if not isinstance(state, dict) or state.get("format") != _FORMAT:
                raise ValueError("unknown format")
            int(state["total_mib"])
            float(state["reclaim_lag_s"])
            list(state["allocations"])
            list(state["ooms"])
        except (ValueError, KeyError, TypeError) as exc:
            raise GpuProbeError(
                f"the simulated GPU state {path} is damaged ({exc}); delete {self.directory} "
                "and create it again"
            ) from exc
        return state

    def _apply_settings(
        self, state: dict[str, Any], total_mib: int | None, reclaim_lag_s: float | None
    ) -> None:
        if reclaim_lag_s is not None:
            state["reclaim_lag_s"] = reclaim_lag_s
        if total_mib is not None and total_mib != state["total_mib"]:
            self._collect_garbage(state)
            used = self._used(state)
            if used > total_mib:
                raise GpuProbeError(
                    f"cannot resize the simulated GPU at {self.directory} to {total_mib} MiB: "
                    f"{used} MiB are in use"
                )
            state["total_mib"] = total_mib

    def _write(self, path: Path, state: dict[str, Any]) -> None:
        # Unique per process and thread; the lock is held, so nobody else writes meanwhile.
        tmp = path.with_name(f".{_STATE}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            tmp.write_text(json.dumps(state), encoding="utf-8")
            os.replace(tmp, path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise GpuProbeError(f"cannot write {path}: {exc.strerror}") from exc


def select_devices(devices: SimGpu | Sequence[SimGpu], visible: str | None) -> list[SimGpu]:
    """The devices a ``CUDA_VISIBLE_DEVICES`` value names, in its order.

    ``visible`` is a comma-separated list of device indices or UUIDs (both may be mixed);
    None or blank means device 0. A name that matches none of ``devices``, or a device
    named twice, raises :class:`UnknownSimDevice`.
    """
    pool = [devices] if isinstance(devices, SimGpu) else list(devices)
    if visible is None or not visible.strip():
        visible = "0"
    chosen: list[SimGpu] = []
    for name in (part.strip() for part in visible.split(",")):
        found = next((d for d in pool if name in (str(d.index), d.uuid)), None)
        if found is None:
            known = ", ".join(f"{d.index} ({d.uuid})" for d in pool)
            raise UnknownSimDevice(
                f"CUDA_VISIBLE_DEVICES={visible!r} names {name!r}, which is no simulated GPU "
                f"device; the devices are {known}"
            )
        if found in chosen:
            raise UnknownSimDevice(
                f"CUDA_VISIBLE_DEVICES={visible!r} names device {found.index} twice"
            )
        chosen.append(found)
    return chosen


class SimProbe:
    """The :class:`~gpusm.ports.GpuProbe` of simulated GPUs: one or several devices.

    ``devices`` is one :class:`SimGpu` or the devices in index order (as
    :meth:`SimGpu.open_all` returns them); ``sim`` is device 0.
    """

    # The simulated GPU's accounting is exact.
    slack_mib = 0

    def __init__(self, devices: SimGpu | Sequence[SimGpu]) -> None:
        self.devices: list[SimGpu] = [devices] if isinstance(devices, SimGpu) else list(devices)
        if not self.devices:
            raise GpuProbeError("a simulated GPU probe needs at least one device")
        for position, sim in enumerate(self.devices):
            if sim.index != position:
                raise GpuProbeError(
                    f"simulated GPU device {sim.index} ({sim.directory}) is at position "
                    f"{position}; give the devices in index order, from 0"
                )
        self.sim = self.devices[0]

    def device_count(self) -> int:
        """How many simulated devices the probe reads."""
        return len(self.devices)

    def device(self, device: int | str = 0) -> SimGpu:
        """The device with this index or UUID; anything else raises GpuProbeError."""
        for sim in self.devices:
            if device == sim.uuid or (
                isinstance(device, int) and not isinstance(device, bool) and device == sim.index
            ):
                return sim
        known = ", ".join(f"index {d.index}, uuid {d.uuid}" for d in self.devices)
        raise GpuProbeError(f"no GPU {device!r}: the simulated GPUs are {known}")

    def snapshot(self, device: int | str = 0) -> DeviceSnapshot:
        """A simulated device, by index or UUID; anything else raises GpuProbeError."""
        return self.device(device).snapshot()

    def oom_count(self) -> int | None:
        """Allocations the simulated devices refused since they were created, all together."""
        return sum(len(sim.ooms()) for sim in self.devices)

    def close(self) -> None:
        """Nothing to release; idempotent."""
