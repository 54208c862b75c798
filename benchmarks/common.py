"""Shared parts of the benchmarks: result rows, statistics, processes, fake services, configs.

Every benchmark measures gpusm and a baseline in the same run, on the same machine,
interleaved where it can, and reports medians (and tails) over repetitions, because
the box is shared and noisy. Every process a benchmark starts is registered with a
:class:`ProcessGuard` and stopped at the end, whatever happens.
"""

from __future__ import annotations

import contextlib
import math
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import yaml

__all__ = [
    "Ctx",
    "ProcessGuard",
    "Row",
    "fake_service_argv",
    "fake_service_entry",
    "free_port",
    "http_client",
    "idle_processes",
    "median",
    "ms",
    "percentile",
    "spawn_service",
    "wait_http_ok",
    "write_config",
]

PY = sys.executable


@dataclass
class Row:
    """One line of the results table: gpusm's figure, the baseline's, their ratio, the goal.

    ``met`` is None when the figure has no pass/fail goal (or could not be measured).
    ``details`` holds the raw numbers for ``latest.json``.
    """

    figure: str
    gpusm: str
    baseline: str
    ratio: float | None
    goal: str
    met: bool | None
    details: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "figure": self.figure,
            "gpusm": self.gpusm,
            "baseline": self.baseline,
            "ratio": None if self.ratio is None else round(self.ratio, 4),
            "goal": self.goal,
            "met": self.met,
            "details": self.details,
        }


# ---------------------------------------------------------------- statistics
def median(values: Sequence[float]) -> float:
    """The median (NaN for no values)."""
    return percentile(values, 50)


def percentile(values: Sequence[float], pct: float) -> float:
    """Linear-interpolated percentile, as numpy's default (NaN for no values)."""
    data = sorted(values)
    if not data:
        return math.nan
    pos = (len(data) - 1) * pct / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def ms(seconds: float, digits: int = 1) -> str:
    """Seconds as a millisecond string."""
    return f"{seconds * 1000:.{digits}f} ms"


# ---------------------------------------------------------------- processes
class ProcessGuard:
    """Remembers every process a benchmark starts and stops them all at the end.

    ``stop_all`` ends the registered processes (SIGTERM to their group, SIGKILL after a
    grace) and then any remaining descendant of this process: services a coordinator
    launched are our children too, so nothing the benchmarks started outlives them.
    """

    def __init__(self) -> None:
        self._procs: list[subprocess.Popen[bytes]] = []

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        """Start ``argv`` in its own session and remember it."""
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        kwargs.setdefault("stdout", subprocess.DEVNULL)
        kwargs.setdefault("stderr", subprocess.DEVNULL)
        proc = subprocess.Popen(list(argv), start_new_session=True, **kwargs)
        self._procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], grace_s: float = 10.0) -> None:
        """SIGTERM ``proc``'s group, SIGKILL it after ``grace_s``, reap it; then its leftovers.

        Its descendants are listed first: once it is gone they are re-parented and can no
        longer be found from here (a daemon's services, each in its own session).
        """
        descendants: list[psutil.Process] = []
        with contextlib.suppress(psutil.Error):
            descendants = psutil.Process(proc.pid).children(recursive=True)
        if proc.poll() is None:
            _signal_group(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                _signal_group(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
        _end(descendants)
        if proc in self._procs:
            self._procs.remove(proc)

    def stop_all(self) -> None:
        """Stop every registered process, then every leftover descendant of this process."""
        for proc in list(self._procs):
            self.stop(proc)
        _end(psutil.Process().children(recursive=True))


def _end(procs: list[psutil.Process]) -> None:
    """SIGTERM the processes still running (same pid and create time), SIGKILL after 3 s."""
    alive = [p for p in procs if p.is_running()]
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, left = psutil.wait_procs(alive, timeout=3)
    for proc in left:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(left, timeout=3)


def _signal_group(pid: int, sig: signal.Signals) -> None:
    # Our children lead their own session (start_new_session), so the group id is the pid.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


# A process that forks ``argv[1]`` children, each blocked reading a pipe whose only
# write end it keeps. When its stdin closes or it gets SIGTERM it closes that end, the
# children read EOF and exit, and it reaps them all; if it is killed outright, the
# children still read EOF and exit (their new parent reaps them).
_IDLE_SPAWNER = """
import os, signal, sys
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
r, w = os.pipe()
pids = []
try:
    for _ in range(int(sys.argv[1])):
        pid = os.fork()
        if pid == 0:
            try:
                os.close(w)
                os.read(r, 1)
            finally:
                os._exit(0)
        pids.append(pid)
    os.close(r)
    sys.stdout.write("ready\\n")
    sys.stdout.flush()
    sys.stdin.read()
finally:
    os.close(w)
    for pid in pids:
        os.waitpid(pid, 0)
"""


@contextlib.contextmanager
def idle_processes(guard: ProcessGuard, count: int, timeout_s: float = 60.0) -> Iterator[int]:
    """``count`` extra idle processes on the host (no GPU memory, no CPU) while inside.

    They are forked by one spawner registered with ``guard``, and are all gone when the
    block ends, whatever happens (``guard.stop`` ends the spawner's group, the children
    included). Yields the spawner's pid.
    """
    proc = guard.popen(
        [PY, "-S", "-c", _IDLE_SPAWNER, str(count)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        if proc.stdout is None:
            raise RuntimeError("the spawner has no stdout pipe")
        ready = select.select([proc.stdout], [], [], timeout_s)[0]
        if not ready or proc.stdout.readline().strip() != b"ready":
            raise RuntimeError(f"the spawner of {count} idle processes did not get ready")
        yield proc.pid
    finally:
        with contextlib.suppress(OSError):
            if proc.stdin is not None:
                proc.stdin.close()  # the spawner ends its children and reaps them
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=timeout_s)
        guard.stop(proc)
        if proc.stdout is not None:
            proc.stdout.close()


@dataclass
class Ctx:
    """What every benchmark gets: the mode, a scratch folder, the process guard, a logger."""

    quick: bool
    work: Path
    guard: ProcessGuard
    log: Callable[[str], None]
    shared: dict[str, Any] = field(default_factory=dict)

    def folder(self, name: str) -> Path:
        """A fresh sub-folder of the scratch folder."""
        path = self.work / name
        path.mkdir(parents=True, exist_ok=False)
        return path


# ---------------------------------------------------------------- fake services
def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fake_service_argv(
    vram_mib: int, port: int, load_s: float, stop_s: float, sim_dir: Path | None = None
) -> list[str]:
    """The command line of gpusm's fake model server."""
    argv = [PY, "-m", "gpusm", "sim", "service", "--vram-mib", str(vram_mib)]
    argv += ["--port", str(port), "--load-s", str(load_s), "--stop-s", str(stop_s)]
    if sim_dir is not None:
        argv += ["--sim-dir", str(sim_dir)]
    return argv


def fake_service_entry(
    vram_mib: int, priority: int, load_s: float, stop_s: float, port: int
) -> dict[str, Any]:
    """A native service entry of a gpusm config, running the fake model server."""
    return {
        "command": fake_service_argv(vram_mib, port, load_s, stop_s),
        "vram_mib": vram_mib,
        "priority": priority,
        "health": {"http": f"http://127.0.0.1:{port}/health", "timeout_s": 60},
        "stop_timeout_s": 5,
        "drain_timeout_s": 5,
    }


def write_config(folder: Path, doc: dict[str, Any]) -> Path:
    """Write ``doc`` as ``gpusm.yaml`` in ``folder``."""
    path = folder / "gpusm.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def spawn_service(
    guard: ProcessGuard, argv: Sequence[str], log: Path | None = None
) -> subprocess.Popen[bytes]:
    """Start a fake service outside gpusm (its output to ``log`` if given)."""
    if log is None:
        return guard.popen(argv)
    with log.open("ab") as out:
        return guard.popen(argv, stdout=out, stderr=subprocess.STDOUT)


def wait_http_ok(
    client: httpx.Client,
    url: str,
    *,
    poll_s: float,
    timeout_s: float,
    alive: Callable[[], bool] = lambda: True,
) -> float:
    """Poll ``url`` every ``poll_s`` until it answers 200; returns ``perf_counter()`` then.

    RuntimeError if it does not within ``timeout_s`` or ``alive()`` turns false.
    """
    deadline = time.perf_counter() + timeout_s
    while True:
        with contextlib.suppress(httpx.HTTPError):
            if client.get(url, timeout=2.0).status_code == 200:
                return time.perf_counter()
        if time.perf_counter() > deadline or not alive():
            raise RuntimeError(f"{url} not ready within {timeout_s}s")
        time.sleep(poll_s)


@contextlib.contextmanager
def http_client() -> Iterator[httpx.Client]:
    """An HTTP client for loopback use (no proxies from the environment)."""
    with httpx.Client(trust_env=False) as client:
        yield client
