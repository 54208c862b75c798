"""Standalone runs for figure 4: two services switched without gpusm, and the watchers.

:class:`HandScript` stops one fake service and starts the other either as a shell
script would (poll every second) or as tightly as possible, recording the services'
own stop time (SIGTERM to exit, by ``waitpid``) and load time (spawn to the first 200,
by a 5 ms watcher). :func:`watch` and :func:`exit_watch` observe gpusm's own switches
the same way; :func:`driver` reads simulated GPUs in the background, like a driver
freeing a dead process's memory on its own schedule.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from benchmarks.common import Ctx, fake_service_argv, free_port, spawn_service, wait_http_ok
from gpusm.gpu.sim import SimGpu

__all__ = ["HandRun", "HandScript", "Pair", "driver", "exit_watch", "watch"]

DRIVER_TICK_S = 0.02
OWN_POLL_S = 0.005
HAND_POLL_S = 1.0


@dataclass(frozen=True)
class Pair:
    """Two fake services that cannot share the simulated GPU, and how they behave."""

    vram_mib: int
    total_mib: int
    load_s: float
    stop_s: float
    lag_s: float


@contextlib.contextmanager
def driver(sims: list[SimGpu]) -> Iterator[None]:
    """Read every sim every DRIVER_TICK_S in the background, so reclaim runs on its own."""
    stop = threading.Event()

    def body() -> None:
        while not stop.wait(DRIVER_TICK_S):
            for sim in sims:
                with contextlib.suppress(Exception):
                    sim.snapshot()

    thread = threading.Thread(target=body, name="bench-driver", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)


@contextlib.contextmanager
def watch(client: httpx.Client, url: str) -> Iterator[list[float]]:
    """Poll ``url`` every 5 ms in the background; the list gets the first 200's time."""
    ready: list[float] = []
    stop = threading.Event()

    def body() -> None:
        while not stop.is_set():
            with contextlib.suppress(httpx.HTTPError):
                if client.get(url, timeout=2.0).status_code == 200:
                    ready.append(time.perf_counter())
                    return
            time.sleep(OWN_POLL_S)

    thread = threading.Thread(target=body, name="bench-watch", daemon=True)
    thread.start()
    try:
        yield ready
    finally:
        stop.set()
        thread.join(timeout=5)


@contextlib.contextmanager
def exit_watch(pid: int) -> Iterator[list[float]]:
    """Note the moment ``pid`` exits (a pidfd wakes us; nothing is reaped)."""
    fd = os.pidfd_open(pid)
    exited: list[float] = []
    stop = threading.Event()

    def body() -> None:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        while not stop.is_set():
            if poller.poll(50):
                exited.append(time.perf_counter())
                return

    thread = threading.Thread(target=body, name="bench-exit", daemon=True)
    thread.start()
    try:
        yield exited
    finally:
        stop.set()
        thread.join(timeout=5)
        os.close(fd)


@dataclass
class HandRun:
    """One hand-scripted switch and the standalone times observed during it."""

    wall_s: float
    own_stop_s: float
    own_load_s: float
    by_hand: bool


class HandScript:
    """The by-hand baseline: SIGTERM, poll the GPU each second, start, poll health each second."""

    def __init__(self, ctx: Ctx, folder: Path, pair: Pair) -> None:
        self.ctx = ctx
        self.pair = pair
        self.sim_dir = folder / "hand-sim"
        self.sim = SimGpu(self.sim_dir, pair.total_mib, pair.lag_s)
        self.ports = {"a": free_port(), "b": free_port()}
        self.log = folder / "hand.log"
        self.current: tuple[str, subprocess.Popen[bytes]] | None = None

    def argv(self, name: str) -> list[str]:
        """The command line of service ``name`` (a or b)."""
        p = self.pair
        return fake_service_argv(p.vram_mib, self.ports[name], p.load_s, p.stop_s, self.sim_dir)

    def url(self, name: str) -> str:
        """The health URL of service ``name``."""
        return f"http://127.0.0.1:{self.ports[name]}/health"

    def spawn(self, name: str) -> subprocess.Popen[bytes]:
        """Start service ``name``; it becomes the current one."""
        proc = spawn_service(self.ctx.guard, self.argv(name), self.log)
        self.current = (name, proc)
        return proc

    def switch(self, client: httpx.Client, by_hand: bool) -> HandRun:
        """Stop the current service and start the other one without gpusm.

        ``by_hand``: as a shell script would (poll the GPU, then health, every second);
        else as tightly as possible (wait for the exit, poll every 5 ms), which is the
        services' own time. Both record the own stop and load times they observe.
        """
        assert self.current is not None
        old_name, old = self.current
        new_name = "b" if old_name == "a" else "a"
        poll = HAND_POLL_S if by_hand else OWN_POLL_S
        exited: list[float] = []
        began = time.perf_counter()
        old.send_signal(signal.SIGTERM)

        def wait_exit() -> None:
            old.wait()
            exited.append(time.perf_counter())

        waiter = threading.Thread(target=wait_exit)
        waiter.start()
        if not by_hand:
            waiter.join(timeout=30)
        while self.sim.snapshot().free_mib < self.pair.vram_mib:
            time.sleep(poll)
        spawned = time.perf_counter()
        proc = self.spawn(new_name)
        alive = lambda: proc.poll() is None  # noqa: E731
        # The service's own load time: the same process, watched every 5 ms.
        with watch(client, self.url(new_name)) as ready:
            wait_http_ok(client, self.url(new_name), poll_s=poll, timeout_s=120, alive=alive)
            done = time.perf_counter()
            deadline = done + 5
            while not ready and time.perf_counter() < deadline:
                time.sleep(OWN_POLL_S)
        waiter.join(timeout=30)
        self.ctx.guard.stop(old)
        if not ready or not exited:
            raise RuntimeError("the standalone timings were not observed")
        return HandRun(done - began, exited[0] - began, ready[0] - spawned, by_hand)
