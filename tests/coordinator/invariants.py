"""What must hold after any recovery: the checks of the crash sweep and the kill test.

Read from outside, as an operator would: the coordinator's public views on one side,
and on the other what really runs (fresh runtimes of the same deployment), what really
answers (a fresh health checker) and what the simulated GPU really holds.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Mapping, Sequence

from gpusm import Coordinator
from gpusm.domain.events import RecordedEvent
from gpusm.gpu.sim import SimGpu
from gpusm.health import Health
from gpusm.ports import EventQuery, Handle, Runtime
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


# Where recovery may leave a service: never mid-way (starting, draining, parking, waking).
SETTLED_STATES = ("stopped", "healthy", "parked")
# How long memory freed by a stop or a park may take to show on the simulated GPU (its
# reclaim lag, an asynchronous free) before the accounting must add up.
_SETTLE_S = 5.0


def wait_quiet(coordinator: Coordinator, quiet_s: float = 0.3, timeout: float = 30.0) -> None:
    """Wait until nothing is settling and the log stays still for ``quiet_s``.

    ``wait_settled`` alone can return before a prefetch that ``enter_phase`` already
    announced has recorded its start (the prefetch runs in a thread of its own), and the
    checks below would then find that service starting.
    """
    deadline = time.monotonic() + timeout
    while True:
        assert coordinator.wait_settled(max(0.0, deadline - time.monotonic())), "not settled"
        seq = coordinator.events(EventQuery(newest_first=True, limit=1))[0].seq
        time.sleep(quiet_s)
        newest = coordinator.events(EventQuery(newest_first=True, limit=1))[0].seq
        if newest == seq:
            return
        assert time.monotonic() < deadline, "the log never went quiet"


def assert_consistent(coordinator: Coordinator, sim: SimGpu) -> None:
    """No limbo states, state matches reality, no orphans, no OOM, gapless streams, and
    the GPU's memory accounted for: each service holds what its state allows (a parked
    one no more than its residual plus tolerance), nothing is held by pids of ours that
    no service owns, and what the policy assumes held fits the device."""
    config = coordinator.config
    states = {s.name: s.state for s in coordinator.status().services}
    instances = coordinator.instances()
    runtimes = build_runtimes(config)
    health = Health()
    try:
        for name, state in states.items():
            assert state in SETTLED_STATES, (name, state)
            handle = instances.get(name)
            if state == "healthy":
                assert handle is not None, name
                assert runtimes[handle.kind].is_alive(handle), f"{name} healthy but dead"
                probe = health.probe(config.services[name].health)
                assert probe.ok, f"{name} healthy but failing: {probe.reason}"
            elif state == "parked":
                assert handle is not None, f"{name} parked without an instance"
                assert runtimes[handle.kind].is_alive(handle), f"{name} parked but dead"
                assert config.services[name].park_steps() is not None, f"{name} cannot park"
            else:
                assert handle is None, name
        for runtime in runtimes.values():
            for orphan in runtime.find_orphans():
                state = states[orphan.service]
                assert state in ("healthy", "parked"), f"orphan of {orphan.service} ({state})"
                mine = instances[orphan.service]
                assert mine.instance == orphan.instance, f"second instance of {orphan.service}"
        _assert_memory_accounted(coordinator, sim, states, instances, runtimes)
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


def _assert_memory_accounted(
    coordinator: Coordinator,
    sim: SimGpu,
    states: Mapping[str, str],
    instances: Mapping[str, Handle],
    runtimes: Mapping[str, Runtime],
) -> None:
    """What each service holds on the simulated GPU fits its state (polled for a few
    seconds: freed memory shows after the reclaim lag)."""
    config = coordinator.config
    pids = {name: runtimes[h.kind].pids_of(h) for name, h in instances.items()}
    limits: dict[str, int] = {}  # what each may hold
    assumed = 0  # what the policy assumes held: a parked service's residual
    for name, state in states.items():
        service = config.services[name]
        steps = service.park_steps()
        if state == "parked":
            assert steps is not None
            limits[name] = steps.residual_mib + steps.tolerance_mib
            assumed += steps.residual_mib
        elif state == "healthy":
            limits[name] = service.vram_mib
            assumed += service.vram_mib
    deadline = time.monotonic() + _SETTLE_S
    while True:
        snap = sim.snapshot()
        held = {n: sum(snap.processes.get(p, 0) for p in ps) for n, ps in pids.items()}
        ours = set().union(*pids.values()) if pids else set()
        problems = [
            f"{name} ({states[name]}) holds {mib} MiB, more than {limits.get(name, 0)} MiB"
            for name, mib in sorted(held.items())
            if mib > limits.get(name, 0)
        ]
        unowned = {p: mib for p, mib in snap.processes.items() if p not in ours}
        if unowned:
            problems.append(f"memory held by pids no service owns: {unowned}")
        if snap.used_mib > sum(snap.processes.values()):
            problems.append(f"{snap.used_mib - sum(snap.processes.values())} MiB of the dead")
        if not problems or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert not problems, problems
    assert assumed <= snap.total_mib, f"{assumed} MiB assumed held on {snap.total_mib} MiB"
