"""Config reload without a restart, against real processes on the simulated GPU."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gpusm import Coordinator
from gpusm.errors import ReloadRefused
from gpusm.ports import EventQuery
from tests.seed_helpers import fake_service, free_port, seed_config, write_config
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
