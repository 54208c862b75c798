"""The demo runs the plan's pipeline on a simulated GPU and leaves an auditable database."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml
from typer.testing import CliRunner

from gpusm.cli.main import app
from gpusm.demo import run_demo


def test_demo_runs_one_item_without_oom_and_keeps_the_log(tmp_path: Path) -> None:
    summary = run_demo(tmp_path / "demo", items=1, work_s=0.0)
    assert summary.ooms == 0
    assert summary.device_total_mib == [24576]
    assert 0 < summary.peak_used_mib <= summary.total_mib == 24576
    assert set(summary.phase_seconds) == {"crawl", "analysis", "tts", "video", "render"}
    assert summary.starts >= 3
    assert summary.evictions + summary.releases >= 2
    # render releases the GPU: ComfyUI (parkable) is parked, not stopped.
    assert summary.parks >= 1
    events = subprocess.run(
        [sys.executable, "-m", "gpusm", "events", "--json", "-c", str(summary.config)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    types = [json.loads(line)["type"] for line in events]
    assert "HealthPassed" in types
    assert "Stopped" in types


def test_demo_command_prints_a_summary(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["demo", "--items", "1", "--work-s", "0", "--dir", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    assert "OOMs: 0" in result.output
    assert "peak VRAM" in result.output
    assert "GPU 0: peak" not in result.output  # one device: the summary as before


def test_demo_on_two_devices_places_comfyui_beside_the_others_without_evicting(
    tmp_path: Path,
) -> None:
    summary = run_demo(tmp_path / "demo", items=1, work_s=0.0, devices=2)
    assert summary.ooms == 0
    assert summary.device_total_mib == [24576, 24576]
    assert summary.total_mib == 49152
    # Vidi and CosyVoice on one device, ComfyUI (20 GiB) on the other: room for all.
    assert summary.evictions == summary.preemptions == 0
    assert all(0 < peak <= 24576 for peak in summary.device_peak_mib), summary
    assert summary.peak_used_mib > 24576 - 20480
    doc = yaml.safe_load(summary.config.read_text())
    assert doc["gpu"]["sim"]["devices"] == 2
    assert {svc["gpu"] for svc in doc["services"].values()} == {"auto"}


def test_demo_command_shows_each_device(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["demo", "--items", "1", "--work-s", "0", "--devices", "2", "--dir", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    assert "2 simulated 24 GiB GPUs" in result.output
    for index in (0, 1):
        assert f"gpu{index} " in result.output  # each phase's line
        assert f"GPU {index}: peak" in result.output  # the summary
    assert "OOMs: 0" in result.output
