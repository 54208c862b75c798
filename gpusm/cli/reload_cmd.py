"""``gpusm reload``: make the running daemon apply its config file again, without a restart."""

from __future__ import annotations

from typing import Annotated

import typer

from gpusm.cli.common import EXIT_CONFIG, EXIT_ERROR, ConfigOption, fail, friendly_errors, load, say
from gpusm.client import Client, daemon_url, find_daemon
from gpusm.errors import ReloadRefused

__all__ = ["register"]


def reload(
    config: ConfigOption = None,
    by: Annotated[str, typer.Option(help="Who asks (recorded in the event log).")] = "cli",
) -> None:
    """Re-read the config file in the daemon: unchanged services keep running, changed
    ones restart when idle, removed ones stop, new ones are available at once."""
    cfg = load(config)
    url = daemon_url(cfg.api.listen)
    if find_daemon(url) is None:
        fail(
            f"no daemon answers at {url}: start it with `gpusm serve` (a config change "
            "needs no reload when nothing runs)",
            EXIT_ERROR,
        )
    with friendly_errors(), Client(url, token_file=cfg.token_path) as client:
        try:
            result = client.reload(by=by)
        except ReloadRefused as exc:
            fail(f"reload refused: {exc}", EXIT_CONFIG)  # the file needs fixing
    say(f"config reloaded ({result.config_hash})")
    for label, names in (
        ("changed (restart once idle)", result.changed),
        ("added", result.added),
        ("removed (stopped)", result.removed),
        ("unchanged", result.unchanged),
    ):
        say(f"  {label}: {', '.join(names) or 'none'}")
    if result.phases_changed:
        say("  phases or pipeline: changed")


def register(app: typer.Typer) -> None:
    """Add ``reload`` to ``app``."""
    app.command("reload")(reload)
