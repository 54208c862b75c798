"""A worker rides out ``kill -9`` of the daemon: real processes, real HTTP on 127.0.0.1.

A worker thread loops ``enter_phase`` over the pipeline with a :class:`gpusm.Client`
while the test kills the daemon (SIGKILL, mostly while a phase switch is in flight) and
starts a new one on the same state directory and port a moment later. No error may
reach the worker, and every phase result must name the phase's services: the new daemon
recovered them (adopted, or started again) and the repeated request got a true answer.
"""

from __future__ import annotations

import random
import threading
import time
from functools import partial
from pathlib import Path

import httpx
import pytest

from gpusm.client import Client, daemon_url
from gpusm.results import PhaseResult
from tests.api.api_helpers import TOKEN, seed_config, write_config
from tests.api.daemon_proc import Daemon
from tests.support import eventually

PIPELINE = ["crawl", "analysis", "tts", "video", "render"]
NEEDS = {"crawl": set(), "analysis": {"vidi"}, "tts": {"cosyvoice"}, "video": {"comfyui"}}
STARTS_SERVICES = {phase for phase, needs in NEEDS.items() if needs}
KILLS = 3
MAX_WAIT_S = 20.0


class WatchedTransport(httpx.HTTPTransport):
    """httpx's own transport, noting each connection failure it passes to the client."""

    def __init__(self) -> None:
        super().__init__()
        self.failures: list[str] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        try:
            return super().handle_request(request)
        except httpx.TransportError as exc:
            self.failures.append(type(exc).__name__)
            raise


class Worker(threading.Thread):
    """Enters the pipeline's phases in turn until told to stop; keeps every outcome."""

    def __init__(self, url: str) -> None:
        super().__init__(name="pipeline-worker", daemon=True)
        self.url = url
        self.transport = WatchedTransport()
        self.results: list[PhaseResult] = []
        self.errors: list[BaseException] = []
        self.switching = threading.Event()  # set while a phase that starts a service is asked
        self.done = threading.Event()

    def run(self) -> None:
        with Client(
            self.url, token=TOKEN, max_wait_s=MAX_WAIT_S, transport=self.transport
        ) as client:
            for turn in range(10_000):
                if self.done.is_set():
                    return
                phase = PIPELINE[turn % len(PIPELINE)]
                if phase in STARTS_SERVICES:
                    self.switching.set()
                try:
                    self.results.append(client.enter_phase(phase, client="worker", timeout=30))
                except BaseException as exc:  # reported by the test
                    self.errors.append(exc)
                    return
                finally:
                    self.switching.clear()

    def progressed(self, since: int, phases: int) -> bool:
        if self.errors or not self.is_alive():
            raise AssertionError(f"the worker stopped: {self.errors!r}")
        return len(self.results) >= since + phases


class KillableDaemon(Daemon):
    """A ``gpusm serve`` child that can also be killed outright."""

    def kill_9(self, n: int) -> None:
        """SIGKILL: no shutdown at all; the services it started keep running."""
        self.proc.kill()
        self.proc.wait(10)
        self._out.close()
        self.log.rename(self.log.with_name(f"serve-killed-{n}.log"))


@pytest.fixture
def config(tmp_path: Path) -> tuple[Path, str]:
    doc = seed_config(tmp_path)
    return write_config(tmp_path, doc), daemon_url(doc["api"]["listen"])


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_worker_sees_no_error_while_the_daemon_is_killed_and_restarted(
    config: tuple[Path, str],
) -> None:
    path, url = config
    rng = random.Random(7)
    daemon = KillableDaemon(path, url, TOKEN)
    worker = Worker(url)
    restarts: list[float] = []
    try:
        daemon.wait_ready()
        worker.start()
        for n in range(KILLS):
            since = len(worker.results)
            eventually(partial(worker.progressed, since, 2), 30, "the worker to progress")
            # Mostly mid-request: while a phase that starts a service is being entered.
            assert worker.switching.wait(30), "the worker never switched phases"
            time.sleep(rng.uniform(0.0, 0.15))
            killed_at = time.monotonic()
            daemon.kill_9(n)
            time.sleep(rng.uniform(0.3, 1.5))
            daemon = KillableDaemon(path, url, TOKEN)  # same config: state dir and port
            daemon.wait_ready(timeout=MAX_WAIT_S)
            restarts.append(time.monotonic() - killed_at)
        since = len(worker.results)
        eventually(partial(worker.progressed, since, len(PIPELINE)), 60, "a last round")
    finally:
        worker.done.set()
        worker.join(60)
        daemon.stop()  # and every service the daemons left
    assert not worker.is_alive()
    assert worker.errors == []
    assert len(restarts) == KILLS
    assert max(restarts) < MAX_WAIT_S, restarts
    # The kills reached the worker mid-request (dropped connections, then refused ones while
    # no daemon listened) and it rode them out.
    assert {"RemoteProtocolError", "ReadError"} & set(worker.transport.failures), restarts
    for result in worker.results:
        named = set(result.started) | set(result.kept)
        assert NEEDS.get(result.phase, set()) <= named, result
        assert result.client == "worker"
    assert {r.phase for r in worker.results} == set(PIPELINE)
    print(
        f"\nrestarts {[round(r, 2) for r in restarts]} s; failures seen and ridden out: "
        f"{worker.transport.failures}; {len(worker.results)} phase results"
    )
