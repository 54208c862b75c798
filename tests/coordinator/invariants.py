"""What must hold after any recovery: the checks of the crash sweep and the kill test."""

from __future__ import annotations

from collections import defaultdict

from gpusm.coordinator import Coordinator
from gpusm.domain.states import State
from gpusm.gpu.sim import SimGpu


def assert_consistent(coordinator: Coordinator, sim: SimGpu) -> None:
    """No limbo states, state matches reality, no orphans, no OOM, gapless streams."""
    core = coordinator.core
    for slot in core.slots.values():
        assert slot.state not in (State.STARTING, State.DRAINING), (slot.name, slot.state)
        runtime = core.runtime(slot)
        if slot.state is State.HEALTHY:
            assert slot.handle is not None, slot.name
            assert runtime.is_alive(slot.handle), f"{slot.name} healthy but dead"
            assert core.health.probe(slot.config.health).ok, f"{slot.name} healthy but failing"
        else:
            assert slot.handle is None, slot.name
    for runtime in core.runtimes.values():
        for orphan in runtime.find_orphans():
            slot = core.slots[orphan.service]
            assert slot.state is State.HEALTHY, f"orphan of {orphan.service} ({slot.state})"
            assert slot.handle is not None
            assert slot.handle.instance == orphan.instance, f"second instance of {orphan.service}"
    assert sim.ooms() == []
    assert sim.snapshot().used_mib <= sim.snapshot().total_mib
    versions: dict[str, list[int]] = defaultdict(list)
    for event in coordinator.events():
        versions[event.stream].append(event.version)
    for stream, seen in versions.items():
        assert seen == list(range(1, len(seen) + 1)), f"gap in {stream}: {seen}"
