"""``gpusm config check`` and ``gpusm config schema``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from gpusm.cli.common import ConfigOption, console, load
from gpusm.config import Config

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
    """Validate a config file; exit 2 with the key and the fix if it is wrong."""
    cfg = load(file or config)
    services = ", ".join(
        f"{name} ({svc.runtime}, {svc.vram_mib} MiB, priority {svc.priority})"
        for name, svc in cfg.services.items()
    )
    console.print(f"OK: {cfg.source}")
    console.print(f"  gpu: {cfg.gpu.backend}, reserve {cfg.gpu.reserve_mib} MiB")
    console.print(f"  services: {services or 'none'}")
    console.print(f"  phases: {', '.join(cfg.phases) or 'none'}")
    if cfg.pipeline:
        console.print(f"  pipeline: {' -> '.join(cfg.pipeline)}")


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
