"""Config reload without a restart, against real processes on the simulated GPU."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from gpusm import Coordinator
from gpusm.crashpoints import CRASH_EXIT_CODE
from gpusm.errors import ReloadRefused
from gpusm.ports import EventQuery
from tests.coordinator.invariants import assert_consistent
from tests.seed_helpers import fake_service, free_port, seed_config, sim_of, write_config
from tests.support import eventually, service_status, state_of

Open = Callable[..., Coordinator]


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().partition("=")[::2] for item in raw if item)


@pytest.fixture
def seed(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    doc = seed_config(tmp_path, load_scale=0.3, pipeline=[])
    return write_config(tmp_path, doc), doc


def test_reload_keeps_unchanged_services_and_restarts_changed_ones_only_when_idle(
    seed: tuple[Path, dict[str, Any]], open_coordinator: Open
) -> None:
    path, doc = seed
    coordinator = open_coordinator(path)
    coordinator.enter_phase("tts", client="w")  # cosyvoice, leased
    coordinator.start_service("vidi", by="test")  # vidi, idle
    coordinator.ensure_service("ollama", client="x")  # ollama, leased, unchanged
    pids = {n: service_status(coordinator, n).pid for n in ("cosyvoice", "vidi", "ollama")}
    before = coordinator.status().config_hash

    new = copy.deepcopy(doc)
    new["services"]["cosyvoice"]["env"] = {"VOICE": "v2"}
    new["services"]["vidi"]["env"] = {"MODEL": "v2"}
    new["services"]["extra"] = fake_service(1024, 5, 0.05, free_port())
    new["phases"]["more"] = ["extra"]
    write_config(path.parent, new)

    result = coordinator.reload(by="test")

    assert result.changed == ("cosyvoice", "vidi")
    assert result.added == ("extra",)
    assert set(result.unchanged) == {"comfyui", "ollama"}
    assert result.removed == ()
    status = coordinator.status()
    assert status.config_hash == result.config_hash != before
    # vidi ran for nobody: drained and stopped now. cosyvoice serves w's lease as it was.
    eventually(lambda: state_of(coordinator, "vidi") == "stopped", 20, "vidi stopped")
    assert service_status(coordinator, "cosyvoice").pid == pids["cosyvoice"]
    assert service_status(coordinator, "ollama").pid == pids["ollama"]
    assert "VOICE" not in _environ(pids["cosyvoice"])
    # New services and phases are there at once.
    assert coordinator.enter_phase("more", client="y", timeout=30).started == ("extra",)

    coordinator.release("w")  # cosyvoice idle now: it restarts with its new config next time
    eventually(lambda: state_of(coordinator, "cosyvoice") == "stopped", 20, "cosyvoice stopped")
    assert coordinator.enter_phase("tts", client="w", timeout=30).started == ("cosyvoice",)
    assert _environ(service_status(coordinator, "cosyvoice").pid or 0)["VOICE"] == "v2"
    assert service_status(coordinator, "ollama").pid == pids["ollama"]
    reloaded = coordinator.events(EventQuery(types=["ConfigReloaded"]))
    assert reloaded[-1].data["changed"] == ["cosyvoice", "vidi"]
    assert reloaded[-1].data["config_hash"] == result.config_hash


def test_a_removed_service_is_stopped_and_its_leases_revoked(
    seed: tuple[Path, dict[str, Any]], open_coordinator: Open
) -> None:
    path, doc = seed
    coordinator = open_coordinator(path)
    coordinator.enter_phase("tts", client="w")
    new = copy.deepcopy(doc)
    del new["services"]["cosyvoice"]
    new["phases"]["tts"] = []
    write_config(path.parent, new)

    assert coordinator.reload(by="test").removed == ("cosyvoice",)

    eventually(
        lambda: "cosyvoice" not in {s.name for s in coordinator.status().services},
        20,
        "cosyvoice stopped and gone",
    )
    revoked = coordinator.events(EventQuery(types=["LeaseRevoked"]))
    assert revoked[-1].data["client"] == "w"
    stopped = coordinator.events(EventQuery(stream="cosyvoice", types=["Stopped"]))
    assert stopped[-1].data["vram_reclaimed"] is True


def test_an_invalid_file_or_a_restart_only_change_reloads_nothing(
    seed: tuple[Path, dict[str, Any]], open_coordinator: Open
) -> None:
    path, doc = seed
    coordinator = open_coordinator(path)
    coordinator.enter_phase("tts", client="w")
    pid = service_status(coordinator, "cosyvoice").pid
    before = coordinator.status().config_hash

    path.write_text("services: [not, a, mapping\n")
    with pytest.raises(ReloadRefused, match="YAML syntax error"):
        coordinator.reload(by="test")
    new = copy.deepcopy(doc)
    new["api"] = {"listen": "127.0.0.1:1"}
    write_config(path.parent, new)
    with pytest.raises(ReloadRefused, match=r"api\.listen.*needs a restart"):
        coordinator.reload(by="test")

    assert coordinator.status().config_hash == before
    assert service_status(coordinator, "cosyvoice").pid == pid
    assert coordinator.events(EventQuery(types=["ConfigReloaded"])) == []


RELOADER = """
import sys
from gpusm import Coordinator
coordinator = Coordinator.from_config(sys.argv[1], monitor=False)
coordinator.enter_phase("tts", client="w")
open(sys.argv[1], "w").write(open(sys.argv[2]).read())
coordinator.reload(by="crash test")
"""


def test_a_crash_right_after_a_reload_leaves_nothing_stale_after_recovery(
    seed: tuple[Path, dict[str, Any]], open_coordinator: Open
) -> None:
    path, doc = seed
    new = copy.deepcopy(doc)
    new["services"]["cosyvoice"]["env"] = {"VOICE": "v2"}
    new_path = path.with_name("new.yaml")
    new_path.write_text(yaml.safe_dump(new))
    env = {**os.environ, "GPUSM_CRASH_AT": "after_config_reloaded"}
    driver = subprocess.run(
        [sys.executable, "-c", RELOADER, str(path), str(new_path)],
        env=env,
        capture_output=True,
        timeout=90,
    )
    assert driver.returncode == CRASH_EXIT_CODE, driver.stderr.decode()[-2000:]

    # The new file is in force; cosyvoice still runs the old config, for nobody now.
    coordinator = open_coordinator(path)
    assert coordinator.events(EventQuery(types=["ConfigReloaded"]))
    eventually(lambda: state_of(coordinator, "cosyvoice") == "stopped", 20, "stale stopped")
    drained = coordinator.events(EventQuery(stream="cosyvoice", types=["DrainRequested"]))
    assert drained[-1].data["reason"] == "its config changed (reload)"
    assert coordinator.enter_phase("tts", client="w", timeout=30).started == ("cosyvoice",)
    assert _environ(service_status(coordinator, "cosyvoice").pid or 0)["VOICE"] == "v2"
    assert_consistent(coordinator, sim_of(path))
