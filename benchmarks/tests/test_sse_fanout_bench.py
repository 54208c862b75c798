"""Checks of figure 12's helpers (not timings): its config, its SSE parser, its tally."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import sse_fanout as fig
from benchmarks.common import write_config
from gpusm import load_config


def test_config_makes_each_phase_evict_the_other_service(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, fig.config_doc(tmp_path, 7000)))
    sizes = [config.services[name].vram_mib for name in ("painter", "speaker")]
    assert sum(sizes) > config.gpu.sim.sizes[0] >= max(sizes)
    assert set(config.phases) == set(fig.PHASES)


def test_parse_sse_yields_id_and_data_and_skips_comments_and_retry() -> None:
    lines = [
        "retry: 1000",
        "",
        ": keep-alive",
        "",
        "id: 7",
        "event: Crashed",
        f"data: {json.dumps({'seq': 7, 'at': '2026-01-01T00:00:00Z'})}",
        "",
        "id: 8",
        "event: Stopped",
        'data: {"seq": 8}',
        "",
    ]
    assert list(fig.parse_sse(lines)) == [
        (7, {"seq": 7, "at": "2026-01-01T00:00:00Z"}),
        (8, {"seq": 8}),
    ]


def test_summarize_counts_only_exact_in_order_deliveries() -> None:
    exact = fig.Subscriber(got=[(1, 0.01), (2, 0.02), (3, 0.03)])
    reordered = fig.Subscriber(got=[(2, 0.01), (1, 0.01), (3, 0.01)])
    repeated = fig.Subscriber(got=[(1, 0.01), (2, 0.01), (2, 0.01), (3, 0.01)])
    short = fig.Subscriber(got=[(1, 0.01)])
    found = fig.summarize([exact, reordered, repeated, short], [1, 2, 3])
    assert (found["complete"], found["events"], found["received"]) == (1, 3, 11)
    assert found["max_s"] == pytest.approx(0.03)
