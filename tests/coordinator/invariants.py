"""What must hold after any recovery: the checks of the crash sweep and the kill test.

Read from outside, as an operator would: the coordinator's public views on one side,
and on the other what really runs (fresh runtimes of the same deployment), what really
answers (a fresh health checker) and what the simulated GPU really holds.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

from gpusm import Coordinator
from gpusm.domain.events import RecordedEvent
from gpusm.gpu.sim import SimGpu
from gpusm.health import Health
from gpusm.wiring import build_runtimes


def assert_prefetch_evictions_were_for_something(events: Sequence[RecordedEvent]) -> None:
    """Every eviction a prefetch made is followed by a start of a service it was made for
    (by the prefetch, or by the request it handed over to), or by a ``PrefetchAbandoned``
    naming it (and saying why)."""
    for i, event in enumerate(events):
        if event.type != "Evicted" or not event.data.get("prefetch"):
            continue
        later = events[i + 1 :]
        started = any(e.type == "StartRequested" and e.stream in event.data["for"] for e in later)
        abandoned = any(
            e.type == "PrefetchAbandoned" and event.stream in e.data["evicted"] for e in later
        )
        assert started or abandoned, f"prefetch eviction #{event.seq} of {event.stream} led nowhere"


def assert_consistent(coordinator: Coordinator, sim: SimGpu) -> None:
    """No limbo states, state matches reality, no orphans, no OOM, gapless streams."""
    config = coordinator.config
    states = {s.name: s.state for s in coordinator.status().services}
    instances = coordinator.instances()
    runtimes = build_runtimes(config)
    health = Health()
    try:
        for name, state in states.items():
            assert state not in ("starting", "draining"), (name, state)
            handle = instances.get(name)
            if state == "healthy":
                assert handle is not None, name
                assert runtimes[handle.kind].is_alive(handle), f"{name} healthy but dead"
                probe = health.probe(config.services[name].health)
                assert probe.ok, f"{name} healthy but failing: {probe.reason}"
            else:
                assert handle is None, name
        for runtime in runtimes.values():
            for orphan in runtime.find_orphans():
                state = states[orphan.service]
                assert state == "healthy", f"orphan of {orphan.service} ({state})"
                mine = instances[orphan.service]
                assert mine.instance == orphan.instance, f"second instance of {orphan.service}"
    finally:
        health.close()
        for runtime in runtimes.values():
            runtime.close()
    assert sim.ooms() == []
    assert sim.snapshot().used_mib <= sim.snapshot().total_mib
    versions: dict[str, list[int]] = defaultdict(list)
    for event in coordinator.events():
        versions[event.stream].append(event.version)
    for stream, seen in versions.items():
        assert seen == list(range(1, len(seen) + 1)), f"gap in {stream}: {seen}"
