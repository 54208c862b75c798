"""Pre-flight checks of a deployment: what ``gpusm doctor`` prints.

Config valid; GPU readable (NVML, or the simulated GPU); Docker reachable (only if a
docker service is configured); event database migrated; API port free or a daemon
answering; token readable. Each check says how to fix what it finds wrong.

Adapters come from :mod:`gpusm.wiring`, as everywhere else; the doctor builds none itself.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from gpusm.api.server import bind
from gpusm.client import daemon_url, find_daemon
from gpusm.config import Config, check_folders, find_config_path, load_config, require_services
from gpusm.errors import ConfigError, GpusmError
from gpusm.wire import TOKEN_ENV, parse_listen, read_token
from gpusm.wiring import build_probe, build_runtimes, store_revision

__all__ = ["Check", "run_checks"]

# The file a simulated GPU keeps its state in (gpusm.gpu.sim); present once it exists.
_SIM_STATE = "state.json"


@dataclass(frozen=True)
class Check:
    """One line of ``gpusm doctor``: what was checked, how it went, and how to fix it."""

    what: str
    ok: bool
    detail: str
    fix: str = ""


def _check_gpu(cfg: Config) -> Check:
    if cfg.gpu.backend == "sim":
        found = (cfg.sim_dir / _SIM_STATE).is_file()
        where = "exists" if found else "created at first start"
        return Check("GPU", True, f"simulated GPU at {cfg.sim_dir} ({where})")
    try:
        probe = build_probe(cfg)
        try:
            names = [probe.snapshot(i).name for i in range(probe.device_count())]
        finally:
            probe.close()
    except GpusmError as exc:
        fix = "install the NVIDIA driver and nvidia-ml-py, or set gpu.backend: sim"
        return Check("GPU", False, f"NVML cannot be used: {exc}", fix)
    if not names:
        return Check("GPU", False, "NVML sees no GPU", "check the driver (nvidia-smi)")
    return Check("GPU", True, f"NVML sees {len(names)} GPU(s): {', '.join(names)}")


def _check_docker(cfg: Config) -> Check:
    if not any(s.runtime == "docker" for s in cfg.services.values()):
        return Check("Docker", True, "not needed (no docker services configured)")
    try:
        runtimes = build_runtimes(cfg)
    except GpusmError as exc:
        return Check("Docker", False, str(exc), "check the services' runtime:")
    try:
        runtimes["docker"].find_orphans()
    except GpusmError as exc:
        return Check("Docker", False, str(exc), "start dockerd, or set DOCKER_HOST")
    finally:
        for runtime in runtimes.values():
            runtime.close()
    return Check("Docker", True, "the Docker engine answers")


def _check_database(cfg: Config) -> Check:
    url = cfg.database_url
    path = url.removeprefix("sqlite:///") if url.startswith("sqlite:///") else None
    if path is not None and not Path(path).exists():
        return Check("database", True, f"{path} not created yet; `gpusm serve` creates it")
    try:
        revision = store_revision(cfg)
    except GpusmError as exc:
        return Check("database", False, str(exc), "run `gpusm db upgrade`")
    return Check("database", True, f"{url} at schema revision {revision} (newest)")


def _check_api(cfg: Config, health: dict[str, object] | None) -> Check:
    url = daemon_url(cfg.api.listen)
    if health is not None:
        return Check("API", True, f"daemon answering at {url} ({health.get('status')})")
    try:
        bind(parse_listen(cfg.api.listen)).close()
    except GpusmError as exc:
        return Check("API", False, str(exc), "stop that program or change api.listen")
    return Check("API", True, f"no daemon yet; {cfg.api.listen} is free for `gpusm serve`")


def _check_token(cfg: Config, health: dict[str, object] | None) -> Check:
    path = cfg.token_path
    try:
        token = read_token(path)
    except ConfigError as exc:
        return Check("token", False, exc.problem, exc.fix)
    if token is None and health is not None:
        return Check(
            "token",
            False,
            f"the daemon runs but {path} does not exist (it may use ${TOKEN_ENV})",
            f"export {TOKEN_ENV}=<the daemon's token>",
        )
    if token is None:
        return Check("token", True, f"{path} is created (mode 0600) at the first `gpusm serve`")
    source = f"${TOKEN_ENV}" if os.environ.get(TOKEN_ENV, "").strip() else str(path)
    return Check("token", True, f"readable from {source}")


def run_checks(config: Path | None) -> list[Check]:
    """Every doctor check, in order; a bad config stops the rest."""
    path = find_config_path(config)
    try:
        cfg = require_services(load_config(path))
        check_folders(cfg)
    except ConfigError as exc:
        where = f"{exc.file}: {exc.key}" if exc.key else exc.file
        return [Check("config", False, f"{where}: {exc.problem}", exc.fix)]
    counts = f"{len(cfg.services)} services, {len(cfg.phases)} phases"
    checks = [Check("config", True, f"{path} is valid ({counts})")]
    health = find_daemon(daemon_url(cfg.api.listen))
    checks += [_check_gpu(cfg), _check_docker(cfg), _check_database(cfg)]
    checks += [_check_api(cfg, health), _check_token(cfg, health)]
    return checks
