"""Prometheus metrics: gauges from status, counters and histograms folded from the event log."""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gpusm.api.metrics import METRIC_NAMES, Metrics
from gpusm.api.threaded import ThreadedServer
from gpusm.domain.events import RecordedEvent
from gpusm.errors import SimOutOfMemory
from gpusm.gpu.sim import SimGpu
from tests.api.api_helpers import TOKEN, seed_config, write_config

Serve = Callable[..., ThreadedServer]
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str) -> tuple[set[str], Samples]:
    response = httpx.get(f"{url}/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    families = list(text_string_to_metric_families(response.text))
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value for f in families for s in f.samples
    }
    return {f.name for f in families}, samples


def value(samples: Samples, metric: str, **labels: str) -> float:
    return samples.get((metric, tuple(sorted(labels.items()))), 0.0)


def test_metrics_follow_a_phase_switch_with_an_eviction(serve: Serve, tmp_path: Path) -> None:
    server = serve(write_config(tmp_path, seed_config(tmp_path, pipeline=[])))
    auth = {"Authorization": f"Bearer {TOKEN}"}
    names, samples = scrape(server.url)
    assert {n.removesuffix("_total") for n in names} >= set(METRIC_NAMES) - {
        "gpusm_transitions",
        "gpusm_evictions",
        "gpusm_preemptions",
        "gpusm_refused_requests",
    }
    assert value(samples, "gpusm_recovered") == 1.0
    assert value(samples, "gpusm_ooms_total") == 0.0
    assert value(
        samples, "gpusm_device_vram_total_bytes", device="0", name="gpusm simulated GPU"
    ) == (24576 * 2**20)
    with httpx.Client(base_url=server.url, headers=auth, timeout=60) as http:
        # vidi and cosyvoice stay warm when released; comfyui needs vidi's room at least.
        http.post("/gpu/phase", json={"phase": "analysis", "client": "a"}).raise_for_status()
        http.post("/gpu/phase", json={"phase": "tts", "client": "a"}).raise_for_status()
        http.post("/gpu/release", json={"client": "a"}).raise_for_status()
        http.post("/gpu/phase", json={"phase": "video", "client": "b"}).raise_for_status()
    _, samples = scrape(server.url)
    assert value(samples, "gpusm_service_state", service="comfyui", state="healthy") == 1.0
    assert value(samples, "gpusm_service_state", service="comfyui", state="stopped") == 0.0
    assert value(samples, "gpusm_service_state", service="vidi", state="stopped") == 1.0
    assert value(samples, "gpusm_service_reservation_bytes", service="comfyui") == 20480 * 2**20
    assert value(samples, "gpusm_service_vram_used_bytes", service="comfyui") == 20480 * 2**20
    assert value(samples, "gpusm_evictions_total", service="vidi") == 1.0
    assert value(samples, "gpusm_transitions_total", type="StartRequested") == 3.0
    assert value(samples, "gpusm_transitions_total", type="Stopped") >= 1.0
    assert value(samples, "gpusm_time_to_healthy_seconds_count", service="comfyui") == 1.0
    assert value(samples, "gpusm_time_to_healthy_seconds_sum", service="comfyui") > 0.3
    assert value(samples, "gpusm_stop_seconds_count", service="vidi") == 1.0
    assert value(samples, "gpusm_reclaim_seconds_count", service="vidi") == 1.0
    assert value(samples, "gpusm_phase_switch_seconds_count", phase="video") == 1.0
    # A second scrape folds nothing twice.
    _, again = scrape(server.url)
    assert value(again, "gpusm_transitions_total", type="StartRequested") == 3.0


def test_ooms_on_the_simulated_gpu_are_counted(live: ThreadedServer, tmp_path: Path) -> None:
    sim = SimGpu(tmp_path / "state" / "simgpu")
    with pytest.raises(SimOutOfMemory):
        sim.allocate(10**6, pid=os.getpid())
    _, samples = scrape(live.url)
    assert value(samples, "gpusm_ooms_total") == 1.0


def test_fold_counts_preemptions_and_ignores_odd_data() -> None:
    metrics = Metrics(lambda: None)
    at = datetime(2026, 1, 1, tzinfo=UTC)
    metrics.fold(
        [
            RecordedEvent("tts", 3, "Preempted", at, "healthy", "draining", {}, seq=5),
            RecordedEvent("tts", 4, "Stopped", at, "draining", "stopped", {"stop_s": True}, seq=6),
            RecordedEvent("coordinator", 1, "PhaseEntered", at, None, None, {}, seq=7),
            RecordedEvent("coordinator", 2, "LeaseRevoked", at, None, None, {}, seq=8),
            RecordedEvent("coordinator", 3, "LeaseExpired", at, None, None, {}, seq=9),
            RecordedEvent("coordinator", 4, "LeaseExpired", at, None, None, {}, seq=10),
        ]
    )
    metrics.catch_up()  # no coordinator: nothing to read, nothing breaks
    text = metrics.render().decode()
    assert 'gpusm_preemptions_total{service="tts"} 1.0' in text
    assert 'gpusm_transitions_total{type="Stopped"} 1.0' in text
    assert "gpusm_stop_seconds_count" not in text
    assert "PhaseEntered" not in text
    assert 'gpusm_leases_ended_total{how="revoked"} 1.0' in text
    assert 'gpusm_leases_ended_total{how="expired"} 2.0' in text
