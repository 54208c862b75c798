"""Native runtime: services as local processes, each in its own session and process group.

This is the only module that signals pids. A service's identity is its pid *and* the
process create time (from psutil), so a pid the kernel reused for something else is
never mistaken for ours and never signalled.

- ``start`` runs ``ServiceConfig.command`` (``{python}`` in any argument becomes
  ``sys.executable``) in ``cwd`` with ``os.environ`` + ``extra_env`` + ``service.env`` +
  the markers ``GPUSM_SERVICE``/``GPUSM_INSTANCE``, in a new session; stdout and
  stderr are appended to ``<log_dir>/<service>.log``.
- Logs are bounded simply: at each start, a log larger than ``log_max_bytes`` is
  renamed to ``<service>.log.1`` (replacing the previous one) and a new one begun. A
  single run can therefore grow a log past the bound; the next start cuts it.
- ``stop`` sends SIGTERM to the process group and to every descendant (children that
  called ``setsid`` left the group), waits up to the grace, then SIGKILLs whatever of
  the tree is left. Descendants are collected *before* signalling, because once a
  parent dies its children are re-parented and can no longer be found from it.
- ``find_orphans`` finds processes by their environment markers, e.g. after a crash
  of the coordinator that launched them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import psutil

from gpusm.errors import ServiceStartFailed, ServiceStopFailed
from gpusm.ports import Handle, StopResult

if TYPE_CHECKING:
    from gpusm.config import ServiceConfig

__all__ = ["INSTANCE_ENV", "SERVICE_ENV", "NativeRuntime", "kill_tree"]

SERVICE_ENV = "GPUSM_SERVICE"
INSTANCE_ENV = "GPUSM_INSTANCE"

_POLL_S = 0.02
# How long SIGKILLed processes may take to disappear before the stop counts as failed.
_KILL_WAIT_S = 5.0
# Create times come from /proc in clock ticks; equal processes agree far closer than this.
_CREATE_TIME_TOLERANCE = 1e-3
# Finished children whose exit codes stay readable.
_KEEP_FINISHED = 64

# Popen objects of the children this OS process launched, by pid. Module-level on
# purpose: parenthood belongs to the process, not to a runtime object, so a new
# NativeRuntime can still reap (and read the exit code of) a child an old one started.
# Each entry keeps the child's create time, so a stale entry never answers for a reused pid.
_children: dict[int, tuple[subprocess.Popen[bytes], float]] = {}
_children_lock = threading.Lock()


class NativeRuntime:
    """Runs services as local processes; implements :class:`gpusm.ports.Runtime`.

    ``marker_filter`` (given a process's environment) limits which marked processes
    ``find_orphans`` reports, so that tests running side by side see only their own.
    """

    def __init__(
        self,
        log_dir: Path,
        *,
        extra_env: Mapping[str, str] | None = None,
        log_max_bytes: int = 10 * 1024 * 1024,
        marker_filter: Callable[[Mapping[str, str]], bool] | None = None,
    ) -> None:
        self.log_dir = Path(log_dir)
        self.extra_env = dict(extra_env or {})
        self.log_max_bytes = log_max_bytes
        self.marker_filter = marker_filter

    # ------------------------------------------------------------ start
    def start(self, service: ServiceConfig, instance: str) -> Handle:
        """Launch ``service`` as instance ``instance``; ServiceStartFailed if it cannot run."""
        name = service.name
        if not service.command:
            raise ServiceStartFailed(name, "no command to run; set services.<name>.command")
        argv = [arg.replace("{python}", sys.executable) for arg in service.command]
        cwd = service.cwd
        if cwd is not None and not cwd.is_dir():
            raise ServiceStartFailed(
                name, f"working directory {str(cwd)!r} does not exist; create it or fix cwd"
            )
        env = {**os.environ, **self.extra_env, **service.env}
        env[SERVICE_ENV] = name
        env[INSTANCE_ENV] = instance
        log = self._open_log(name)
        try:
            stamp = datetime.now(UTC).isoformat(timespec="milliseconds")
            log.write(f"--- gpusm: {stamp} starting instance {instance}: {argv}\n".encode())
            log.flush()
            proc = subprocess.Popen(
                argv,
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except FileNotFoundError as exc:
            raise ServiceStartFailed(
                name,
                f"command {argv[0]!r} not found; install it or fix services.{name}.command[0]",
            ) from exc
        except PermissionError as exc:
            raise ServiceStartFailed(
                name, f"command {argv[0]!r} is not executable; check its permissions ({exc})"
            ) from exc
        except OSError as exc:
            raise ServiceStartFailed(name, f"cannot launch {argv[0]!r}: {exc}") from exc
        finally:
            log.close()
        # The child cannot be reaped before we read it (we hold its Popen), so even a
        # child that exits at once still has its create time readable.
        create_time = psutil.Process(proc.pid).create_time()
        _remember(proc, create_time)
        return Handle(service=name, instance=instance, pid=proc.pid, create_time=create_time)

    def _open_log(self, service: str) -> BinaryIO:
        try:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            path = self.log_path(service)
            with contextlib.suppress(FileNotFoundError):
                if path.stat().st_size > self.log_max_bytes:
                    path.replace(path.with_name(path.name + ".1"))
            return path.open("ab")
        except OSError as exc:
            raise ServiceStartFailed(
                service, f"cannot open its log in {str(self.log_dir)!r}: {exc.strerror}"
            ) from exc

    def log_path(self, service: str) -> Path:
        """Where the output of ``service`` goes."""
        return self.log_dir / f"{service}.log"

    def log_tail(self, service: str, lines: int = 20) -> str:
        """The last ``lines`` lines of the service's log ("" if there is none)."""
        try:
            with self.log_path(service).open("rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 64 * 1024))
                data = f.read()
        except OSError:
            return ""
        return "\n".join(data.decode(errors="replace").splitlines()[-lines:])

    # ------------------------------------------------------------ watch
    def is_alive(self, handle: Handle) -> bool:
        """Whether the handle's process runs, is not a zombie, and has the handle's create time."""
        return self._process(handle) is not None

    def exit_code(self, handle: Handle) -> int | None:
        """The exit status of a child this OS process launched, once it ended; else None.

        Negative means killed by that signal, as in :attr:`subprocess.Popen.returncode`.
        """
        child = _child(handle.pid, handle.create_time)
        return None if child is None else child.poll()

    def pids_of(self, handle: Handle) -> set[int]:
        """The instance's pid and all its live descendants; empty once it is gone."""
        proc = self._process(handle)
        if proc is None:
            return set()
        return {p.pid for p in _tree(proc) if _running(p)}

    def find_orphans(self) -> list[Handle]:
        """Live processes carrying the gpusm markers: the topmost one of each instance."""
        found: dict[int, tuple[psutil.Process, str, str]] = {}
        me = os.getpid()
        for proc in psutil.process_iter():
            try:
                if proc.pid == me:
                    continue
                env = proc.environ()
                service, instance = env.get(SERVICE_ENV), env.get(INSTANCE_ENV)
                if not service or not instance or not _running(proc):
                    continue
                if self.marker_filter is not None and not self.marker_filter(env):
                    continue
                found[proc.pid] = (proc, service, instance)
            except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
                continue  # not ours to read, or gone while we looked
        best: dict[str, tuple[psutil.Process, str]] = {}
        for proc, service, instance in found.values():
            try:
                parent = found.get(proc.ppid())
            except psutil.NoSuchProcess:
                continue
            if parent is not None and parent[2] == instance:
                continue  # a descendant of the instance's top process
            # If the top process died, its children are separate tops: prefer a group
            # leader (the one that was launched), else the oldest.
            current = best.get(instance)
            if current is None or _rank(proc) < _rank(current[0]):
                best[instance] = (proc, service)
        return [
            Handle(service=s, instance=i, pid=p.pid, create_time=p.create_time())
            for i, (p, s) in sorted(best.items())
        ]

    def _process(self, handle: Handle) -> psutil.Process | None:
        if handle.pid is None or handle.create_time is None:
            return None
        try:
            proc = psutil.Process(handle.pid)
            if abs(proc.create_time() - handle.create_time) > _CREATE_TIME_TOLERANCE:
                return None  # the pid was reused by someone else
        except psutil.NoSuchProcess:
            return None
        if not _running(proc):
            _reap(proc)
            return None
        return proc

    # ------------------------------------------------------------ stop
    def stop(self, handle: Handle, grace_s: float) -> StopResult:
        """SIGTERM the group and every descendant, wait ``grace_s``, then SIGKILL what is left.

        Returns once no process of the instance is left; ServiceStopFailed if one
        survives SIGKILL (e.g. stuck in the kernel). If the top process is already
        gone, stragglers still carrying the instance's marker are stopped the same way
        and the result says ``already_dead``.
        """
        began = time.monotonic()
        top = self._process(handle)
        tree = _tree(top) if top is not None else self._stragglers(handle)
        if not tree:
            return StopResult(
                duration_s=time.monotonic() - began, escalated=False, already_dead=True
            )
        _signal_tree(top, tree, signal.SIGTERM)
        deadline = began + grace_s
        # Poll fast at first (most services exit within milliseconds of SIGTERM), then
        # back off to _POLL_S so that a slow stop does not burn a core scanning /proc.
        gap = 0.002
        while True:
            _reap(top)
            tree = _grow(tree)
            alive = [p for p in tree if _running(p)]
            if not alive or time.monotonic() >= deadline:
                break
            time.sleep(min(gap, max(0.0, deadline - time.monotonic())))
            gap = min(gap * 1.5, _POLL_S)
        if alive:
            _signal_tree(top, tree, signal.SIGKILL)
            kill_deadline = time.monotonic() + _KILL_WAIT_S
            while survivors := [p for p in _grow(tree) if _running(p)]:
                _reap(top)
                if time.monotonic() >= kill_deadline:
                    raise ServiceStopFailed(
                        handle.service,
                        f"pids {sorted(p.pid for p in survivors)} survived SIGKILL for "
                        f"{_KILL_WAIT_S:.0f}s (stuck in the kernel?)",
                    )
                time.sleep(_POLL_S)
        _reap(top, wait_s=1.0)  # everything is dead: collect the status
        return StopResult(
            duration_s=time.monotonic() - began, escalated=bool(alive), already_dead=top is None
        )

    def _stragglers(self, handle: Handle) -> set[psutil.Process]:
        # Processes of a dead instance that outlived its top process (found by marker).
        # The handle's own pid is excluded: if it runs, its create time did not match,
        # so it is someone else's now.
        left: set[psutil.Process] = set()
        for proc in psutil.process_iter():
            if proc.pid == handle.pid:
                continue
            with contextlib.suppress(
                psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess
            ):
                env = proc.environ()
                if (
                    env.get(INSTANCE_ENV) == handle.instance
                    and env.get(SERVICE_ENV) == handle.service
                    and _running(proc)
                ):
                    left.add(proc)
        return left


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid``, its process group (if it leads one) and its descendants, now.

    For short-lived helpers such as exec health probes; services go through ``stop``.
    """
    try:
        top = psutil.Process(pid)
        tree = _tree(top)
    except psutil.NoSuchProcess:
        return
    _signal_tree(top, tree, signal.SIGKILL)


def _remember(proc: subprocess.Popen[bytes], create_time: float) -> None:
    with _children_lock:
        # Forget finished children beyond the most recent few, so a long-lived
        # coordinator with many restarts does not accumulate them.
        if len(_children) > _KEEP_FINISHED * 2:
            finished = [pid for pid, (p, _) in _children.items() if p.poll() is not None]
            for pid in finished[:-_KEEP_FINISHED]:
                del _children[pid]
        _children[proc.pid] = (proc, create_time)


def _child(pid: int | None, create_time: float | None) -> subprocess.Popen[bytes] | None:
    """Our Popen of the child with this pid and create time, if we launched it."""
    if pid is None or create_time is None:
        return None
    with _children_lock:
        entry = _children.get(pid)
    if entry is None or abs(entry[1] - create_time) > _CREATE_TIME_TOLERANCE:
        return None
    return entry[0]


def _rank(proc: psutil.Process) -> tuple[bool, float]:
    try:
        return (proc.pid != os.getpgid(proc.pid), proc.create_time())
    except (psutil.NoSuchProcess, ProcessLookupError):
        return (True, float("inf"))


def _tree(top: psutil.Process) -> set[psutil.Process]:
    try:
        return {top, *top.children(recursive=True)}
    except psutil.NoSuchProcess:
        return {top}


def _grow(tree: set[psutil.Process]) -> set[psutil.Process]:
    # Members may fork while shutting down; their new children must not escape.
    grown = set(tree)
    for proc in tree:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.ZombieProcess):
            if _running(proc):
                grown.update(proc.children(recursive=True))
    return grown


def _running(proc: psutil.Process) -> bool:
    # is_running() also checks the create time, so a reused pid reads as not running.
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False


def _signal_tree(
    top: psutil.Process | None, tree: set[psutil.Process], sig: signal.Signals
) -> None:
    # The group first (one syscall reaches members we may not have seen), but never our
    # own group, and only while the top is alive and still leads it: a dead leader's
    # pgid may belong to someone else by now.
    if top is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            pgid = os.getpgid(top.pid)
            if pgid == top.pid and pgid != os.getpgrp() and _running(top):
                os.killpg(pgid, sig)
    for proc in tree:
        # psutil refuses to signal a pid whose create time changed (reused).
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            proc.send_signal(sig)


def _reap(proc: psutil.Process | None, wait_s: float = 0.0) -> None:
    """Collect the exit status of our own child so that it does not linger as a zombie.

    Only for a process whose identity was checked (``proc``), never a bare pid: that
    pid may by now be another child of ours, whose status is not ours to take. With
    ``wait_s``, wait that long for a child that is dying but not yet collectable.
    """
    if proc is None:
        return
    # create_time() is cached by psutil from when the process was looked up.
    child = _child(proc.pid, proc.create_time())
    if child is not None:
        if child.poll() is None and wait_s > 0:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=wait_s)
        return
    # A child of this process that no NativeRuntime launched (or that was forgotten).
    with contextlib.suppress(ChildProcessError, psutil.Error):
        if proc.is_running() and proc.ppid() == os.getpid():
            os.waitpid(proc.pid, os.WNOHANG)
