"""Verified VRAM reclaim: after a stop, wait until the GPU really shows the memory free.

A process that exited may still hold VRAM for a moment while the driver cleans up,
and a process that did not exit holds it for good. ``wait_reclaimed`` polls the GPU
probe until none of the stopped service's pids holds memory and enough is free, or
raises :class:`~gpusm.errors.VramNotReclaimed` naming who still holds it.

Polling starts at 5 ms and grows by half each time up to ``poll_s`` (at most
100 ms), so a prompt reclaim is seen within a few milliseconds while a slow one costs
at most ten probes a second.
"""

from __future__ import annotations

from collections.abc import Callable

from gpusm.clock import SystemClock
from gpusm.errors import VramNotReclaimed
from gpusm.ports import Clock, DeviceSnapshot, GpuProbe

__all__ = ["FIRST_POLL_S", "MAX_POLL_S", "unattributed_mib", "wait_parked", "wait_reclaimed"]

# First gap between probes.
FIRST_POLL_S = 0.005
# No gap between probes is ever longer than this.
MAX_POLL_S = 0.1
_GROWTH = 1.5
_FAST_PHASE_S = 0.2


def wait_reclaimed(
    probe: GpuProbe,
    *,
    service: str,
    pids: set[int],
    expect_free_mib: int,
    max_unattributed_mib: int | None = None,
    device: int = 0,
    settle_timeout_s: float = 5.0,
    poll_s: float = MAX_POLL_S,
    clock: Clock | None = None,
) -> float:
    """Wait until no pid in ``pids`` holds memory and ``free_mib >= expect_free_mib``.

    With ``max_unattributed_mib``, also until the memory that no listed process holds
    (``used - sum(processes)``) is back to at most that: a driver frees an exited
    process's memory a moment after it drops the pid from its list, and memory in that
    state belongs to nobody.

    Returns the seconds it took (0.0 if it already held). Raises VramNotReclaimed
    after ``settle_timeout_s`` with the memory still held: by the given pids if any
    of them still holds some, else by every process on the device (someone else took
    the room). GpuProbeError from the probe passes through.
    """
    clock = clock or SystemClock()
    cap = min(max(poll_s, FIRST_POLL_S), MAX_POLL_S)
    began = clock.monotonic()
    deadline = began + settle_timeout_s
    gap = FIRST_POLL_S
    while True:
        snap = probe.snapshot(device)
        if _reclaimed(snap, pids, expect_free_mib, max_unattributed_mib):
            return clock.monotonic() - began
        now = clock.monotonic()
        if now >= deadline:
            raise VramNotReclaimed(service, now - began, _holders(snap, pids), snap.free_mib)
        clock.sleep(min(gap, deadline - now))
        # A driver's freeing lag is typically tens of ms: stay at the first gap for the
        # first 200 ms, then back off.
        if now - began > _FAST_PHASE_S:
            gap = min(gap * _GROWTH, cap)


def wait_parked(
    probe: GpuProbe,
    *,
    pids_of: Callable[[], set[int]],
    max_held_mib: int,
    device: int,
    settle_timeout_s: float,
    clock: Clock,
    alive: Callable[[], bool] = lambda: True,
) -> tuple[bool, int, float]:
    """Wait until the pids of a parking service (``pids_of()``, asked on every poll: a
    server's workers come and go) hold at most ``max_held_mib`` MiB together.

    Returns (parked, MiB they held at the last reading, seconds waited). It gives up
    (False) after ``settle_timeout_s``, or at once when ``alive()`` turns false. The
    polls back off as :func:`wait_reclaimed`'s do. GpuProbeError passes through.
    """
    began = clock.monotonic()
    deadline = began + settle_timeout_s
    gap = FIRST_POLL_S
    while True:
        pids = pids_of()
        snap = probe.snapshot(device)
        held = sum(snap.processes.get(pid, 0) for pid in pids)
        now = clock.monotonic()
        if held <= max_held_mib and pids:
            return True, held, now - began
        if now >= deadline or not alive():
            return False, held, now - began
        clock.sleep(min(gap, deadline - now))
        if now - began > _FAST_PHASE_S:
            gap = min(gap * _GROWTH, MAX_POLL_S)


def _reclaimed(
    snap: DeviceSnapshot, pids: set[int], expect_free_mib: int, max_unattributed: int | None
) -> bool:
    held = any(snap.processes.get(pid, 0) > 0 for pid in pids)
    if held or snap.free_mib < expect_free_mib:
        return False
    return max_unattributed is None or unattributed_mib(snap) <= max_unattributed


def unattributed_mib(snap: DeviceSnapshot) -> int:
    """Memory in use that no listed process holds (driver overhead, or freeing lag)."""
    return max(0, snap.used_mib - sum(snap.processes.values()))


def _holders(snap: DeviceSnapshot, pids: set[int]) -> dict[int, int]:
    ours = {pid: mib for pid, mib in snap.processes.items() if pid in pids and mib > 0}
    return ours or {pid: mib for pid, mib in snap.processes.items() if mib > 0}
