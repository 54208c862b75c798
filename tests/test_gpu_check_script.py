"""scripts/gpu_check/run.py, the offline real-GPU check, where there is no GPU.

The check itself needs an NVIDIA GPU; here we check that it says so at once (exit 2),
and that its wheel bundle (when ``scripts/gpu_bundle.sh`` has made one) is enough for a
bare interpreter to import gpusm.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RUN = REPO / "scripts" / "gpu_check" / "run.py"
WHEELS = REPO / "build" / "gpu-check" / "wheels"


def _has_nvml() -> bool:
    try:
        ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return False
    return True


@pytest.mark.skipif(_has_nvml(), reason="an NVIDIA driver is here: the real check would run")
def test_without_a_driver_it_exits_2_at_once_and_says_why(tmp_path: Path) -> None:
    env = {**os.environ, "OUT": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, str(RUN)], capture_output=True, text=True, env=env, timeout=30
    )
    assert done.returncode == 2
    assert "no NVIDIA driver here" in done.stderr
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["exit"] == 2
    assert report["ok"] is False
    assert report["wall_s"] < 5


@pytest.mark.skipif(not WHEELS.is_dir(), reason="no bundle: run scripts/gpu_bundle.sh")
def test_the_bundle_alone_lets_a_bare_interpreter_import_gpusm(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "wheels").symlink_to(WHEELS)
    done = subprocess.run(
        [sys.executable, str(RUN), "--prepare-only", "--bundle", str(bundle)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    site = json.loads(done.stdout)["site"]
    # -S: no site-packages, no venv; only the bundle and the checkout.
    bare = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": os.pathsep.join([site, str(REPO)])}
    code = "import gpusm, pynvml, sqlalchemy, alembic; from gpusm import Coordinator"
    imported = subprocess.run(
        [sys.executable, "-S", "-c", code], capture_output=True, text=True, env=bare, timeout=60
    )
    assert imported.returncode == 0, imported.stderr
