"""``gpusm systemd-unit``: print a systemd unit that runs ``gpusm serve`` for a config.

The unit is ``Type=notify`` (``gpusm serve`` says ``READY=1`` once recovery has
finished and the API answers; see :mod:`gpusm.cli.sd_notify`) with ``KillMode=process``,
so stopping or restarting the daemon leaves the model servers running for the next
start to adopt. Its hardening leaves the GPU alone: no ``PrivateDevices=`` (it hides
``/dev/nvidia*``), and the file-system protections are inherited by the services, so
every folder they or gpusm write to stays writable.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Annotated

import typer

from gpusm.cli.common import ConfigOption, load
from gpusm.config import Config, DockerServiceConfig, NativeServiceConfig, find_config_path
from gpusm.version import VERSION

__all__ = ["gpusm_command", "register", "systemd_unit", "unit_text"]

# Where a user's files live: ProtectHome= would make them read-only for gpusm and
# for every service it starts.
_HOME_ROOTS = (Path("/home"), Path("/root"), Path("/run/user"))
# Before READY=1, recovery may resume a health wait or finish a stop for each service;
# this much more covers replay, the GPU reads and binding.
_START_MARGIN_S = 30
_MIN_START_TIMEOUT_S = 90
# uvicorn's graceful shutdown takes at most 10 s; closing the coordinator (which
# leaves the services running) is quick. --stop-on-exit is not used by this unit.
_STOP_TIMEOUT_S = 30


def gpusm_command() -> list[str]:
    """The absolute argv that runs this gpusm: its console script, else ``python -m gpusm``."""
    argv0 = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    if argv0 is not None and argv0.name == "gpusm" and _executable(argv0):
        return [os.path.abspath(argv0)]
    # The console script beside this interpreter (a virtual environment's bin/).
    beside = Path(sys.executable).parent / "gpusm"
    if _executable(beside):
        return [os.path.abspath(beside)]
    found = shutil.which("gpusm")
    if found is not None:
        return [os.path.abspath(found)]
    return [os.path.abspath(sys.executable), "-m", "gpusm"]


def unit_text(config: Config, config_path: Path, *, user: bool, command: list[str]) -> str:
    """The unit file for running ``command serve -c config_path`` under systemd."""
    docker = any(isinstance(s, DockerServiceConfig) for s in config.services.values())
    argv = [*command, "serve", "-c", str(config_path)]
    exec_start = " ".join(_quote(arg, command=True) for arg in argv)
    scope = "--user " if user else ""
    lines = [
        f"# Written by `gpusm systemd-unit {scope}-c {config_path}` (gpusm {VERSION}).",
        "[Unit]",
        "Description=gpusm: several GPU services on one GPU",
    ]
    if user:
        lines += [
            "# A user manager cannot order itself after system units (network, docker);",
            "# docker services need the user in the docker group.",
        ]
    elif docker:
        lines += [
            "# Docker services need the engine; Wants= starts it, Requires= would stop gpusm",
            "# whenever Docker restarts.",
            "After=network.target docker.service",
            "Wants=docker.service",
        ]
    else:
        lines.append("After=network.target")
    lines += [
        "",
        "[Service]",
        "# gpusm serve sends READY=1 once recovery is done and the API answers,",
        "# STOPPING=1 when it shuts down; only its own pid may notify.",
        "Type=notify",
        "NotifyAccess=main",
        f"ExecStart={exec_start}",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "# Stop and restart signal the daemon only: the model servers it started keep",
        "# running and the next start adopts them (recovery). `gpusm release --all`",
        "# before `systemctl stop` stops them too.",
        "KillMode=process",
        "Restart=on-failure",
        "RestartSec=2",
        "# Recovery may resume each service's health wait or finish its stop before READY=1.",
        f"TimeoutStartSec={_start_timeout_s(config)}",
        "TimeoutStopSec=" + str(_STOP_TIMEOUT_S),
        "# Print to the journal at once instead of in buffered blocks.",
        "Environment=PYTHONUNBUFFERED=1",
        *(_user_hardening() if user else _system_hardening(config)),
        "",
        "[Install]",
        "WantedBy=default.target" if user else "WantedBy=multi-user.target",
    ]
    return "\n".join(lines) + "\n"


def systemd_unit(
    user: Annotated[
        bool, typer.Option("--user", help="A unit for the per-user manager (systemctl --user).")
    ] = False,
    config: ConfigOption = None,
) -> None:
    """Print a systemd unit that runs `gpusm serve` for this config."""
    cfg = load(config)
    path = find_config_path(config).resolve()
    typer.echo(unit_text(cfg, path, user=user, command=gpusm_command()), nl=False)


def register(app: typer.Typer) -> None:
    """Add ``systemd-unit`` to ``app``."""
    app.command("systemd-unit")(systemd_unit)


# ---------------------------------------------------------------- internals
def _executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def _start_timeout_s(config: Config) -> int:
    settle = config.gpu.settle_timeout_s
    worst = sum(
        max(s.health.timeout_s, s.stop_timeout_s + settle) for s in config.services.values()
    )
    return max(_MIN_START_TIMEOUT_S, round(worst) + _START_MARGIN_S)


def _written_paths(config: Config) -> list[Path]:
    """Folders gpusm and its native services write to: they must stay writable."""
    found = [config.state_dir, config.sim_dir, config.token_path.parent]
    url = config.database_url
    if url.startswith("sqlite:///"):
        found.append(Path(url.removeprefix("sqlite:///")).parent)
    found += [
        s.cwd
        for s in config.services.values()
        if isinstance(s, NativeServiceConfig) and s.cwd is not None
    ]
    unique: list[Path] = []
    for path in (Path(os.path.abspath(p)) for p in found):
        # A folder inside one already listed is writable already.
        if not any(path == p or path.is_relative_to(p) for p in unique):
            unique = [p for p in unique if not p.is_relative_to(path)] + [path]
    return unique


def _under_home(config: Config) -> Path | None:
    """The first folder gpusm or a service uses under a home directory, if any."""
    candidates = list(_written_paths(config))
    for service in config.services.values():
        if isinstance(service, NativeServiceConfig) and Path(service.command[0]).is_absolute():
            candidates.append(Path(service.command[0]))
    for path in candidates:
        if any(path.is_relative_to(root) for root in _HOME_ROOTS):
            return path
    return None


def _system_hardening(config: Config) -> list[str]:
    writable = " ".join(_quote("-" + str(p)) for p in _written_paths(config))
    lines = [
        "# Hardening that keeps the GPU usable: no PrivateDevices= (it hides /dev/nvidia*),",
        "# no PrivateUsers= (it hides the docker group). The services inherit all of it.",
        "NoNewPrivileges=yes",
        "# /usr, /boot and /etc read-only, except the folders gpusm and its services",
        "# write (state, database, logs, each service's cwd; '-': created later is fine).",
        "ProtectSystem=full",
        f"ReadWritePaths={writable}",
    ]
    home = _under_home(config)
    if home is None:
        lines += [
            "# Nothing configured lives under /home or /root. The services inherit this too:",
            "# point their caches elsewhere (HF_HOME, XDG_CACHE_HOME) or delete the line.",
            "ProtectHome=read-only",
        ]
    else:
        lines.append(f"# No ProtectHome=: {home} is under a home directory.")
    return lines


def _user_hardening() -> list[str]:
    return [
        "# A user manager can only protect files through a private user namespace, which",
        "# would hide the docker group; the GPU needs no privileges, so none are gained.",
        "NoNewPrivileges=yes",
    ]


def _quote(arg: str, *, command: bool = False) -> str:
    """``arg`` as one word of a unit setting: % escaped, and $ too on a ``command`` line."""
    escaped = arg.replace("%", "%%")
    if command:
        escaped = escaped.replace("$", "$$")
    if escaped and not any(c.isspace() or c in "\"'\\;" for c in escaped):
        return escaped
    return '"' + escaped.replace("\\", "\\\\").replace('"', '\\"') + '"'
