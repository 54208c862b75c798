"""``gpusm reload`` against a real daemon on 127.0.0.1."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpusm.api.threaded import ThreadedServer
from gpusm.config import load_config
from tests.api.api_helpers import TOKEN, seed_config, write_config


def gpusm(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "GPUSM_CONFIG"} | {"GPUSM_TOKEN": TOKEN}
    return subprocess.run(
        [sys.executable, "-m", "gpusm", *args], capture_output=True, text=True, env=env, timeout=60
    )


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[tuple[Path, dict[str, object]]]:
    doc = seed_config(tmp_path)
    path = write_config(tmp_path, doc)
    config = load_config(path)
    port = int(config.api.listen.rpartition(":")[2])  # where `gpusm reload` looks for it
    server = ThreadedServer(config, port=port, token=TOKEN, stop_services_on_exit=True)
    server.start()
    server.wait_recovered()
    try:
        yield path, doc
    finally:
        server.stop()


def test_reload_prints_the_diff_and_a_bad_file_exits_2(
    daemon: tuple[Path, dict[str, object]],
) -> None:
    path, doc = daemon
    new = copy.deepcopy(doc)
    new["phases"]["speak"] = ["cosyvoice"]  # type: ignore[index]
    write_config(path.parent, new)
    done = gpusm("reload", "-c", str(path))
    assert done.returncode == 0, done.stderr
    assert "config reloaded" in done.stdout
    assert "phases or pipeline: changed" in done.stdout

    path.write_text("services: {vidi: {vram_mib: -1}}\n")
    refused = gpusm("reload", "-c", str(path))
    assert refused.returncode == 2, refused.stdout + refused.stderr
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, refused.stderr
    assert "services.vidi.vram_mib" in errors[0]
    assert "Traceback" not in refused.stderr


def test_reload_without_a_daemon_says_so(tmp_path: Path) -> None:
    path = write_config(tmp_path, seed_config(tmp_path))
    done = gpusm("reload", "-c", str(path))
    assert done.returncode == 1
    assert "no daemon answers" in done.stderr
