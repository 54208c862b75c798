"""The composition root: the one place that turns a :class:`Config` into concrete adapters.

Nothing else in the package imports a concrete store, GPU probe or runtime. The CLI,
the API, the demo and ``Coordinator.from_config`` all ask here:

- :func:`open_coordinator`: lock the state directory, build the engine, recover;
- :func:`open_store` / :func:`upgrade_store` / :func:`store_revision`: the event log;
- :func:`build_probe`, :func:`build_runtimes` (through :data:`RUNTIMES`);
- :func:`open_notifier`: the webhooks of ``notify:`` (their cursors seeded, not started);
- the simulated GPU and its fake model server, for the demo and ``gpusm sim``.

Adding a runtime kind is one adapter module and one entry in :data:`RUNTIMES`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from gpusm.clock import SystemClock
from gpusm.config import Config
from gpusm.engine.coordinator import Coordinator, set_opener
from gpusm.engine.state import Engine
from gpusm.errors import ConfigError, GpuProbeError
from gpusm.gpu.fake_server import EXIT_DEVICE, EXIT_OOM, FakeServerOptions, run_fake_server
from gpusm.gpu.sim import SimGpu
from gpusm.health import Health, HttpControl
from gpusm.lock import StateDirLock
from gpusm.ports import Clock, EventStore, GpuProbe, Notifier, Runtime

__all__ = [
    "DEPLOYMENT_ENV",
    "EXIT_DEVICE",
    "EXIT_OOM",
    "FakeServerOptions",
    "SimGpu",
    "RUNTIMES",
    "RuntimeContext",
    "RuntimeFactory",
    "build_engine",
    "build_probe",
    "build_runtimes",
    "deployment_id",
    "open_coordinator",
    "open_notifier",
    "open_runtime",
    "open_sim",
    "open_sim_devices",
    "open_sim_dir",
    "open_sims",
    "open_store",
    "run_fake_server",
    "sim_exists",
    "store_revision",
    "upgrade_store",
]

# Every service gpusm starts carries the id of the state directory that owns it, so two
# deployments on one machine never adopt or reap each other's processes.
DEPLOYMENT_ENV = "GPUSM_DEPLOYMENT"


def deployment_id(config: Config) -> str:
    """A short stable id for ``config.state_dir``."""
    return hashlib.sha256(str(config.state_dir).encode()).hexdigest()[:12]


# ---------------------------------------------------------------- event store
def open_store(config: Config, *, upgrade: bool = True) -> EventStore:
    """The event store of ``config`` (SQLite), migrated to the newest schema unless told not."""
    from gpusm.store.sql import SqlEventStore

    return SqlEventStore(config.database_url, upgrade=upgrade)


def upgrade_store(config: Config) -> str:
    """Create or migrate the event database; returns its schema revision."""
    from gpusm.store.sql import upgrade

    return upgrade(config.database_url)


def store_revision(config: Config) -> str:
    """The schema revision of an existing event database, without migrating it."""
    from gpusm.store.sql import SqlEventStore

    store = SqlEventStore(config.database_url, upgrade=False)
    try:
        return str(store.settings()["schema_revision"])
    finally:
        store.close()


# ---------------------------------------------------------------- webhooks
def open_notifier(config: Config, *, poll_s: float = 0.2) -> Notifier | None:
    """The webhooks of ``config.notify`` with their cursors loaded (a new webhook's set
    after the newest event now), not yet delivering; None if there are none. ConfigError
    if a secret file cannot be read."""
    if not config.notify:
        return None
    from gpusm.notify import HttpSender, WebhookNotifier, WebhookWorker
    from gpusm.store.cursors import SqlCursorStore
    from gpusm.store.sql import SqlEventStore
    from gpusm.wire import webhook_body

    source = str(config.source or "<config>")
    secrets = [hook.read_secret(source, i) for i, hook in enumerate(config.notify)]
    store = SqlEventStore(config.database_url)
    cursors = SqlCursorStore(config.database_url)
    senders = [HttpSender(hook.timeout_s) for hook in config.notify]

    def close() -> None:
        for sender in senders:
            sender.close()
        cursors.close()
        store.close()

    workers = [
        WebhookWorker(
            hook,
            secret,
            store=store,
            cursors=cursors,
            sender=sender,
            encode=webhook_body,
            poll_s=poll_s,
        )
        for hook, secret, sender in zip(config.notify, secrets, senders, strict=True)
    ]
    notifier = WebhookNotifier(workers, on_close=close)
    try:
        notifier.seed()
    except BaseException:
        notifier.close()
        raise
    return notifier


# ---------------------------------------------------------------- GPU
def open_sim(config: Config) -> SimGpu:
    """Device 0 of the simulated GPUs of ``config`` (all of them opened as by
    :func:`open_sims`), for the demo and ``gpusm sim``."""
    return open_sims(config)[0]


def open_sims(config: Config) -> list[SimGpu]:
    """Every simulated device of ``config``, in index order: ``gpu.sim.devices`` of them,
    created if new, with ``gpu.sim.sizes`` and the reclaim lag applied; devices past that
    count are removed (refused while a live process holds memory on one)."""
    sim = config.gpu.sim
    return open_sim_devices(
        config.sim_dir, sim.sizes, sim.reclaim_lag_s, devices=sim.devices, apply=True
    )


def open_sim_dir(
    directory: Path,
    total_mib: int | None = None,
    reclaim_lag_s: float | None = None,
    *,
    apply: bool = False,
) -> SimGpu:
    """The simulated GPU in ``directory``, created if new; ``apply`` makes the given size
    and lag take effect on an existing one too."""
    if SimGpu.exists(directory) and not apply:
        return SimGpu(directory)
    return SimGpu(directory, total_mib, reclaim_lag_s)


def open_sim_devices(
    directory: Path,
    total_mib: int | Sequence[int] | None = None,
    reclaim_lag_s: float | None = None,
    *,
    devices: int | None = None,
    apply: bool = False,
) -> list[SimGpu]:
    """Every device of the simulated GPU in ``directory`` (see :meth:`SimGpu.open_all`):
    ``devices`` of them (default: as many as ``total_mib`` lists, else as exist), missing
    ones created with ``total_mib`` (one size, or one per device); ``apply`` makes the
    sizes and lag take effect on existing ones too and removes devices past ``devices``."""
    return SimGpu.open_all(directory, total_mib, reclaim_lag_s, devices=devices, apply=apply)


def sim_exists(directory: Path) -> bool:
    """Whether a simulated GPU was created in ``directory``."""
    return SimGpu.exists(directory)


def build_probe(config: Config) -> GpuProbe:
    """The GPU probe the config names (NVML, or the simulated GPUs, created if new)."""
    if config.gpu.backend == "sim":
        from gpusm.gpu.sim import SimProbe

        return SimProbe(open_sims(config))
    from gpusm.gpu.nvml import NvmlProbe

    return NvmlProbe()


# ---------------------------------------------------------------- runtimes
@dataclass(frozen=True)
class RuntimeContext:
    """What every runtime of one deployment shares: its marker and where logs go."""

    kind: str
    deployment: str
    # Added to every service's environment (the deployment marker, the sim GPU's folder).
    env: Mapping[str, str]
    log_dir: Path
    # ``config.gpu.backend``: with "nvml" the GPUs are real and a container must ask the
    # engine for its devices; the simulated GPU needs none.
    gpu_backend: str = "sim"


RuntimeFactory = Callable[[RuntimeContext], Runtime]


def _native(ctx: RuntimeContext) -> Runtime:
    from gpusm.runtimes.native import NativeRuntime

    def ours(environ: Mapping[str, str]) -> bool:
        # Processes inside our containers carry the same markers; Docker owns those.
        return (
            environ.get(DEPLOYMENT_ENV) == ctx.deployment
            and environ.get("GPUSM_RUNTIME") != "docker"
        )

    return NativeRuntime(ctx.log_dir, extra_env=ctx.env, marker_filter=ours, kind=ctx.kind)


def _docker(ctx: RuntimeContext) -> Runtime:
    from gpusm.runtimes.docker import DockerRuntime

    return DockerRuntime(
        extra_env=ctx.env,
        extra_labels={"gpusm.deployment": ctx.deployment},
        kind=ctx.kind,
        gpu_requests=ctx.gpu_backend == "nvml",
    )


# The runtime registry: a service's ``runtime:`` names its entry.
RUNTIMES: dict[str, RuntimeFactory] = {"native": _native, "docker": _docker}

# Always opened, so that recovery sees (and can reap) what it left behind.
_ALWAYS = ("native",)


def build_runtimes(
    config: Config, registry: Mapping[str, RuntimeFactory] | None = None
) -> dict[str, Runtime]:
    """One runtime per kind that ``config`` uses (native always), from ``registry``."""
    registry = RUNTIMES if registry is None else registry
    kinds = [k for k in _ALWAYS if k in registry]
    kinds += sorted({s.runtime for s in config.services.values()} - set(kinds))
    return {kind: open_runtime(config, kind, registry) for kind in kinds}


def open_runtime(
    config: Config, kind: str, registry: Mapping[str, RuntimeFactory] | None = None
) -> Runtime:
    """The runtime ``kind`` for ``config``'s deployment; ConfigError if none is registered."""
    registry = RUNTIMES if registry is None else registry
    if kind not in registry:
        raise ConfigError(
            str(config.source or "<config>"),
            "runtime",
            f"no runtime {kind!r} is registered",
            f"use one of {', '.join(sorted(registry))}",
        )
    deployment = deployment_id(config)
    env = {DEPLOYMENT_ENV: deployment}
    if config.gpu.backend == "sim":
        env["GPUSM_SIM_DIR"] = str(config.sim_dir)
    logs = config.state_dir / "logs"
    return registry[kind](RuntimeContext(kind, deployment, env, logs, config.gpu.backend))


# ---------------------------------------------------------------- the engine
def check_host_devices(config: Config, probe: GpuProbe) -> None:
    """ConfigError when a service names a device this host lacks, or fits on none it may
    use (checked at start-up: only the GPU knows how many devices it has, and how big).
    An unreadable GPU is left to recovery, which reports it."""
    from gpusm.config import check_devices

    try:
        count = probe.device_count()
        sizes = [probe.snapshot(d).total_mib for d in range(count)]
    except GpuProbeError:
        return
    check_devices(config, count, sizes)


def build_engine(
    config: Config,
    *,
    clock: Clock | None = None,
    registry: Mapping[str, RuntimeFactory] | None = None,
) -> Engine:
    """Open the store, the probe, the runtimes, the health checker and the service control
    (park and wake requests) for ``config``."""
    from gpusm.config import make_folder  # an unusable state_dir: a ConfigError, not OSError

    make_folder(config.state_dir, "state_dir", config.source)
    clock = clock or SystemClock()
    store = open_store(config)
    probe: GpuProbe | None = None
    try:
        probe = build_probe(config)
        check_host_devices(config, probe)
        runtimes = build_runtimes(config, registry)
    except BaseException:
        if probe is not None:
            probe.close()
        store.close()
        raise
    return Engine(
        config,
        store=store,
        probe=probe,
        runtimes=runtimes,
        health=Health(clock),
        control=HttpControl(),
        clock=clock,
        open_runtime=lambda kind: open_runtime(config, kind, registry),
    )


def open_coordinator(
    config: Config,
    *,
    clock: Clock | None = None,
    monitor: bool = True,
    registry: Mapping[str, RuntimeFactory] | None = None,
) -> Coordinator:
    """Lock the state directory, build the engine, recover, then start the monitor."""
    lock = StateDirLock(config.state_dir)
    lock.acquire()
    try:
        engine = build_engine(config, clock=clock, registry=registry)
    except BaseException:
        lock.release()
        raise
    return Coordinator.open(engine, monitor=monitor, on_close=lock.release)


# ``Coordinator.from_config`` opens through this module, whose import wires it.
set_opener(open_coordinator)
