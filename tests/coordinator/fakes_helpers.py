"""A coordinator over fakes: in-memory store, GPU, runtime and health, on a manual clock.

Nothing here launches a process or opens a socket, so coordinator behaviour can be
driven step by step: tests call :meth:`World.tick` instead of starting the monitor's
thread, and move the :class:`~gpusm.clock.ManualClock` by hand.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpusm import Coordinator
from gpusm.clock import ManualClock
from gpusm.config import Config, parse_config
from gpusm.domain.states import State
from gpusm.engine.lifecycle import join_background
from gpusm.engine.monitor import Monitor
from gpusm.engine.reconcile import recover
from gpusm.engine.state import Engine, Slot
from gpusm.errors import SimOutOfMemory
from gpusm.gpu.memory import MemoryGpu, MemoryProbe
from gpusm.health import MemoryControl, MemoryHealth
from gpusm.park_config import HttpCall
from gpusm.ports import CallResult, EventQuery, Handle
from gpusm.runtimes.memory import MemoryRuntime
from gpusm.store.memory import MemoryEventStore

__all__ = ["FakeParking", "World", "fake_config", "fake_service", "open_world"]

_BASE_PORT = 19000


def _listening(runtime: MemoryRuntime) -> Callable[[str], str | None]:
    """Who answers a fake service's health check: its newest live instance, if any."""

    def instance(name: str) -> str | None:
        live = [h for h in runtime.live() if h.service == name]
        return live[-1].instance if live else None

    return instance


def fake_service(vram_mib: int, priority: int = 0, **extra: Any) -> dict[str, Any]:
    """A native service entry for :func:`fake_config` (its health URL is filled in there)."""
    return {"command": ["fake-server"], "vram_mib": vram_mib, "priority": priority, **extra}


def fake_config(
    tmp_path: Path,
    services: Mapping[str, Mapping[str, Any]],
    *,
    total_mib: int | list[int] = 16384,
    phases: Mapping[str, Any] | None = None,
    reserve_mib: int = 0,
    placement: str = "binpack",
) -> Config:
    """A validated config on a simulated GPU; each service gets its own health URL.

    Without ``phases``, each service gets a phase ``p<name>`` needing just it.
    """
    entries = {}
    for i, (name, entry) in enumerate(services.items()):
        health = {"http": f"http://127.0.0.1:{_BASE_PORT + i}/health", "timeout_s": 10}
        health.update(entry.get("health", {}))
        entries[name] = {"stop_timeout_s": 2, "drain_timeout_s": 2, **entry, "health": health}
    raw = {
        "state_dir": str(tmp_path / "state"),
        "gpu": {
            "backend": "sim",
            "reserve_mib": reserve_mib,
            "settle_timeout_s": 5,
            "placement": placement,
            "sim": {"total_mib": total_mib},
        },
        "services": entries,
        "phases": dict(phases) if phases is not None else {f"p{n}": [n] for n in services},
    }
    return parse_config(raw, base=tmp_path)


class FakeParking:
    """Fake model servers' answers to park and wake steps: a sleep step makes the
    service's newest live instance let go of its fake VRAM down to its residual (plus
    ``leak_mib[name]``), a wake step takes it back. Steps are told apart by comparing
    them with the service's resolved ``park:`` steps, HTTP and signals alike.

    ``failing[name] = "sleep" | "wake" | "warmup"`` makes those steps fail (status 500);
    ``calls`` lists (service, kind) in order.
    """

    def __init__(self, config: Config, gpu: MemoryGpu, runtime: MemoryRuntime) -> None:
        self.config = config
        self.gpu = gpu
        self.runtime = runtime
        self.leak_mib: dict[str, int] = {}
        self.failing: dict[str, str] = {}
        self.calls: list[tuple[str, str]] = []
        self.model_mib: dict[int, int] = {}
        self.control = MemoryControl(self.answer)
        runtime.on_signal = self.on_signal

    def answer(self, request: HttpCall) -> CallResult:
        """The control's answer to one HTTP step."""
        for name, svc in self.config.services.items():
            steps = svc.park_steps()
            if steps is None:
                continue
            for kind, group in (("sleep", steps.sleep), ("wake", steps.wake)):
                if any(step.http == request for step in group):
                    return self._act(name, kind)
            if any(step.http == request for step in steps.warmup):
                return self._act(name, "warmup")
        return CallResult(False, 404, f"no fake service answers {request.describe()}")

    def on_signal(self, handle: Handle, signal: str) -> None:
        """What a signal step does to a fake instance."""
        steps = self.config.services[handle.service].park_steps()
        assert steps is not None
        kind = "sleep" if any(step.signal == signal for step in steps.sleep) else "wake"
        self._act(handle.service, kind)

    def _act(self, name: str, kind: str) -> CallResult:
        self.calls.append((name, kind))
        if self.failing.get(name) == kind:
            return CallResult(False, 500, f"status 500: {name} refused to {kind}")
        live = [h for h in self.runtime.live() if h.service == name]
        if not live or live[-1].pid is None:
            return CallResult(False, None, "connection refused")
        pid = live[-1].pid
        held = self.gpu.holders().get(pid, 0)
        steps = self.config.services[name].park_steps()
        assert steps is not None
        if kind == "sleep":
            self.model_mib.setdefault(pid, held)
            keep = min(held, steps.residual_mib + self.leak_mib.get(name, 0))
            if held > keep:
                self.gpu.release(pid, held - keep)
        elif kind == "wake":
            missing = self.model_mib.get(pid, held) - held
            if missing > 0:
                try:
                    self.gpu.allocate(pid, missing)
                except SimOutOfMemory as exc:  # as a real server: it stays asleep, says 503
                    return CallResult(False, 503, f"status 503: out of memory: {exc}")
            self.model_mib.pop(pid, None)
        return CallResult(True, 200)


@dataclass
class World:
    """One coordinator over fakes; ``reopen`` plays a restart after a crash."""

    config: Config
    clock: ManualClock
    store: MemoryEventStore
    gpu: MemoryGpu
    runtime: MemoryRuntime
    health: MemoryHealth
    engine: Engine
    coordinator: Coordinator
    monitor: Monitor
    recovery: dict[str, Any] = field(default_factory=dict)
    sizes: Mapping[str, int] | None = None
    parking: FakeParking | None = None
    # Every in-memory GPU (``gpu`` is the first); a config lists their sizes.
    gpus: list[MemoryGpu] = field(default_factory=list)

    def settle(self, timeout_s: float = 10.0) -> None:
        """Wait (real time, bounded) until every background start and stop has finished."""
        join_background(timeout_s)
        busy = [s.name for s in self.engine.slots.values() if s.busy]
        assert not busy, f"still busy after {timeout_s}s: {busy}"

    def tick(self) -> None:
        """One monitor pass, then wait for what it started in the background."""
        self.monitor.tick()
        self.settle()

    def slot(self, name: str) -> Slot:
        """The coordinator's slot of ``name``."""
        return self.engine.slots[name]

    def state(self, name: str) -> State:
        """The state of ``name`` now."""
        return self.engine.slots[name].state

    def handle(self, name: str) -> Handle:
        """The handle of ``name``'s running instance (it must have one)."""
        handle = self.engine.slots[name].handle
        assert handle is not None, f"{name} has no handle"
        return handle

    def types(self, stream: str, after_seq: int = 0) -> list[str]:
        """Event types of ``stream`` after ``after_seq``, oldest first."""
        return [e.type for e in self.store.read(EventQuery(stream=stream, after_seq=after_seq))]

    def last_seq(self) -> int:
        """The newest ``seq`` in the log (0 when empty)."""
        newest = self.store.read(EventQuery(newest_first=True, limit=1))
        return newest[0].seq if newest else 0

    def last(self, stream: str, type_: str) -> dict[str, Any]:
        """The data of ``stream``'s newest ``type_`` event."""
        found = self.store.read(EventQuery(stream=stream, types=[type_], newest_first=True))
        assert found, f"no {type_} on {stream}"
        return dict(found[0].data)

    def reopen(self, config: Config | None = None) -> World:
        """Drop this coordinator unclosed (a crash) and recover a new one on the same world.

        Background work is joined first, but a slot a test left busy stays as it is: that
        is the interrupted step the new coordinator must resolve.
        """
        join_background(10.0)
        return open_world(
            config or self.config,
            clock=self.clock,
            store=self.store,
            gpu=self.gpu,
            gpus=self.gpus,
            runtime=self.runtime.reopen(),
            sizes=self.sizes,
            health_of=self.health,
            parking=self.parking,
        )


def open_world(
    config: Config,
    *,
    clock: ManualClock | None = None,
    store: MemoryEventStore | None = None,
    gpu: MemoryGpu | None = None,
    runtime: MemoryRuntime | None = None,
    sizes: Mapping[str, int] | None = None,
    health_of: MemoryHealth | None = None,
    parking: FakeParking | None = None,
    gpus: list[MemoryGpu] | None = None,
) -> World:
    """Build an engine over fakes like ``gpusm.wiring.build_engine`` does, and recover it.

    ``health_of``: an earlier world's health check whose ``failing`` and ``ready_after``
    the new one shares (the services misbehave, not the coordinator that asks them).
    """
    clock = clock or ManualClock()
    store = store or MemoryEventStore()
    if gpus is None:
        sizes_mib = config.gpu.sim.sizes
        first = gpu or MemoryGpu(sizes_mib[0], clock=clock)
        gpus = [first] + [
            MemoryGpu(size, clock=clock, index=i) for i, size in enumerate(sizes_mib) if i
        ]
    gpu = gpus[0]
    # The fake stands in for the native runtime that the config's services name.
    runtime = runtime or MemoryRuntime(clock, kind="native")
    if len(gpus) == 1:
        gpu.attach(runtime, sizes)
    else:
        _attach_all(gpus, runtime, sizes)
    # The services' park and wake steps move their fake memory (state shared on reopen).
    fake_parking = FakeParking(config, gpu, runtime)
    if parking is not None:
        fake_parking.leak_mib, fake_parking.failing = parking.leak_mib, parking.failing
        fake_parking.model_mib = parking.model_mib
    health = MemoryHealth(
        clock,
        {name: svc.health for name, svc in config.services.items()},
        listening=_listening(runtime),
        failing=health_of.failing if health_of else None,
        ready_after=health_of.ready_after if health_of else None,
    )
    engine = Engine(
        config,
        store=store,
        probe=MemoryProbe(gpus),
        runtimes={runtime.kind: runtime},
        health=health,
        clock=clock,
        control=fake_parking.control,
    )
    recovery = recover(engine)
    coordinator = Coordinator(engine)
    coordinator.recovered = True
    world = World(
        config,
        clock,
        store,
        gpu,
        runtime,
        health,
        engine,
        coordinator,
        Monitor(engine),
        recovery,
        sizes,
        fake_parking,
        gpus,
    )
    world.settle()
    return world


def _attach_all(
    gpus: list[MemoryGpu], runtime: MemoryRuntime, sizes: Mapping[str, int] | None
) -> None:
    """Each fake instance holds its VRAM on every device it was placed on."""
    wanted = dict(sizes or {})

    def on_start(handle: Handle, config: Any) -> None:
        mib = wanted.get(handle.service, config.vram_mib)
        placement = runtime.placements.get(handle.instance)
        if mib <= 0 or handle.pid is None or placement is None:
            return
        try:
            for index in placement.indices:
                gpus[index].allocate(handle.pid, mib)
        except SimOutOfMemory:
            runtime.stop(handle, 0.0)

    def on_exit(handle: Handle) -> None:
        if handle.pid is not None:
            for gpu in gpus:
                gpu.exited(handle.pid)

    runtime.on_start = on_start
    runtime.on_exit = on_exit
