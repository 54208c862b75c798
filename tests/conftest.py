"""Fixtures shared by every test package."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpusm.clock import ManualClock


@pytest.fixture
def manual_clock() -> ManualClock:
    """A clock that tests move by hand."""
    return ManualClock()


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    """An empty state directory."""
    d = tmp_path / "state"
    d.mkdir()
    return d


def _docker_available() -> str | None:
    """None if a Docker engine answers, else why not."""
    if shutil.which("docker") is None:
        return "the docker CLI is not installed"
    try:
        proc = subprocess.run(
            ["docker", "info", "--format", "{{.ServerVersion}}"],
            capture_output=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"docker info failed: {exc}"
    if proc.returncode != 0:
        return "no Docker engine answers (start dockerd, or run .ci/run which starts one)"
    return None


@pytest.fixture(scope="session")
def docker_engine() -> None:
    """Skip (or, with CI=true, fail) when no Docker engine is reachable."""
    why = _docker_available()
    if why is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI needs a Docker engine: {why}")
        pytest.skip(
            f"{why}; to run Docker tests: apt-get install docker.io busybox-static, "
            "start dockerd --bridge=none --iptables=false, run scripts/build_test_image.sh"
        )


@pytest.fixture(autouse=True, scope="session")
def no_leaked_children() -> Iterator[None]:
    """Fail the run if a test left one of its child processes running."""
    import psutil

    yield
    me = psutil.Process()
    leaked = [p for p in me.children(recursive=True) if p.is_running()]
    descriptions = []
    for proc in leaked:
        try:
            descriptions.append(f"{proc.pid}: {' '.join(proc.cmdline())[:200]}")
            proc.kill()
        except psutil.Error:
            continue
    assert not descriptions, "tests left processes running:\n" + "\n".join(descriptions)
