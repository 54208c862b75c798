"""Crash the coordinator at every intent/fact boundary, and at random: recovery makes it whole."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from gpusm import Coordinator
from gpusm.crashpoints import CRASH_EXIT_CODE, CRASH_POINTS
from gpusm.ports import EventQuery
from tests.coordinator.invariants import assert_consistent
from tests.seed_helpers import seed_config, sim_of, write_config

Open = Callable[..., Coordinator]
DRIVER = Path(__file__).with_name("crash_driver.py")
SCENARIO = ["analysis", "video", "render"]


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


@pytest.mark.slow
@pytest.mark.parametrize("point", CRASH_POINTS)
def test_recovery_after_a_crash_at_each_point(
    tmp_path: Path, open_coordinator: Open, point: str
) -> None:
    config = write_config(tmp_path, seed_config(tmp_path))
    driver = run_driver(config, *SCENARIO, crash_at=point)
    _, err = driver.communicate(timeout=90)
    assert driver.returncode == CRASH_EXIT_CODE, err.decode()[-2000:]
    assert f"crash point {point} reached" in err.decode()

    coordinator = open_coordinator(config)
    assert coordinator.recovered
    assert_consistent(coordinator, sim_of(config))
    assert coordinator.events(EventQuery(types=["Recovered"]))
    # The interrupted request can be retried.
    for phase in SCENARIO:
        coordinator.enter_phase(phase, client="retry", timeout=30)
    assert coordinator.wait_settled(30)
    assert_consistent(coordinator, sim_of(config))


@pytest.mark.slow
def test_random_kill_9_while_a_worker_switches_phases(
    tmp_path: Path, open_coordinator: Open
) -> None:
    config = write_config(tmp_path, seed_config(tmp_path))
    rng = random.Random(20261127)
    kills = 0
    for _ in range(20):
        driver = run_driver(config, "--loop", "50", "analysis", "tts", "video", "render")
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
    open_coordinator(config)  # its teardown stops what the last driver left running
