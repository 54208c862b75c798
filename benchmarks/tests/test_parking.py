"""Checks of figure 9's helpers (not timings): `pytest benchmarks/tests`."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from benchmarks.common import write_config
from benchmarks.parking import breakdown, pipeline_doc, share_goal_s, switch_config
from gpusm import load_config
from gpusm.domain.events import RecordedEvent


def test_share_goal_is_25_ms_or_2_percent_of_the_wake() -> None:
    assert share_goal_s(0.5) == pytest.approx(0.025)
    assert share_goal_s(5.0) == pytest.approx(0.100)


@pytest.mark.parametrize("park", [True, False])
def test_switch_configs_differ_only_in_park(tmp_path: Path, park: bool) -> None:
    config = load_config(switch_config(tmp_path, 5.0, 0.5, park))
    assert sorted(config.services) == ["a", "b"]
    for service in config.services.values():
        command = " ".join(getattr(service, "command", None) or [])
        assert "--load-s 5.0" in command
        assert "--wake-s 0.5 --residual-mib 1024" in command
        steps = service.park_steps()
        if park:
            assert steps is not None
            assert steps.preset == "vllm"
            assert steps.residual_mib == 1024
        else:
            assert steps is None


def test_pipeline_doc_parks_comfyui_and_vidi_only_with_presets(tmp_path: Path) -> None:
    on = load_config(write_config(tmp_path, pipeline_doc(tmp_path, 0.1, park=True)))
    presets = {}
    for name, service in on.services.items():
        steps = service.park_steps()
        presets[name] = None if steps is None else steps.preset
    assert presets == {"comfyui": "comfyui", "vidi": "vllm", "cosyvoice": None, "ollama": None}
    assert list(on.pipeline) == ["crawl", "analysis", "tts", "video", "render"]
    off_dir = tmp_path / "off"
    off_dir.mkdir()
    off = load_config(write_config(off_dir, pipeline_doc(off_dir, 0.1, park=False)))
    assert all(s.park_steps() is None for s in off.services.values())


def _event(kind: str, at: datetime, seq: int, **data: float) -> RecordedEvent:
    return RecordedEvent(stream="a", version=seq, type=kind, at=at, data=dict(data), seq=seq)


def test_breakdown_maps_a_wake_switch_onto_the_callers_clock() -> None:
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    ms = timedelta(milliseconds=1)
    events = [
        _event("ParkRequested", t0 + 2 * ms, 1),
        _event("Parked", t0 + 7 * ms, 2, park_s=0.004),
        _event("WakeRequested", t0 + 8 * ms, 3),
        _event("Woken", t0 + 508 * ms, 4, wake_s=0.5),
    ]
    b = breakdown(events, t0, began=100.0, ended=100.510)
    assert b["call_to_park_requested_s"] == pytest.approx(0.002)
    assert b["park_requested_to_parked_s"] == pytest.approx(0.005)
    assert b["parked_to_wake_requested_s"] == pytest.approx(0.001)
    assert b["wake_requested_to_woken_s"] == pytest.approx(0.5)
    assert b["woken_to_return_s"] == pytest.approx(0.002)
    assert (b["park_s"], b["wake_s"]) == (0.004, 0.5)
    # A cold switch (no park, no wake) has no wake breakdown.
    assert breakdown(events[:2], t0, 100.0, 100.5) == {}
