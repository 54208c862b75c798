"""Health checks: is a service ready? By HTTP status, TCP connect, or a command's exit code.

``Health.probe`` never raises: every failure becomes a ``HealthResult`` whose
``reason`` a person can read ("connection refused to http://…", "status 503",
"exit 1: <stderr tail>", "timed out after 2.0s").

``Health.wait_healthy`` polls on :func:`next_interval`'s schedule (the loop,
:func:`poll_until_healthy`, is shared with the in-memory fake in
:mod:`gpusm.health.memory`). Without a configured ``interval_s`` the schedule is
adaptive: probe every 1% of the time since the service started, at least every
10 ms and at most every 1 s. Readiness then is noticed, at the median, within about
half an interval plus one probe: ≤ max(25 ms, 2% of the service's own load time),
while a service that loads for minutes is probed about once a second.
"""

from __future__ import annotations

import socket
import subprocess
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

import httpx

from gpusm.clock import SystemClock
from gpusm.ports import Clock, HealthResult
from gpusm.procs import kill_tree

if TYPE_CHECKING:
    from gpusm.config import HealthConfig

__all__ = [
    "ADAPTIVE_FACTOR",
    "MAX_INTERVAL_S",
    "MIN_INTERVAL_S",
    "Health",
    "next_interval",
    "poll_until_healthy",
]

# Adaptive schedule: interval = clamp(ADAPTIVE_FACTOR * elapsed, MIN, MAX). Waiting half
# an interval on average, detection lags readiness by ~0.5% of the load time, well inside
# the 2% budget even after the rest of a switch's own costs.
ADAPTIVE_FACTOR = 0.01
# Floor: keeps probing cheap for the service and for us (a probe costs ~1 ms).
MIN_INTERVAL_S = 0.01
# Ceiling: a service is never probed less often than once a second.
MAX_INTERVAL_S = 1.0
# How much of an exec probe's stderr goes into the reason.
_STDERR_TAIL = 300


def next_interval(elapsed_s: float, configured: float | None) -> float:
    """Seconds to wait before the next probe, ``elapsed_s`` after the service started.

    ``configured`` (the service's ``health.interval_s``) wins when given.
    """
    if configured is not None:
        return configured
    return min(max(ADAPTIVE_FACTOR * max(elapsed_s, 0.0), MIN_INTERVAL_S), MAX_INTERVAL_S)


def poll_until_healthy(
    probe: Callable[[HealthConfig, float], HealthResult],
    clock: Clock,
    health: HealthConfig,
    deadline_s: float,
    still_alive: Callable[[], bool] = lambda: True,
    started_at: float | None = None,
) -> HealthResult:
    """The wait every health checker shares, whatever its ``probe(health, timeout_s)`` asks.

    Before each probe: a dead process ends the wait ("process exited before becoming
    healthy"), and so does a passed deadline ("not healthy after …", no probe made).
    Each probe is bounded by the probe timeout and by what is left of the deadline;
    between probes the clock sleeps :func:`next_interval`, never past the deadline.
    """
    began = clock.monotonic()
    start = began if started_at is None else started_at
    probes = 0
    last = "no probe made"

    def verdict(ok: bool, reason: str) -> HealthResult:
        elapsed = clock.monotonic() - began
        return HealthResult(ok=ok, reason=reason, probes=probes, elapsed_s=elapsed)

    while True:
        if not still_alive():
            return verdict(False, f"process exited before becoming healthy ({last})")
        now = clock.monotonic()
        remaining = deadline_s - now
        if remaining <= 0:
            return verdict(False, f"not healthy after {now - start:.1f}s: {last}")
        result = probe(health, min(health.probe_timeout_s, remaining))
        probes += 1
        if result.ok:
            return verdict(True, "")
        last = result.reason
        pause = next_interval(clock.monotonic() - start, health.interval_s)
        clock.sleep(min(pause, max(0.0, deadline_s - clock.monotonic())))


class Health:
    """Implements :class:`gpusm.ports.HealthCheck` with one reused HTTP client."""

    def __init__(self, clock: Clock | None = None) -> None:
        self.clock: Clock = clock or SystemClock()
        # Made on first use: building one loads the CA bundle (~30 ms), which a
        # coordinator with only tcp/exec checks, or a recovery with nothing to probe,
        # never needs.
        self._client: httpx.Client | None = None
        self._client_lock = threading.Lock()
        self._closed = False

    def probe(self, health: HealthConfig, timeout_s: float | None = None) -> HealthResult:
        """One probe, bounded by ``timeout_s`` (default: ``health.probe_timeout_s``)."""
        timeout = health.probe_timeout_s if timeout_s is None else timeout_s
        began = self.clock.monotonic()
        if health.http is not None:
            ok, reason = self._http(health.http, health.expect_status, timeout)
        elif health.tcp is not None:
            ok, reason = _tcp(health.tcp, timeout)
        else:
            assert health.exec is not None  # the config allows exactly one kind
            ok, reason = _exec(health.exec, timeout)
        return HealthResult(ok=ok, reason=reason, elapsed_s=self.clock.monotonic() - began)

    def wait_healthy(
        self,
        health: HealthConfig,
        deadline_s: float,
        still_alive: Callable[[], bool] = lambda: True,
        started_at: float | None = None,
    ) -> HealthResult:
        """Probe until ok, until ``deadline_s`` (monotonic) passes, or until the process dies.

        ``started_at`` (monotonic) is when the service was launched; the adaptive
        schedule grows with the time since then.
        """
        return poll_until_healthy(
            self.probe, self.clock, health, deadline_s, still_alive, started_at
        )

    def close(self) -> None:
        """Close the HTTP client; idempotent."""
        with self._client_lock:
            self._closed = True
            if self._client is not None:
                self._client.close()

    def __enter__(self) -> Health:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _http_client(self) -> httpx.Client | None:
        with self._client_lock:
            if self._client is None and not self._closed:
                # trust_env=False: a proxy from the environment must not sit between us
                # and a service on 127.0.0.1.
                self._client = httpx.Client(trust_env=False, follow_redirects=False)
            return None if self._closed else self._client

    def _http(self, url: str, expect: int, timeout: float) -> tuple[bool, str]:
        client = self._http_client()
        if client is None:
            return False, "the health checker is closed"
        try:
            response = client.get(url, timeout=timeout)
        except httpx.TimeoutException:
            return False, f"timed out after {timeout:.1f}s waiting for {url}"
        except httpx.ConnectError as exc:
            return False, f"{_connect_problem(exc)} to {url}"
        except httpx.HTTPError as exc:
            return False, f"HTTP error from {url}: {exc or type(exc).__name__}"
        if response.status_code != expect:
            return False, f"status {response.status_code} from {url} (expected {expect})"
        return True, ""


def _connect_problem(exc: BaseException) -> str:
    text = str(exc).lower()
    if "refused" in text:
        return "connection refused"
    if "name or service" in text or "nodename" in text or "resolve" in text:
        return "cannot resolve host"
    return f"cannot connect ({exc})"


def _tcp(target: str, timeout: float) -> tuple[bool, str]:
    host, _, port = target.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return True, ""
    except TimeoutError:
        return False, f"timed out after {timeout:.1f}s connecting to {target}"
    except ConnectionRefusedError:
        return False, f"connection refused to {target}"
    except OSError as exc:
        return False, f"cannot connect to {target}: {exc.strerror or exc}"


def _exec(argv: list[str], timeout: float) -> tuple[bool, str]:
    try:
        # Own session, so that a probe that times out is killed with its children.
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
    except OSError as exc:
        return False, f"cannot run {argv[0]!r}: {exc.strerror or exc}"
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        try:
            proc.communicate(timeout=1.0)
        except subprocess.TimeoutExpired:
            # A descendant that escaped the kill still holds stderr; stop reading it.
            if proc.stderr is not None:
                proc.stderr.close()
            proc.wait(timeout=1.0)
        return False, f"timed out after {timeout:.1f}s running {argv[0]!r}"
    if proc.returncode == 0:
        return True, ""
    tail = err.decode(errors="replace").strip()[-_STDERR_TAIL:]
    return False, f"exit {proc.returncode}" + (f": {tail}" if tail else "")
