"""The behaviour every HealthCheck promises; each implementation's test class supplies endpoints.

Use it by subclassing in a ``test_*.py`` module next to this one::

    from tests.contracts.health_contract import Endpoint, HealthContract

    class TestMyHealthContract(HealthContract):
        def make_checker(self): ...           # a fresh checker, with a ``clock``
        def endpoint(self, checker): ...      # answers, not ok, until ``heal()``
        def hanging(self, checker): ...       # never answers within a probe timeout
        def answering(self, checker, status): ...   # HTTP only: answers ``status``

Time is read from ``checker.clock``, so a fake on a manual clock runs the same tests
without sleeping; ``slack_s`` is how far past a bound real sockets and processes may
run. Whatever a factory starts is stopped through ``self.cleanup`` at teardown.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import pytest

from gpusm.config import HealthConfig
from gpusm.ports import Clock, HealthResult

__all__ = ["Checker", "Endpoint", "HealthContract"]


class Checker(Protocol):
    """A :class:`gpusm.ports.HealthCheck` with the clock it keeps time by."""

    clock: Clock

    def probe(self, health: HealthConfig, timeout_s: float | None = None) -> HealthResult: ...

    def wait_healthy(
        self,
        health: HealthConfig,
        deadline_s: float,
        still_alive: Callable[[], bool] = ...,
        started_at: float | None = None,
    ) -> HealthResult: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Endpoint:
    """A check whose endpoint answers, but not ok, until ``heal()`` makes it answer ok."""

    health: HealthConfig
    heal: Callable[[], None]

    def with_(self, **changes: Any) -> HealthConfig:
        """The check with some settings changed (``interval_s``, ``probe_timeout_s``…)."""
        return self.health.model_copy(update=changes)


def after_calls(n: int, then: Callable[[], object] | None = None) -> Callable[[], bool]:
    """A ``still_alive`` that says True ``n`` times; on the next call it runs ``then``
    (and stays alive) if given, else says False from then on."""
    calls = 0

    def still_alive() -> bool:
        nonlocal calls
        calls += 1
        if calls <= n:
            return True
        if then is None:
            return False
        then()
        return True

    return still_alive


class HealthContract(abc.ABC):
    """Abstract test case; a subclass supplies the checker and its endpoints."""

    #: How far past a timeout or deadline a probe or a wait may return.
    slack_s: ClassVar[float] = 1.0

    cleanup: contextlib.ExitStack

    # ---------------------------------------------------------------- hooks
    @abc.abstractmethod
    def make_checker(self) -> Checker:
        """A fresh checker."""

    @abc.abstractmethod
    def endpoint(self, checker: Checker) -> Endpoint:
        """An endpoint that answers with a failure until healed."""

    @abc.abstractmethod
    def hanging(self, checker: Checker) -> HealthConfig:
        """An endpoint that does not answer within any probe timeout a test sets."""

    def answering(self, checker: Checker, status: int) -> HealthConfig:
        """An HTTP endpoint answering ``status``; checks without a status skip."""
        pytest.skip("only HTTP checks have a status")

    # ---------------------------------------------------------------- fixtures
    @pytest.fixture(autouse=True)
    def _cleanup(self) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            self.cleanup = stack
            yield

    @pytest.fixture
    def checker(self) -> Iterator[Checker]:
        checker = self.make_checker()
        yield checker
        checker.close()

    def within(self, checker: Checker, began: float, bound_s: float) -> None:
        """Assert that no more than ``bound_s`` (plus the slack) passed since ``began``."""
        elapsed = checker.clock.monotonic() - began
        assert elapsed <= bound_s + self.slack_s + 1e-6, f"took {elapsed:.2f}s"

    # ---------------------------------------------------------------- probe
    def test_an_ok_endpoint_gives_an_ok_verdict(self, checker: Checker) -> None:
        ep = self.endpoint(checker)
        ep.heal()
        result = checker.probe(ep.health)
        assert (result.ok, result.reason, result.probes) == (True, "", 1)
        assert result.elapsed_s >= 0

    def test_a_failing_endpoint_gives_a_readable_reason_not_an_exception(
        self, checker: Checker
    ) -> None:
        result = checker.probe(self.endpoint(checker).health)
        assert not result.ok
        assert result.reason.strip()
        assert result.reason.isprintable()
        assert len(result.reason) < 500
        assert "Traceback" not in result.reason

    def test_a_healed_endpoint_passes_the_next_probe(self, checker: Checker) -> None:
        ep = self.endpoint(checker)
        assert not checker.probe(ep.health).ok
        ep.heal()
        assert checker.probe(ep.health).ok

    def test_a_probe_is_bounded_by_the_probe_timeout(self, checker: Checker) -> None:
        health = self.hanging(checker).model_copy(update={"probe_timeout_s": 0.3})
        began = checker.clock.monotonic()
        result = checker.probe(health)
        assert not result.ok
        assert result.reason.startswith("timed out after 0.3s"), result.reason
        assert checker.clock.monotonic() - began >= 0.3 - 0.05
        self.within(checker, began, 0.3)

    def test_an_explicit_probe_timeout_overrides_the_configured_one(self, checker: Checker) -> None:
        health = self.hanging(checker).model_copy(update={"probe_timeout_s": 30.0})
        began = checker.clock.monotonic()
        result = checker.probe(health, 0.2)
        assert result.reason.startswith("timed out after 0.2s"), result.reason
        self.within(checker, began, 0.2)

    def test_expect_status_is_honoured(self, checker: Checker) -> None:
        health = self.answering(checker, 204)
        assert checker.probe(health.model_copy(update={"expect_status": 204})).ok
        wrong = checker.probe(health.model_copy(update={"expect_status": 200}))
        assert not wrong.ok
        assert wrong.reason.startswith("status 204"), wrong.reason
        assert "expected 200" in wrong.reason

    def test_close_is_idempotent(self, checker: Checker) -> None:
        checker.close()
        checker.close()

    # ---------------------------------------------------------------- wait_healthy
    def test_wait_returns_at_the_first_ok_probe(self, checker: Checker) -> None:
        ep = self.endpoint(checker)
        ep.heal()
        result = checker.wait_healthy(ep.health, checker.clock.monotonic() + 30)
        assert (result.ok, result.probes) == (True, 1)

    def test_wait_keeps_probing_until_the_endpoint_turns_ok(self, checker: Checker) -> None:
        ep = self.endpoint(checker)
        health = ep.with_(interval_s=0.05)
        # still_alive is asked before each probe: the third probe finds the endpoint healed.
        result = checker.wait_healthy(
            health, checker.clock.monotonic() + 30, after_calls(2, ep.heal)
        )
        assert (result.ok, result.reason, result.probes) == (True, "", 3)

    def test_wait_stops_at_the_deadline_with_the_last_reason(self, checker: Checker) -> None:
        ep = self.endpoint(checker)
        health = ep.with_(interval_s=0.1)
        last = checker.probe(health).reason
        began = checker.clock.monotonic()
        deadline = began + 0.5
        result = checker.wait_healthy(health, deadline)
        assert not result.ok
        assert result.reason.startswith("not healthy after "), result.reason
        assert result.reason.endswith(f": {last}")
        assert result.probes >= 2
        assert checker.clock.monotonic() >= deadline
        self.within(checker, began, 0.5)

    def test_wait_stops_at_the_deadline_even_while_a_probe_hangs(self, checker: Checker) -> None:
        health = self.hanging(checker).model_copy(update={"probe_timeout_s": 30.0})
        began = checker.clock.monotonic()
        result = checker.wait_healthy(health, began + 0.4)
        assert not result.ok
        assert result.reason.startswith("not healthy after"), result.reason
        assert "timed out after 0.4s" in result.reason
        self.within(checker, began, 0.4)

    def test_wait_with_a_passed_deadline_makes_no_probe(self, checker: Checker) -> None:
        ep = self.endpoint(checker)
        ep.heal()
        result = checker.wait_healthy(ep.health, checker.clock.monotonic() - 1)
        assert (result.ok, result.probes) == (False, 0)
        assert result.reason.endswith("no probe made")

    def test_wait_stops_early_when_the_process_dies(self, checker: Checker) -> None:
        ep = self.endpoint(checker)
        health = ep.with_(interval_s=0.05)
        last = checker.probe(health).reason
        began = checker.clock.monotonic()
        result = checker.wait_healthy(health, began + 60, after_calls(2))
        assert not result.ok
        assert result.reason == f"process exited before becoming healthy ({last})"
        assert result.probes == 2
        self.within(checker, began, 0.1)

    def test_wait_on_a_dead_process_makes_no_probe(self, checker: Checker) -> None:
        ep = self.endpoint(checker)
        ep.heal()
        result = checker.wait_healthy(ep.health, checker.clock.monotonic() + 60, lambda: False)
        assert (result.ok, result.probes) == (False, 0)
        assert result.reason == "process exited before becoming healthy (no probe made)"

    def test_wait_reports_its_probes_and_elapsed_time(self, checker: Checker) -> None:
        ep = self.endpoint(checker)
        health = ep.with_(interval_s=0.1)
        began = checker.clock.monotonic()
        result = checker.wait_healthy(health, began + 30, after_calls(3, ep.heal))
        assert (result.ok, result.probes) == (True, 4)
        assert result.elapsed_s >= 0.3 - 1e-6  # three pauses of interval_s
        self.within(checker, began, 0.3)
