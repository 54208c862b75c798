"""An in-memory HealthCheck: verdicts a test sets per endpoint, on any Clock.

Nothing is contacted. Each endpoint has a name: the service's name when the fake is
given ``services`` (service name -> its ``HealthConfig``), else the check's target (the
http URL, the tcp ``host:port``, or the exec command joined by spaces). What an
endpoint answers is set per name in plain dicts, which may be passed in so that two
fakes (a coordinator's, and the one recovered after it crashed) share them:

- ``failing[name] = reason``: every probe fails with ``reason``.
- ``ready_after[name] = n``: each new instance fails its first ``n`` probes
  ("<name> is still loading").
- ``status[name] = code``: the HTTP status an http endpoint answers (200 if unset);
  one other than the check's ``expect_status`` fails, as the real checker says it.
- ``latency_s[name] = s``: a probe takes ``s`` seconds of clock time; one whose
  timeout is shorter gives up at its timeout ("timed out after …").

``listening`` (optional) says who listens at an endpoint: name -> the id of the live
instance, or None when nothing does ("connection refused to …"). Without it every
endpoint listens, as one instance. ``probes`` counts the probes each name got.

``wait_healthy`` is the real checker's loop (:func:`gpusm.health.checks.poll_until_healthy`):
the same schedule, deadline and ``still_alive`` rules. Time passes only through the
clock, so on a :class:`~gpusm.clock.ManualClock` nothing ever sleeps.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from gpusm.clock import SystemClock
from gpusm.health.checks import poll_until_healthy
from gpusm.ports import Clock, HealthResult

if TYPE_CHECKING:
    from gpusm.config import HealthConfig

__all__ = ["MemoryHealth"]


class MemoryHealth:
    """Implements :class:`gpusm.ports.HealthCheck` from verdicts set in memory."""

    def __init__(
        self,
        clock: Clock | None = None,
        services: Mapping[str, HealthConfig] | None = None,
        *,
        listening: Callable[[str], str | None] | None = None,
        failing: dict[str, str] | None = None,
        ready_after: dict[str, int] | None = None,
        status: dict[str, int] | None = None,
        latency_s: dict[str, float] | None = None,
    ) -> None:
        self.clock: Clock = clock or SystemClock()
        self.listening = listening
        self.failing: dict[str, str] = {} if failing is None else failing
        self.ready_after: dict[str, int] = {} if ready_after is None else ready_after
        self.status: dict[str, int] = {} if status is None else status
        self.latency_s: dict[str, float] = {} if latency_s is None else latency_s
        self.probes: Counter[str] = Counter()
        self._names = {_target(h): name for name, h in (services or {}).items()}
        # Probes each (endpoint, instance) answered, for ``ready_after``.
        self._answered: Counter[tuple[str, str]] = Counter()
        self._lock = threading.Lock()
        self._closed = False

    def endpoint(self, health: HealthConfig) -> str:
        """The name under which ``health``'s endpoint is set and counted."""
        target = _target(health)
        return self._names.get(target, target)

    def probe(self, health: HealthConfig, timeout_s: float | None = None) -> HealthResult:
        """One probe, bounded by ``timeout_s`` (default: ``health.probe_timeout_s``)."""
        timeout = health.probe_timeout_s if timeout_s is None else timeout_s
        began = self.clock.monotonic()
        ok, reason = self._answer(health, timeout)
        return HealthResult(ok=ok, reason=reason, elapsed_s=self.clock.monotonic() - began)

    def wait_healthy(
        self,
        health: HealthConfig,
        deadline_s: float,
        still_alive: Callable[[], bool] = lambda: True,
        started_at: float | None = None,
    ) -> HealthResult:
        """Probe until ok, until ``deadline_s`` (monotonic) passes, or until the process dies."""
        return poll_until_healthy(
            self.probe, self.clock, health, deadline_s, still_alive, started_at
        )

    def close(self) -> None:
        """Later probes fail as the real checker's do once closed; idempotent."""
        self._closed = True

    def __enter__(self) -> MemoryHealth:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _answer(self, health: HealthConfig, timeout: float) -> tuple[bool, str]:
        if self._closed:
            return False, "the health checker is closed"
        name = self.endpoint(health)
        target = _target(health)
        with self._lock:
            self.probes[name] += 1
        instance = self.listening(name) if self.listening is not None else name
        if instance is None:
            return False, f"connection refused to {target}"
        delay = self.latency_s.get(name, 0.0)
        if delay > timeout:
            # The probe gives up at its timeout, as a real one would.
            self.clock.sleep(timeout)
            return False, f"timed out after {timeout:.1f}s waiting for {target}"
        self.clock.sleep(delay)
        with self._lock:
            self._answered[name, instance] += 1
            loading = self._answered[name, instance] <= self.ready_after.get(name, 0)
        if loading:
            return False, f"{name} is still loading"
        if name in self.failing:
            return False, self.failing[name]
        code = self.status.get(name, 200)
        if health.http is not None and code != health.expect_status:
            return False, f"status {code} from {target} (expected {health.expect_status})"
        return True, ""


def _target(health: HealthConfig) -> str:
    return health.http or health.tcp or " ".join(health.exec or [])
