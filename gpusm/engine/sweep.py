"""The slow sweep: reap marked processes that no running instance explains.

Decisions never walk the process table; this does, off the lock, every
``SWEEP_INTERVAL_S``. It finds what per-pid attribution cannot see coming: a descendant
that escaped its instance (``setsid``, re-parented) and outlived it, still carrying the
instance's marker and possibly holding VRAM. Each one it stops is an ``OrphanReaped``
event naming the instance it outlived.
"""

from __future__ import annotations

from gpusm.domain.states import SETTLING_STATES
from gpusm.engine.reconcile import reap
from gpusm.engine.state import Engine
from gpusm.errors import GpusmError
from gpusm.ports import Handle

__all__ = ["SWEEP_INTERVAL_S", "sweep"]

# Seconds between two sweeps: a full process-table walk, so rarely.
SWEEP_INTERVAL_S = 10.0


def sweep(engine: Engine) -> list[str]:
    """Reap every marked instance that is not a service's running instance; what it did."""
    found: list[Handle] = []
    for runtime in list(engine.runtimes.values()):
        try:
            found += runtime.find_orphans()
        except GpusmError:
            continue  # e.g. the Docker engine is down: nothing of it can be seen
    done = []
    for handle in found:
        with engine.cond:
            slot = engine.slots.get(handle.service)
            # Someone is starting or stopping it (its new instance may not be attached
            # yet), or it is the running instance: not an orphan.
            if slot is not None and (
                slot.busy
                or slot.state in SETTLING_STATES
                or (slot.handle is not None and slot.handle.instance == handle.instance)
            ):
                continue
        done.append(reap(engine, handle, slot, "outlived its instance (found by the sweep)"))
    return done
