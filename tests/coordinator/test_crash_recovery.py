"""Crash the coordinator at every intent/fact boundary, and at random: recovery makes it whole."""

from __future__ import annotations

import ast
import os
import random
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import gpusm
from gpusm import Coordinator
from gpusm.crashpoints import CRASH_EXIT_CODE, CRASH_POINTS, RELOAD_CRASH_POINTS
from gpusm.ports import EventQuery
from tests.coordinator.invariants import assert_consistent, wait_quiet
from tests.seed_helpers import seed_config, sim_of, with_parking, write_config

Open = Callable[..., Coordinator]
DRIVER = Path(__file__).with_name("crash_driver.py")
# analysis: vidi starts and cosyvoice is prefetched; video: cosyvoice is evicted while
# starting and comfyui starts (a preemption); chat: vidi is evicted and comfyui, idle and
# healthy, is parked to make room for ollama; video again: ollama is evicted and comfyui
# woken; render releases the GPU (drains).
SCENARIO = ["analysis", "video", "chat", "video", "render"]
# What recovery does with comfyui, caught mid-park or mid-wake, and the state it leaves.
AFTER_RECOVERY = {
    "after_park_requested": ("comfyui: finished the interrupted park", "parked"),
    "after_wake_requested": ("comfyui: finished the interrupted wake", "healthy"),
}


def parking_seed(tmp_path: Path) -> dict[str, Any]:
    """The seed config with comfyui able to park (vLLM's sleep mode) and wake quickly."""
    return with_parking(seed_config(tmp_path), {"comfyui": "vllm"}, residual_mib=512, wake_s=0.1)


def run_driver(config: Path, *args: str, crash_at: str | None = None) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env.pop("GPUSM_CRASH_AT", None)
    if crash_at:
        env["GPUSM_CRASH_AT"] = crash_at
    return subprocess.Popen(
        [sys.executable, str(DRIVER), str(config), *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _crash_points_in_the_code() -> set[str]:
    """Every ``crash_point("...")`` call in the package's source."""
    found: set[str] = set()
    for path in Path(gpusm.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id == "crash_point"
                and node.args
                and isinstance(node.args[0], ast.Constant)
            ):
                found.add(str(node.args[0].value))
    return found


def test_every_crash_point_in_the_code_is_swept() -> None:
    """A crash point added to the engine but not to CRASH_POINTS would never be tested."""
    assert _crash_points_in_the_code() == set(CRASH_POINTS) | set(RELOAD_CRASH_POINTS)


@pytest.mark.slow
@pytest.mark.parametrize("point", CRASH_POINTS)
def test_recovery_after_a_crash_at_each_point(
    tmp_path: Path, open_coordinator: Open, point: str
) -> None:
    config = write_config(tmp_path, parking_seed(tmp_path))
    driver = run_driver(config, *SCENARIO, crash_at=point)
    _, err = driver.communicate(timeout=90)
    # The scenario reaches every point: the driver dies there, not at the end.
    assert driver.returncode == CRASH_EXIT_CODE, err.decode()[-2000:]
    assert f"crash point {point} reached" in err.decode()

    coordinator = open_coordinator(config)
    assert coordinator.recovered
    assert_consistent(coordinator, sim_of(config))
    (recovered,) = coordinator.events(EventQuery(types=["Recovered"], newest_first=True, limit=1))
    if point in AFTER_RECOVERY:
        # It was believed parking (waking) with its process alive: recovery finished the
        # interrupted step rather than stopping it.
        fix, state = AFTER_RECOVERY[point]
        assert f"{fix} ({state})" in recovered.data["corrections"], recovered.data
        states = {s.name: s.state for s in coordinator.status().services}
        assert states["comfyui"] == state, states
    # The interrupted request can be retried.
    for phase in SCENARIO:
        coordinator.enter_phase(phase, client="retry", timeout=30)
    wait_quiet(coordinator)
    assert_consistent(coordinator, sim_of(config))
    # The retry parked and woke comfyui again.
    after = EventQuery(stream="comfyui", after_seq=recovered.seq)
    retried = [e.type for e in coordinator.events(after)]
    assert "Parked" in retried, retried
    assert "Woken" in retried, retried


@pytest.mark.slow
def test_random_kill_9_while_a_worker_switches_phases(
    tmp_path: Path, open_coordinator: Open
) -> None:
    # Two services park (vLLM and SGLang requests) and wake as the worker switches.
    doc = with_parking(
        seed_config(tmp_path),
        {"comfyui": "vllm", "vidi": "sglang"},
        residual_mib=512,
        wake_s=0.1,
    )
    config = write_config(tmp_path, doc)
    rng = random.Random(20261127)
    kills = 0
    for _ in range(20):
        driver = run_driver(
            config, "--loop", "50", "analysis", "tts", "video", "chat", "analysis", "video"
        )
        try:
            driver.wait(timeout=rng.uniform(0.6, 3.0))
        except subprocess.TimeoutExpired:
            driver.send_signal(signal.SIGKILL)
            kills += 1
        driver.wait(timeout=30)
        assert driver.stderr is not None
        driver.stderr.close()
        coordinator = open_coordinator(config)
        assert_consistent(coordinator, sim_of(config))
        coordinator.close()
    assert kills >= 20
    coordinator = open_coordinator(config)  # its teardown stops what the last driver left
    seen = Counter(e.type for e in coordinator.events())
    for kind in ("ParkRequested", "Parked", "WakeRequested", "Woken"):
        assert seen[kind] >= 3, seen
