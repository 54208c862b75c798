"""``gpusm config check`` and ``gpusm config schema``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from gpusm.cli.common import ConfigOption, friendly_errors, load, say
from gpusm.config import Config, check_folders

__all__ = ["register"]

config_app = typer.Typer(
    help="Check the config file, or print its JSON Schema.", no_args_is_help=True
)


@config_app.command("check")
def check(
    file: Annotated[
        Path | None, typer.Argument(help="Config file to check.", show_default=False)
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Validate a config file; exit 2 with the key and the fix if it is wrong.

    Refused here is everything that a later command would refuse because of the file:
    its keys and values, and folders (state_dir, …) that could not be created.
    """
    cfg = load(file or config)
    with friendly_errors():
        check_folders(cfg)
    services = ", ".join(
        f"{name} ({svc.runtime}, {svc.vram_mib} MiB, priority {svc.priority})"
        for name, svc in cfg.services.items()
    )
    say(f"OK: {cfg.source}")
    say(f"  gpu: {cfg.gpu.backend}, reserve {cfg.gpu.reserve_mib} MiB")
    say(f"  services: {services or 'none'}")
    say(f"  phases: {', '.join(cfg.phases) or 'none'}")
    if cfg.pipeline:
        say(f"  pipeline: {' -> '.join(cfg.pipeline)}")


@config_app.command("schema")
def schema() -> None:
    """Print the config file's JSON Schema (for editor completion)."""
    doc = Config.model_json_schema()
    doc["properties"].pop("source", None)
    doc["title"] = "gpusm configuration"
    typer.echo(json.dumps(doc, indent=2))


def register(app: typer.Typer) -> None:
    """Add the ``config`` group to ``app``."""
    app.add_typer(config_app, name="config")
