"""A runtime kind is one registry entry: the engine runs, stops and adopts through it.

The in-memory runtime is registered under a name of its own (``inmem``) next to the
built-in ones, and a service names it; nothing under ``gpusm/engine`` knows that name.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gpusm.config import Config, parse_config
from gpusm.ports import EventQuery, Runtime
from gpusm.runtimes.memory import FAKE_PID_BASE, MemoryRuntime
from gpusm.wiring import RUNTIMES, RuntimeContext, RuntimeFactory, open_coordinator

KIND = "inmem"


def _config(tmp_path: Path) -> Config:
    raw = {
        "state_dir": str(tmp_path / "state"),
        "gpu": {"backend": "sim", "reserve_mib": 0, "sim": {"total_mib": 8192}},
        "services": {
            "tts": {
                "command": ["not-run"],
                "vram_mib": 1024,
                # The fake processes answer nothing; a command that succeeds is their check.
                "health": {"exec": ["true"], "timeout_s": 10},
                "stop_timeout_s": 1,
            }
        },
        "phases": {"speak": ["tts"]},
    }
    config = parse_config(raw, base=tmp_path)
    # The file format knows native and docker; a kind registered in code is set here.
    tts = config.services["tts"].model_copy(update={"runtime": KIND})
    return config.model_copy(update={"services": {"tts": tts}})


@pytest.fixture
def machine() -> MemoryRuntime:
    """One fake process table that every coordinator of the test shares."""
    return MemoryRuntime(kind=KIND)


def _registry(machine: MemoryRuntime) -> dict[str, RuntimeFactory]:
    def inmem(ctx: RuntimeContext) -> Runtime:
        assert ctx.kind == KIND
        return machine.reopen()

    return {**RUNTIMES, KIND: inmem}


def test_a_phase_runs_through_a_runtime_registered_under_its_own_name(
    tmp_path: Path, machine: MemoryRuntime
) -> None:
    config = _config(tmp_path)
    with open_coordinator(config, monitor=False, registry=_registry(machine)) as coordinator:
        result = coordinator.enter_phase("speak", client="w", timeout=20)
        assert result.started == ("tts",)
        handle = coordinator.instances()["tts"]
        assert handle.kind == KIND
        assert handle.pid is not None
        assert handle.pid > FAKE_PID_BASE
        assert machine.is_alive(handle)
        launched = coordinator.events(EventQuery(stream="tts", types=["ProcessLaunched"]))
        assert launched[-1].data["runtime"] == KIND
        assert [s.runtime for s in coordinator.status().services] == [KIND]

        coordinator.stop_service("tts", by="test")
        assert not machine.is_alive(handle)
        stopped = coordinator.events(EventQuery(stream="tts", types=["Stopped"]))[-1]
        assert stopped.data["vram_reclaimed"] is True


def test_recovery_adopts_an_instance_through_the_runtime_that_started_it(
    tmp_path: Path, machine: MemoryRuntime
) -> None:
    config = _config(tmp_path)
    registry = _registry(machine)
    with open_coordinator(config, monitor=False, registry=registry) as first:
        first.enter_phase("speak", client="w", timeout=20)
        handle = first.instances()["tts"]
    # Closed without stopping services: the instance keeps running, as after a restart.
    with open_coordinator(config, monitor=False, registry=registry) as second:
        assert second.instances()["tts"] == handle
        adopted = second.events(EventQuery(stream="tts", types=["Adopted"]))
        assert adopted
        assert adopted[-1].data["runtime"] == KIND
        assert second.enter_phase("speak", client="w", timeout=20).kept == ("tts",)
        second.stop_service("tts", by="test")
    assert machine.live() == []


def test_a_kind_nobody_registered_is_a_clear_error(tmp_path: Path) -> None:
    from gpusm.errors import ConfigError

    with pytest.raises(ConfigError, match="no runtime 'inmem' is registered"):
        open_coordinator(_config(tmp_path), monitor=False)


def test_an_instance_of_a_runtime_the_config_no_longer_names_is_stopped_through_its_own(
    tmp_path: Path,
) -> None:
    old, new = MemoryRuntime(kind="old-kind"), MemoryRuntime(kind="new-kind")

    def registry_entry(machine: MemoryRuntime) -> RuntimeFactory:
        return lambda ctx: machine.reopen()

    registry = {**RUNTIMES, "old-kind": registry_entry(old), "new-kind": registry_entry(new)}

    def config_with(kind: str) -> Config:
        config = _config(tmp_path)
        tts = config.services["tts"].model_copy(update={"runtime": kind})
        return config.model_copy(update={"services": {"tts": tts}})

    with open_coordinator(config_with("old-kind"), monitor=False, registry=registry) as first:
        first.enter_phase("speak", client="w", timeout=20)
        running = first.instances()["tts"]
    assert old.is_alive(running)

    # Restarted with the service switched to another runtime: the old instance is stopped
    # through the runtime that started it (nothing left behind), the new one starts anew.
    with open_coordinator(config_with("new-kind"), monitor=False, registry=registry) as second:
        assert old.live() == []
        drained = second.events(EventQuery(stream="tts", types=["DrainRequested"]))[-1]
        assert drained.data["reason"] == "its runtime changed from old-kind to new-kind"
        stopped = second.events(EventQuery(stream="tts", types=["Stopped"]))[-1]
        assert stopped.data["vram_reclaimed"] is True
        result = second.enter_phase("speak", client="w", timeout=20)
        assert result.started == ("tts",)
        assert second.instances()["tts"].kind == "new-kind"
        second.stop_service("tts", by="test")
    assert new.live() == []


def test_a_reload_that_switches_the_runtime_stops_through_the_old_and_starts_the_new(
    tmp_path: Path,
) -> None:
    old, new = MemoryRuntime(kind="old-kind"), MemoryRuntime(kind="new-kind")
    registry = {
        **RUNTIMES,
        "old-kind": lambda ctx: old.reopen(),
        "new-kind": lambda ctx: new.reopen(),
    }

    def config_with(kind: str) -> Config:
        config = _config(tmp_path)
        tts = config.services["tts"].model_copy(update={"runtime": kind})
        return config.model_copy(update={"services": {"tts": tts}})

    with open_coordinator(config_with("old-kind"), monitor=False, registry=registry) as coord:
        coord.start_service("tts", by="test")  # runs for nobody: a reload may stop it now
        running = coord.instances()["tts"]
        assert coord.reload(config_with("new-kind"), by="test").changed == ("tts",)
        assert coord.wait_settled(10)
        assert not old.is_alive(running)
        assert old.live() == []
        assert coord.enter_phase("speak", client="w", timeout=20).started == ("tts",)
        assert coord.instances()["tts"].kind == "new-kind"
        coord.stop_service("tts", by="test")
    assert new.live() == []
