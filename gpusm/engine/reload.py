"""Config reload without a restart: what changed, and how each change takes effect.

- unchanged services keep running as they are (same pid or container);
- a changed service (command, image, env, health, sizes, runtime...) keeps serving its
  current lease; it is drained and stopped once idle, and starts with the new config
  when next needed (the monitor stops it; a start always takes the newest config);
- a removed service is stopped now (the leases that hold it are revoked);
- new services and phases, and the pipeline, are there at once;
- what only a restart can change (``api.listen``, the state folder, the database, the
  GPU backend) refuses the whole reload, and nothing changes.

A ``ConfigReloaded`` event records the diff and the new config's hash.
"""

from __future__ import annotations

from datetime import datetime

from gpusm.config import Config
from gpusm.crashpoints import crash_point
from gpusm.domain import events as ev
from gpusm.domain.machine import ServiceMachine
from gpusm.domain.states import State
from gpusm.engine.lifecycle import begin_drain
from gpusm.engine.state import Engine, Slot
from gpusm.errors import ReloadRefused
from gpusm.results import ReloadResult

__all__ = [
    "diff",
    "loaded_at_text",
    "reload_config",
    "restart_only",
    "retire_stale",
    "settle",
]


def _restart_settings(config: Config) -> dict[str, object]:
    # Settings only a restart applies.
    return {
        "api.listen": config.api.listen,
        "state_dir": config.state_dir,
        "database": config.database_url,
        "gpu.backend": config.gpu.backend,
    }


def restart_only(old: Config, new: Config) -> list[str]:
    """The settings that differ and that only a restart can change."""
    before, after = _restart_settings(old), _restart_settings(new)
    return [label for label, value in before.items() if after[label] != value]


def diff(old: Config, new: Config) -> ReloadResult:
    """What replacing ``old`` by ``new`` changes."""
    before, after = set(old.services), set(new.services)
    both = sorted(before & after)
    changed = tuple(n for n in both if old.services[n] != new.services[n])
    return ReloadResult(
        config_hash=new.fingerprint(),
        added=tuple(sorted(after - before)),
        removed=tuple(sorted(before - after)),
        changed=changed,
        unchanged=tuple(n for n in both if n not in changed),
        phases_changed=(old.phases, old.pipeline) != (new.phases, new.pipeline),
    )


def reload_config(engine: Engine, new: Config, by: str) -> ReloadResult:
    """Replace the engine's config by ``new`` (see the module docstring); caller holds
    no lock. ReloadRefused if only a restart could apply it."""
    with engine.cond:
        refused = restart_only(engine.config, new)
        if refused:
            raise ReloadRefused(
                f"the new config changes {', '.join(refused)}: that needs a restart "
                "(nothing was reloaded)"
            )
        result = diff(engine.config, new)
        engine.config = new
        engine.config_hash = result.config_hash
        engine.loaded_at = engine.clock.now()
        for name in result.added:
            winding_down = engine.slots.get(name)
            if winding_down is not None:
                # Removed by an earlier reload and still stopping: it stays this slot
                # (one stream, one owner), and starts with the new config next time.
                winding_down.removed = False
                winding_down.pending = new.services[name]
                winding_down.apply_pending()
            else:
                engine.slots[name] = _new_slot(engine, new, name)
        for name in result.changed:
            slot = engine.slots[name]
            slot.pending = new.services[name]
            slot.apply_pending()
        for name in result.removed:
            engine.slots[name].removed = True
            engine.revoke(name, f"{name} was removed from the config by {by}")
        engine.note(ev.ConfigReloaded(data={**_data(result), "by": by}))
        crash_point("after_config_reloaded")
        engine.cond.notify_all()
        return result


def _new_slot(engine: Engine, config: Config, name: str) -> Slot:
    # The service may have run before (removed by an earlier reload): its stream goes on.
    head = engine.store.heads().get(name)
    state = State(head.state) if head is not None and head.state else State.STOPPED
    machine = ServiceMachine(name, state, head.version if head is not None else 0)
    return Slot(config=config.services[name], machine=machine)


def _data(result: ReloadResult) -> dict[str, object]:
    return {
        "config_hash": result.config_hash,
        "added": list(result.added),
        "removed": list(result.removed),
        "changed": list(result.changed),
        "unchanged": list(result.unchanged),
        "phases_changed": result.phases_changed,
    }


def loaded_at_text(at: datetime) -> str:
    """When a config was loaded, as the status shows it."""
    return at.isoformat(timespec="seconds")


def retire_stale(engine: Engine) -> list[Slot]:
    """Slots a reload made stale that can go now: a removed service that runs, a changed
    one that runs for nobody. Their drain is committed here (caller holds the lock); the
    caller stops them. Stale slots already stopped take their new config, or go."""
    draining = []
    for slot in list(engine.slots.values()):
        if not slot.stale or slot.busy:
            continue
        if slot.state is State.STOPPED or slot.state is State.FAILED:
            settle(engine, slot)
        elif slot.state in (State.HEALTHY, State.PARKED) and (
            slot.removed or slot.name not in engine.leased()
        ):
            why = "removed from the config" if slot.removed else "its config changed"
            event = ev.DrainRequested(data={"reason": f"{why} (reload)", "by": "reload"})
            if begin_drain(engine, slot, event):
                draining.append(slot)
    return draining


def settle(engine: Engine, slot: Slot) -> None:
    """A stopped stale slot takes its reloaded config, or leaves if it was removed."""
    if slot.removed and slot.state in (State.STOPPED, State.FAILED) and not slot.busy:
        engine.slots.pop(slot.name, None)
    else:
        slot.apply_pending()
