"""The one place that turns a :class:`Config` into concrete adapters."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

from gpusm.clock import SystemClock
from gpusm.config import Config
from gpusm.core import Core
from gpusm.health import Health
from gpusm.ports import Clock, GpuProbe, Runtime
from gpusm.store.sql import SqlEventStore

__all__ = ["DEPLOYMENT_ENV", "build_core", "build_probe", "deployment_id"]

# Every service gpusm starts carries the id of the state directory that owns it, so two
# deployments on one machine never adopt or reap each other's processes.
DEPLOYMENT_ENV = "GPUSM_DEPLOYMENT"


def deployment_id(config: Config) -> str:
    """A short stable id for ``config.state_dir``."""
    return hashlib.sha256(str(config.state_dir).encode()).hexdigest()[:12]


def build_probe(config: Config) -> GpuProbe:
    """The GPU probe the config names (NVML, or the simulated GPU, created if new)."""
    if config.gpu.backend == "sim":
        from gpusm.gpu.sim import SimGpu, SimProbe

        sim = config.gpu.sim
        return SimProbe(SimGpu(config.sim_dir, sim.total_mib, sim.reclaim_lag_s))
    from gpusm.gpu.nvml import NvmlProbe

    return NvmlProbe()


def _runtimes(config: Config) -> dict[str, Runtime]:
    deployment = deployment_id(config)
    env = {DEPLOYMENT_ENV: deployment}
    if config.gpu.backend == "sim":
        env["GPUSM_SIM_DIR"] = str(config.sim_dir)

    def ours(environ: Mapping[str, str]) -> bool:
        # Processes inside our containers carry the same markers; Docker owns those.
        return (
            environ.get(DEPLOYMENT_ENV) == deployment and environ.get("GPUSM_RUNTIME") != "docker"
        )

    from gpusm.runtimes.native import NativeRuntime

    runtimes: dict[str, Runtime] = {
        "native": NativeRuntime(config.state_dir / "logs", extra_env=env, marker_filter=ours)
    }
    if any(s.runtime == "docker" for s in config.services.values()):
        from gpusm.runtimes.docker import DockerRuntime

        runtimes["docker"] = DockerRuntime(
            extra_env=env, extra_labels={"gpusm.deployment": deployment}
        )
    return runtimes


def build_core(config: Config, *, clock: Clock | None = None) -> Core:
    """Open the store, the probe, the runtimes and the health checker for ``config``."""
    from gpusm.core import Slot
    from gpusm.domain.machine import ServiceMachine

    config.state_dir.mkdir(parents=True, exist_ok=True)
    clock = clock or SystemClock()
    store = SqlEventStore(config.database_url)
    try:
        probe = build_probe(config)
    except BaseException:
        store.close()
        raise
    core = Core(
        config,
        store=store,
        probe=probe,
        runtimes=_runtimes(config),
        health=Health(clock),
        clock=clock,
    )
    for name, svc in config.services.items():
        core.slots[name] = Slot(config=svc, machine=ServiceMachine(name))
    return core
