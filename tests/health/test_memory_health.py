"""The in-memory health fake's own knobs: names, listeners, loading, latency, shared verdicts.

What it promises as a HealthCheck is pinned by tests/contracts/test_health_contract.py.
"""

from __future__ import annotations

import pytest

from gpusm.clock import ManualClock
from gpusm.config import HealthConfig
from gpusm.health import MemoryHealth

URL = "http://127.0.0.1:8188/health"
CHECKS = {
    "comfy": HealthConfig(http=URL),
    "tts": HealthConfig(tcp="127.0.0.1:9000"),
    "vidi": HealthConfig(exec=["curl", "-sf", "http://127.0.0.1:7/ready"]),
}


@pytest.fixture
def fake(manual_clock: ManualClock) -> MemoryHealth:
    return MemoryHealth(manual_clock, CHECKS)


def test_an_endpoint_is_named_by_its_service_else_by_its_target(fake: MemoryHealth) -> None:
    assert [fake.endpoint(h) for h in CHECKS.values()] == ["comfy", "tts", "vidi"]
    assert fake.endpoint(HealthConfig(tcp="10.0.0.1:1")) == "10.0.0.1:1"
    assert fake.endpoint(HealthConfig(exec=["true", "-x"])) == "true -x"


def test_every_endpoint_answers_ok_until_told_otherwise(fake: MemoryHealth) -> None:
    assert all(fake.probe(h).ok for h in CHECKS.values())
    fake.failing["tts"] = "model not loaded"
    assert fake.probe(CHECKS["tts"]).reason == "model not loaded"
    assert fake.probe(CHECKS["comfy"]).ok
    del fake.failing["tts"]
    assert fake.probe(CHECKS["tts"]).ok


def test_probes_are_counted_per_endpoint(fake: MemoryHealth) -> None:
    fake.probe(CHECKS["comfy"])
    fake.probe(CHECKS["comfy"])
    fake.probe(CHECKS["tts"])
    assert fake.probes == {"comfy": 2, "tts": 1}


def test_nothing_listening_is_a_refused_connection(manual_clock: ManualClock) -> None:
    up: dict[str, str] = {}
    fake = MemoryHealth(manual_clock, CHECKS, listening=up.get)
    assert fake.probe(CHECKS["comfy"]).reason == f"connection refused to {URL}"
    up["comfy"] = "i1"
    assert fake.probe(CHECKS["comfy"]).ok


def test_each_new_instance_loads_for_its_first_probes(manual_clock: ManualClock) -> None:
    up = {"comfy": "i1"}
    fake = MemoryHealth(manual_clock, CHECKS, listening=up.get, ready_after={"comfy": 2})
    verdicts = [fake.probe(CHECKS["comfy"]) for _ in range(3)]
    assert [v.ok for v in verdicts] == [False, False, True]
    assert verdicts[0].reason == "comfy is still loading"
    up["comfy"] = "i2"  # restarted: loads again
    assert [fake.probe(CHECKS["comfy"]).ok for _ in range(3)] == [False, False, True]


def test_a_refused_probe_does_not_count_towards_loading(manual_clock: ManualClock) -> None:
    up: dict[str, str] = {}
    fake = MemoryHealth(manual_clock, CHECKS, listening=up.get, ready_after={"comfy": 1})
    assert not fake.probe(CHECKS["comfy"]).ok
    up["comfy"] = "i1"
    assert fake.probe(CHECKS["comfy"]).reason == "comfy is still loading"
    assert fake.probe(CHECKS["comfy"]).ok


def test_a_slow_answer_takes_its_latency_on_the_clock(
    fake: MemoryHealth, manual_clock: ManualClock
) -> None:
    fake.latency_s["comfy"] = 0.25
    began = manual_clock.monotonic()
    result = fake.probe(CHECKS["comfy"])
    assert result.ok
    assert result.elapsed_s == pytest.approx(0.25)
    assert manual_clock.monotonic() - began == pytest.approx(0.25)


def test_a_status_only_matters_to_http_checks(fake: MemoryHealth) -> None:
    fake.status["comfy"] = 503
    fake.status["tts"] = 503
    assert fake.probe(CHECKS["comfy"]).reason == f"status 503 from {URL} (expected 200)"
    assert fake.probe(CHECKS["tts"]).ok


def test_verdicts_passed_in_are_shared_with_whoever_passed_them(
    manual_clock: ManualClock,
) -> None:
    failing: dict[str, str] = {}
    first = MemoryHealth(manual_clock, CHECKS, failing=failing)
    second = MemoryHealth(manual_clock, CHECKS, failing=first.failing)
    failing["vidi"] = "exit 22"
    assert second.probe(CHECKS["vidi"]).reason == "exit 22"


def test_waiting_follows_the_adaptive_schedule_on_the_clock(
    fake: MemoryHealth, manual_clock: ManualClock
) -> None:
    fake.failing["comfy"] = "status 503"
    began = manual_clock.monotonic()
    result = fake.wait_healthy(CHECKS["comfy"], began + 100.0)
    assert manual_clock.monotonic() == pytest.approx(began + 100.0)
    # Every 10 ms for the first second, then 1% of the time since: 100 + 100·ln(100) ≈ 560.
    assert 500 < result.probes < 620
    assert result.reason == "not healthy after 100.0s: status 503"


def test_a_closed_fake_fails_every_probe(fake: MemoryHealth) -> None:
    with fake:
        assert fake.probe(CHECKS["comfy"]).ok
    assert fake.probe(CHECKS["comfy"]).reason == "the health checker is closed"
