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
import threading
import time
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import TypeAlias

import psutil

__all__ = [
    "CREATE_TIME_TOLERANCE_S",
    "Lineage",
    "Marked",
    "Proc",
    "attribute",
    "cmdline",
    "create_time",
    "find",
    "grow",
    "is_our_child",
    "kill_tree",
    "lineage",
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
    """Create time of a live, non-zombie process; None if there is none.

    Cheap enough for every GPU reading: one read of ``/proc/<pid>/stat``, whose start
    time (in clock ticks since boot) names the process; the seconds-since-the-epoch value
    is computed once per process.
    """
    stat = _stat(pid)
    if stat is None:
        return None
    state, ticks = stat
    if state == "Z":
        return None
    key = (pid, ticks)
    known = _ctimes.get(key)
    if known is not None:
        return known
    proc = lookup(pid)
    ctime = None if proc is None else _create_time(proc)
    if ctime is not None:
        if len(_ctimes) >= _LINEAGE_MAX:
            _ctimes.clear()
        _ctimes[key] = ctime
    return ctime


# (pid, start ticks) -> create time in seconds since the epoch.
_ctimes: dict[tuple[int, int], float] = {}


def _stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in ticks) from /proc/<pid>/stat; None if unreadable."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = raw[raw.rfind(b")") + 2 :].split()
    try:
        return fields[0].decode(), int(fields[19])
    except (IndexError, ValueError):
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
    # The one place that finds children. Where the kernel lists each task's children
    # (/proc/<pid>/task/<tid>/children), walk down from ``proc`` only; elsewhere psutil
    # walks the whole process table.
    if _children_files():
        found: list[Proc] = []
        todo = [int(proc.pid)]
        while todo:
            for pid in _children_of(todo.pop()):
                child = lookup(pid)
                if child is not None:
                    found.append(child)
                    todo.append(pid)
        return found
    try:
        return list(proc.children(recursive=True))
    except psutil.Error:
        return []


def _children_of(pid: int) -> list[int]:
    children: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return children
    for tid in tasks:
        path = f"/proc/{pid}/task/{tid}/children"
        with contextlib.suppress(OSError, ValueError), open(path, encoding="ascii") as f:
            children += [int(c) for c in f.read().split()]
    return children


_CHILDREN_FILES: list[bool] = []


def _children_files() -> bool:
    """Whether this kernel lists children per task (CONFIG_PROC_CHILDREN)."""
    if not _CHILDREN_FILES:
        _CHILDREN_FILES.append(os.path.exists(f"/proc/self/task/{os.getpid()}/children"))
    return _CHILDREN_FILES[0]


# ---------------------------------------------------------------- attribution
@dataclass(frozen=True)
class Lineage:
    """What attribution needs of one process, read once per (pid, create time).

    ``marker`` is the value of the marker variable in its environment (None when it has
    none or the environment cannot be read); ``ancestors`` are (pid, create time) of its
    parent, grandparent... up to but not including pid 1, as they were when read.
    """

    pid: int
    create_time: float
    marker: str | None
    ancestors: tuple[tuple[int, float], ...]


# A process younger than this may not show its own environment yet (see lineage()).
_YOUNG_S = 1.0
# Enough for every GPU process of a busy host; the oldest entries go first beyond it.
_LINEAGE_MAX = 4096
_lineages: dict[tuple[int, float, str], Lineage] = {}
_lineage_lock = threading.Lock()


def lineage(pid: int, marker_key: str) -> Lineage | None:
    """``pid``'s :class:`Lineage`, from the cache when this very process was read before.

    Costs one create-time read when cached; a first read walks up the parent chain
    (never the whole process table). None if there is no such process.
    """
    ctime = live_create_time(pid)
    if ctime is None:
        return None
    key = (pid, ctime, marker_key)
    with _lineage_lock:
        known = _lineages.get(key)
    if known is not None:
        return known
    proc = find(pid, ctime)
    if proc is None:
        return None
    ancestors, complete = _ancestors(proc)
    found = Lineage(pid, ctime, _marker(proc, marker_key), ancestors)
    if not complete or (found.marker is None and time.time() - ctime < _YOUNG_S):
        # Between fork and exec a child still has its parent's environment, and a climb
        # cut short by an ancestor that went away misses the rest: neither is final.
        return found
    with _lineage_lock:
        if len(_lineages) >= _LINEAGE_MAX:
            for old in list(_lineages)[: _LINEAGE_MAX // 4]:
                del _lineages[old]
        _lineages[key] = found
    return found


def attribute(
    pids: Iterable[int], roots: Mapping[str, tuple[int | None, float | None]], marker_key: str
) -> dict[int, str]:
    """Which of ``pids`` belong to which instance of ``roots`` (instance -> its top
    process's pid and create time).

    A pid belongs to an instance when its environment carries the instance's marker
    (``marker_key``), when it is the instance's top process, or when that process is
    among its ancestors. Every other pid is someone else's.
    """
    tops = {(pid, ctime): instance for instance, (pid, ctime) in roots.items() if pid and ctime}
    owners: dict[int, str] = {}
    for pid in pids:
        found = lineage(pid, marker_key)
        if found is None:
            continue
        if found.marker is not None and found.marker in roots:
            owners[pid] = found.marker
            continue
        for member in ((found.pid, found.create_time), *found.ancestors):
            owner = _top_of(member, tops)
            if owner is not None:
                owners[pid] = owner
                break
    return owners


def _top_of(member: tuple[int, float], tops: Mapping[tuple[int, float], str]) -> str | None:
    for (pid, ctime), instance in tops.items():
        if pid == member[0] and same_create_time(ctime, member[1]):
            return instance
    return None


def _marker(proc: Proc, key: str) -> str | None:
    try:
        return proc.environ().get(key) or None
    except psutil.Error:
        return None  # another user's environment, or gone


def _ancestors(proc: Proc) -> tuple[tuple[tuple[int, float], ...], bool]:
    """(pid, create time) of each ancestor below pid 1, and whether the climb finished."""
    chain: list[tuple[int, float]] = []
    try:
        parent = proc.parent()
        while parent is not None and parent.pid > 1 and len(chain) < 64:
            chain.append((int(parent.pid), float(parent.create_time())))
            parent = parent.parent()
    except psutil.Error:
        return tuple(chain), False  # an ancestor exited while we climbed
    return tuple(chain), True


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
