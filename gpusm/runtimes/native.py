"""Native runtime: services as local processes, each in its own session and process group.

A service's identity is its pid *and* the process create time (read through
:mod:`gpusm.procs`, the one module that talks to the OS about processes), so a pid the
kernel reused for something else is never mistaken for ours and never signalled.

- ``start`` runs ``NativeServiceConfig.command`` (``{python}`` in any argument becomes
  ``sys.executable``) in ``cwd`` with ``os.environ`` + ``extra_env`` + ``service.env`` +
  the device variables + the markers ``GPUSM_SERVICE``/``GPUSM_INSTANCE``, in a new
  session; stdout and stderr are appended to ``<log_dir>/<service>.log``, after a header
  line naming the instance, so that ``log_tail`` can tell the instances of one service
  apart.
- Devices (:func:`device_env`, :func:`fill_devices`, shared with the Docker runtime):
  given a :class:`~gpusm.ports.Placement`, the process gets
  ``CUDA_VISIBLE_DEVICES=<placement.visible_devices()>`` and
  ``CUDA_DEVICE_ORDER=PCI_BUS_ID``, over anything inherited *and* over the service's own
  ``env``. ``{gpu}`` (the first placed index) and ``{gpus}`` (the placed indices, comma
  separated) are replaced in ``command`` and in ``env`` values. Without a placement no
  device variable is set (an inherited one passes through) and both placeholders are the
  configured device: ``gpu: N``, else 0. The indices are gpusm's (and nvidia-smi's); a
  CUDA program sees its placed devices renumbered from 0.
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
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from gpusm import procs
from gpusm.config import NativeServiceConfig
from gpusm.errors import ServiceRuntimeError, ServiceStartFailed, ServiceStopFailed
from gpusm.ports import Handle, Placement, Runtime, StopResult
from gpusm.procs import Proc

if TYPE_CHECKING:
    from gpusm.config import ServiceConfig

__all__ = [
    "CUDA_ORDER_ENV",
    "CUDA_VISIBLE_ENV",
    "INSTANCE_ENV",
    "SERVICE_ENV",
    "NativeRuntime",
    "device_env",
    "device_indices",
    "fill_devices",
]

SERVICE_ENV = "GPUSM_SERVICE"
INSTANCE_ENV = "GPUSM_INSTANCE"
CUDA_VISIBLE_ENV = "CUDA_VISIBLE_DEVICES"
CUDA_ORDER_ENV = "CUDA_DEVICE_ORDER"

_POLL_S = 0.02
# How long SIGKILLed processes may take to disappear before the stop counts as failed.
_KILL_WAIT_S = 5.0
# Finished children whose exit codes stay readable.
_KEEP_FINISHED = 64
# How much of the end of a log ``log_tail`` reads.
_TAIL_BYTES = 64 * 1024
# The line ``start`` writes before an instance's output; group 1 is the instance id.
_HEADER = re.compile(r"^--- gpusm: \S+ starting instance (\S+): ")

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
        kind: str = "native",
    ) -> None:
        self.kind = kind
        self.log_dir = Path(log_dir)
        self.extra_env = dict(extra_env or {})
        self.log_max_bytes = log_max_bytes
        self.marker_filter = marker_filter

    # ------------------------------------------------------------ start
    def start(
        self, service: ServiceConfig, instance: str, placement: Placement | None = None
    ) -> Handle:
        """Launch ``service`` as instance ``instance`` on ``placement``'s devices (see the
        module docstring); ServiceStartFailed if it cannot run."""
        name = service.name
        if not isinstance(service, NativeServiceConfig):
            raise ServiceStartFailed(
                name,
                f"it is a {service.runtime!r} service, not a native one; the runtime "
                f"{self.kind!r} runs only services with runtime: native",
            )
        if not service.command:
            raise ServiceStartFailed(name, "no command to run; set services.<name>.command")
        indices = device_indices(service, placement)
        argv = [
            fill_devices(arg.replace("{python}", sys.executable), indices)
            for arg in service.command
        ]
        cwd = service.cwd
        if cwd is not None and not cwd.is_dir():
            raise ServiceStartFailed(
                name, f"working directory {str(cwd)!r} does not exist; create it or fix cwd"
            )
        env = {
            **os.environ,
            **self.extra_env,
            **{key: fill_devices(value, indices) for key, value in service.env.items()},
            # Last on purpose: the placement wins over the service's own env (device_env).
            **device_env(placement),
        }
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
        create_time = procs.create_time(proc.pid)
        if create_time is None:  # cannot happen while we hold it unreaped; be safe anyway
            with contextlib.suppress(OSError):
                proc.kill()
            proc.wait()
            raise ServiceStartFailed(name, f"cannot read the create time of pid {proc.pid}")
        _remember(proc, create_time)
        return Handle(
            service=name, instance=instance, pid=proc.pid, create_time=create_time, kind=self.kind
        )

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

    def log_tail(self, handle: Handle, lines: int = 20) -> str:
        """The last ``lines`` lines the instance wrote to its service's log; never raises.

        Only the end of the log is read. The lines are those after the instance's
        header line, up to the next instance's; if the end of the log holds no header
        at all (a long output), it is all the latest instance's and is returned. ""
        when the instance wrote nothing, or its lines cannot be found or read.
        """
        if lines <= 0:
            return ""
        try:
            with self.log_path(handle.service).open("rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - _TAIL_BYTES))
                data = f.read()
        except OSError:
            return ""
        text = data.decode(errors="replace").splitlines()
        if not any(_HEADER.match(line) for line in text):
            return "\n".join(text[-lines:])
        mine: list[str] = []
        ours = False  # lines before the first header belong to an unknown instance
        for line in text:
            header = _HEADER.match(line)
            if header is None:
                if ours:
                    mine.append(line)
                continue
            ours = header.group(1) == handle.instance
            if ours:
                mine = []  # the instance id was started again: its newest run counts
        return "\n".join(mine[-lines:])

    # ------------------------------------------------------------ watch
    def is_alive(self, handle: Handle) -> bool:
        """Whether the handle's process runs, is not a zombie, and has the handle's create time."""
        return self._process(handle) is not None

    def signal(self, handle: Handle, name: str) -> None:
        """Send the signal ``name`` to the instance's top process (a park or wake step)."""
        proc = self._process(handle)
        if proc is None:
            raise ServiceRuntimeError(handle.service, f"cannot send {name}: it is not running")
        try:
            os.kill(proc.pid, signal.Signals[name])
        except (KeyError, OSError) as exc:
            raise ServiceRuntimeError(handle.service, f"cannot send {name}: {exc}") from exc

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
        return {p.pid for p in procs.tree(proc) if procs.running(p)}

    def attribute(self, pids: Collection[int], handles: Sequence[Handle]) -> dict[int, Handle]:
        """Pids carrying an instance's marker, or descending from its top process."""
        return attribute_by_lineage(pids, handles)

    def find_orphans(self) -> list[Handle]:
        """Live processes carrying the gpusm markers: the topmost one of each instance."""
        found = {
            m.pid: m
            for m in procs.scan_marked(SERVICE_ENV, INSTANCE_ENV)
            if self.marker_filter is None or self.marker_filter(m.env)
        }
        best: dict[str, procs.Marked] = {}
        for marked in found.values():
            instance = marked.env[INSTANCE_ENV]
            parent = found.get(marked.ppid)
            if parent is not None and parent.env[INSTANCE_ENV] == instance:
                continue  # a descendant of the instance's top process
            # If the top process died, its children are separate tops: prefer a group
            # leader (the one that was launched), else the oldest.
            current = best.get(instance)
            if current is None or _rank(marked) < _rank(current):
                best[instance] = marked
        return [
            Handle(
                service=m.env[SERVICE_ENV],
                instance=instance,
                pid=m.pid,
                create_time=m.create_time,
                kind=self.kind,
            )
            for instance, m in sorted(best.items())
        ]

    def _process(self, handle: Handle) -> Proc | None:
        proc = procs.find(handle.pid, handle.create_time)
        if proc is None:
            return None  # gone, or the pid was reused by someone else
        if not procs.running(proc):
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
        tree = procs.tree(top) if top is not None else self._stragglers(handle)
        if not tree:
            return StopResult(
                duration_s=time.monotonic() - began, escalated=False, already_dead=True
            )
        procs.signal_tree(top, tree, signal.SIGTERM)
        deadline = began + grace_s
        # Poll fast at first (most services exit within milliseconds of SIGTERM), then
        # back off to _POLL_S so that a slow stop does not burn a core scanning /proc.
        gap = 0.002
        while True:
            _reap(top)
            tree = procs.grow(tree)
            alive = [p for p in tree if procs.running(p)]
            if not alive or time.monotonic() >= deadline:
                break
            time.sleep(min(gap, max(0.0, deadline - time.monotonic())))
            gap = min(gap * 1.5, _POLL_S)
        if alive:
            procs.signal_tree(top, tree, signal.SIGKILL)
            kill_deadline = time.monotonic() + _KILL_WAIT_S
            while survivors := [p for p in procs.grow(tree) if procs.running(p)]:
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

    def _stragglers(self, handle: Handle) -> set[Proc]:
        # Processes of a dead instance that outlived its top process (found by marker).
        # The handle's own pid is excluded: if it runs, its create time did not match,
        # so it is someone else's now.
        skip = () if handle.pid is None else (handle.pid,)
        return {
            m.proc
            for m in procs.scan_marked(SERVICE_ENV, INSTANCE_ENV, skip=skip)
            if m.env[INSTANCE_ENV] == handle.instance and m.env[SERVICE_ENV] == handle.service
        }

    # ------------------------------------------------------------ close
    def close(self) -> None:
        """Nothing to release (services keep running); idempotent."""


def device_indices(service: ServiceConfig, placement: Placement | None) -> tuple[int, ...]:
    """The indices ``{gpu}``/``{gpus}`` stand for: the placement's, else the configured
    device (``gpu: N``, or 0)."""
    if placement is None:
        pinned = service.pinned
        return (0 if pinned is None else pinned,)
    if not placement.indices:
        raise ServiceStartFailed(service.name, "its placement names no device")
    return tuple(placement.indices)


def fill_devices(text: str, indices: Sequence[int]) -> str:
    """``text`` with ``{gpus}`` -> the indices comma separated, ``{gpu}`` -> the first."""
    return text.replace("{gpus}", ",".join(str(i) for i in indices)).replace(
        "{gpu}", str(indices[0])
    )


def device_env(placement: Placement | None, visible: str | None = None) -> dict[str, str]:
    """The device variables for ``placement`` (none without one); ``visible`` overrides
    the value of ``CUDA_VISIBLE_DEVICES`` (a container that sees only some devices).

    They are applied over the service's own ``env`` on purpose: gpusm admits, accounts
    and evicts by the devices it placed the instance on, so a process that picked other
    devices would use VRAM gpusm counts as free elsewhere and break every guarantee. To
    choose devices, configure ``gpu:`` instead. ``PCI_BUS_ID`` makes CUDA number devices
    as NVML and nvidia-smi do (CUDA's default puts the fastest first), which is what the
    indices mean.
    """
    if placement is None:
        return {}
    return {
        CUDA_VISIBLE_ENV: placement.visible_devices() if visible is None else visible,
        CUDA_ORDER_ENV: "PCI_BUS_ID",
    }


def attribute_by_lineage(pids: Collection[int], handles: Sequence[Handle]) -> dict[int, Handle]:
    """:meth:`gpusm.ports.Runtime.attribute` for instances made of host processes
    (native ones, and containers seen from the host): marker or ancestry."""
    by_instance = {h.instance: h for h in handles}
    roots = {h.instance: (h.pid, h.create_time) for h in handles}
    owners = procs.attribute(pids, roots, INSTANCE_ENV)
    return {pid: by_instance[instance] for pid, instance in owners.items()}


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
    if entry is None or not procs.same_create_time(entry[1], create_time):
        return None
    return entry[0]


def _rank(marked: procs.Marked) -> tuple[bool, float]:
    """Sort key of candidate tops: group leaders first, then the oldest."""
    try:
        return (marked.pid != os.getpgid(marked.pid), marked.create_time)
    except ProcessLookupError:
        return (True, float("inf"))


def _reap(proc: Proc | None, wait_s: float = 0.0) -> None:
    """Collect the exit status of our own child so that it does not linger as a zombie.

    Only for a process whose identity was checked (``proc``), never a bare pid: that
    pid may by now be another child of ours, whose status is not ours to take. With
    ``wait_s``, wait that long for a child that is dying but not yet collectable.
    """
    if proc is None:
        return
    # The create time was read when the process was looked up (procs.find).
    child = _child(proc.pid, procs.create_time(proc))
    if child is not None:
        if child.poll() is None and wait_s > 0:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=wait_s)
        return
    # A child of this process that no NativeRuntime launched (or that was forgotten).
    if procs.is_our_child(proc):
        with contextlib.suppress(ChildProcessError):
            os.waitpid(proc.pid, os.WNOHANG)


_: type[Runtime] = NativeRuntime  # mypy checks that it implements the port
