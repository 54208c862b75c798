"""Operating-system processes: the one module that imports psutil.

Everything gpusm asks the OS about processes goes through here: create times, process
trees, environment markers, signals. A process's identity is its pid *and* its create
time, so a pid the kernel reused for another process is never taken for the one that
held it before (and never signalled).

psutil's exceptions never leave this module: a process that is gone, is a zombie or
cannot be read shows up as ``None``, ``False``, an empty set, or is left out, as each
function says.

:data:`Proc` is psutil's process object, exported as a type for annotations only:
callers read its ``pid`` and hand it back to the functions here, and never call its
methods (those raise psutil's exceptions).
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import TypeAlias

import psutil

__all__ = [
    "CREATE_TIME_TOLERANCE_S",
    "Marked",
    "Proc",
    "cmdline",
    "create_time",
    "find",
    "grow",
    "is_our_child",
    "kill_tree",
    "live_create_time",
    "lookup",
    "running",
    "same_create_time",
    "scan_marked",
    "signal_tree",
    "tree",
    "tree_pids",
]

#: A process as psutil sees it; treat it as opaque (see the module docstring).
Proc: TypeAlias = psutil.Process

#: Create times come from /proc in clock ticks; two readings of one process agree far
#: closer than this, and two processes that held the same pid differ by far more.
CREATE_TIME_TOLERANCE_S = 1e-3


# ---------------------------------------------------------------- identity
def same_create_time(
    a: float | None, b: float | None, tolerance_s: float = CREATE_TIME_TOLERANCE_S
) -> bool:
    """Whether two create times are known and name the same process."""
    return a is not None and b is not None and abs(a - b) <= tolerance_s


def lookup(pid: int | None) -> Proc | None:
    """The process that holds ``pid`` now, whoever it is (a zombie too); None if none.

    No identity check: for a pid recorded earlier use :func:`find`.
    """
    if pid is None or pid <= 0:
        return None
    try:
        return psutil.Process(pid)
    except psutil.Error:
        return None


def create_time(target: int | Proc | None) -> float | None:
    """Create time (seconds since the epoch) of a pid, or of a :data:`Proc`.

    Zombies have one too. None when there is no such process or it cannot be read. A
    :data:`Proc` keeps the value from its first reading, so it still answers after the
    process is gone (if it was read before, as :func:`find` does).
    """
    proc = lookup(target) if target is None or isinstance(target, int) else target
    return None if proc is None else _create_time(proc)


def live_create_time(pid: int) -> float | None:
    """Create time of a live, non-zombie process; None if there is none."""
    proc = lookup(pid)
    if proc is None:
        return None
    try:
        with proc.oneshot():
            if proc.status() == psutil.STATUS_ZOMBIE:
                return None
            return float(proc.create_time())
    except psutil.Error:
        return None


def find(
    pid: int | None,
    create_time: float | None,
    tolerance_s: float = CREATE_TIME_TOLERANCE_S,
) -> Proc | None:
    """The process with ``pid`` if it still has ``create_time``; else None.

    None as well when either is unknown or there is no such process. A zombie is
    returned (it is still that process, e.g. to be reaped): ask :func:`running`.
    """
    if create_time is None:
        return None
    proc = lookup(pid)
    if proc is None or not same_create_time(_create_time(proc), create_time, tolerance_s):
        return None  # gone, or the pid was reused by someone else
    return proc


def running(proc: Proc) -> bool:
    """Whether ``proc`` runs: not gone, not a zombie, and its pid not reused since."""
    # is_running() also compares the create time, so a reused pid reads as not running.
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def is_our_child(proc: Proc) -> bool:
    """Whether ``proc`` (still that process, zombie or not) is a child of this process.

    Such a child's exit status is ours to collect (``os.waitpid``).
    """
    try:
        return proc.is_running() and proc.ppid() == os.getpid()
    except psutil.Error:
        return False


def cmdline(pid: int) -> list[str]:
    """The argv of ``pid``; empty if it cannot be read (another user's, gone, a zombie)."""
    proc = lookup(pid)
    if proc is None:
        return []
    try:
        return list(proc.cmdline())
    except psutil.Error:
        return []


# ---------------------------------------------------------------- trees
def tree(top: Proc) -> set[Proc]:
    """``top`` and all its descendants now (just ``top`` if it is gone)."""
    return {top, *_descendants(top)}


def grow(procs: Iterable[Proc]) -> set[Proc]:
    """``procs`` plus the descendants of those still running.

    Members of a tree may fork while shutting down; call this between polls so that
    their new children do not escape.
    """
    grown = set(procs)
    for proc in list(grown):
        if running(proc):
            grown.update(_descendants(proc))
    return grown


def tree_pids(pid: int) -> set[int]:
    """``pid`` and the pids of its descendants; empty if there is no such process."""
    proc = lookup(pid)
    if proc is None:
        return set()
    return {pid} | {p.pid for p in _descendants(proc)}


def _descendants(proc: Proc) -> list[Proc]:
    # The one place that finds children: a walk of the whole process table today.
    try:
        return list(proc.children(recursive=True))
    except psutil.Error:
        return []


# ---------------------------------------------------------------- signals
def signal_tree(top: Proc | None, procs: Iterable[Proc], sig: signal.Signals) -> None:
    """Send ``sig`` to ``top``'s process group, then to each of ``procs``.

    The group is signalled only while ``top`` runs and still leads it, and never when
    it is this process's own group: a dead leader's pgid may belong to someone else by
    now. Each process is signalled only if it still is that process (a reused pid is
    left alone); processes that are gone or not ours to signal are skipped.
    """
    if top is not None:
        # The group first: one syscall reaches members we may not have seen.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            pgid = os.getpgid(top.pid)
            if pgid == top.pid and pgid != os.getpgrp() and running(top):
                os.killpg(pgid, sig)
    for proc in procs:
        # psutil refuses to signal a pid whose create time changed (reused).
        with contextlib.suppress(psutil.Error):
            proc.send_signal(sig)


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid``, its process group (if it leads one) and its descendants, now.

    For short-lived helpers such as exec health probes; services are stopped by their
    runtime. Nothing happens if ``pid`` is gone.
    """
    top = lookup(pid)
    if top is None:
        return
    signal_tree(top, tree(top), signal.SIGKILL)


# ---------------------------------------------------------------- markers
@dataclass(frozen=True, eq=False)
class Marked:
    """A running process found by :func:`scan_marked`, as read during the scan."""

    proc: Proc
    create_time: float
    ppid: int
    env: Mapping[str, str]

    @property
    def pid(self) -> int:
        """The process id."""
        return int(self.proc.pid)


def scan_marked(*keys: str, skip: Collection[int] = ()) -> list[Marked]:
    """Every running process whose environment sets each of ``keys`` to a non-empty value.

    This process, the pids in ``skip``, zombies, processes whose environment cannot be
    read (another user's) and processes that vanish while looked at are left out.
    Reads the environment of every process on the machine, so it is not for hot paths.
    """
    me = os.getpid()
    found: list[Marked] = []
    for proc in psutil.process_iter():
        if proc.pid == me or proc.pid in skip:
            continue
        try:
            env = proc.environ()
            if not all(env.get(key) for key in keys) or not running(proc):
                continue
            with proc.oneshot():
                found.append(Marked(proc, float(proc.create_time()), int(proc.ppid()), env))
        except psutil.Error:
            continue  # not ours to read, or gone while we looked
    return found


def _create_time(proc: Proc) -> float | None:
    try:
        return float(proc.create_time())
    except psutil.Error:
        return None
