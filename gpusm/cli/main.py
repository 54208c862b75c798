"""The ``gpusm`` application: registers each command group's module."""

from __future__ import annotations

import importlib
import os
import sys

import typer

__all__ = ["app", "main"]

app = typer.Typer(
    name="gpusm",
    help="Run several GPU services on one GPU without running out of VRAM.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Each module exposes register(app); listed here so the command set is visible in one place.
_COMMAND_MODULES = [
    "gpusm.cli.config_cmd",
    "gpusm.cli.events_cmd",
    "gpusm.cli.sim_cmd",
    "gpusm.cli.serve_cmd",
    "gpusm.cli.ops_cmd",
    "gpusm.cli.demo_cmd",
    "gpusm.cli.systemd_cmd",
    "gpusm.cli.reload_cmd",
    "gpusm.cli.timeline_cmd",
]

for _name in _COMMAND_MODULES:
    try:
        _module = importlib.import_module(_name)
    except ModuleNotFoundError as exc:  # pragma: no cover - only while a module is being written
        if exc.name != _name:
            raise
        continue
    _module.register(app)


def main() -> None:
    """Console-script entry point."""
    # Piped output is read by people too (CI logs, `| less`): give it more than Rich's
    # 80 columns; an explicit $COLUMNS still wins.
    if not sys.stdout.isatty():
        os.environ.setdefault("COLUMNS", "160")
    app()
