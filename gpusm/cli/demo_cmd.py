"""``gpusm demo``: the plan's pipeline on a simulated GPU, with a live view and a summary."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.live import Live
from rich.table import Table
from rich.text import Text

from gpusm.cli.common import EXIT_ERROR, console, friendly_errors, is_tty, plain, say
from gpusm.engine.coordinator import Coordinator
from gpusm.results import PhaseResult

__all__ = ["register"]


def _view(item: int, items: int, phase: str, coordinator: Coordinator) -> Table:
    status = coordinator.status()
    device = status.devices[0]
    width = 40
    filled = round(width * device.used_mib / device.total_mib) if device.total_mib else 0
    # Text, not markup: the VRAM bar's "[###" would otherwise be read as a style tag.
    title = Text.assemble(
        f"item {item}/{items}  phase ",
        plain(phase, style="bold"),
        f"  VRAM [{'#' * filled}{'.' * (width - filled)}] {device.used_mib}/{device.total_mib} MiB",
    )
    table = Table(title=title, title_justify="left")
    for column in ("service", "state", "VRAM MiB", "priority", "pid"):
        table.add_column(column)
    for svc in status.services:
        colour = {"healthy": "green", "starting": "yellow", "draining": "magenta"}.get(
            svc.state, "dim"
        )
        table.add_row(
            plain(svc.name),
            plain(svc.state, style=colour),
            str(svc.used_mib),
            str(svc.priority),
            str(svc.pid or ""),
        )
    return table


def demo(
    items: Annotated[int, typer.Option(min=1, max=50, help="Pipeline items to process.")] = 3,
    folder: Annotated[
        Path, typer.Option("--dir", help="Where the demo's config and database go.")
    ] = Path("gpusm-demo"),
    work_s: Annotated[float, typer.Option(min=0, help="Worker's CPU work per phase.")] = 0.3,
) -> None:
    """Run crawl → analysis → tts → video → render on a simulated 24 GiB GPU."""
    from gpusm.demo import run_demo

    say(
        f"gpusm demo: {items} item(s) through the plan's pipeline on a simulated 24 GiB GPU "
        f"(config and database in {folder}/)"
    )
    live = Live(console=console, auto_refresh=False, transient=False) if is_tty() else None

    def on_phase(item: int, phase: str, result: PhaseResult, coordinator: Coordinator) -> None:
        if live is not None:
            live.update(_view(item, items, phase, coordinator), refresh=True)
            return
        started = " ".join(f"+{name}" for name in result.started)
        stopped = " ".join(
            f"{'~' if s.action == 'park' else '-'}{s.service}({s.kind})" for s in result.stopped
        )
        say(
            f"item {item} {phase:<8} {result.waited_s:5.2f}s  free {result.free_after_mib:>5} MiB"
            f"  {started} {stopped}".rstrip()
        )

    with friendly_errors():
        if live is not None:
            with live:
                summary = run_demo(folder, items=items, work_s=work_s, on_phase=on_phase)
        else:
            summary = run_demo(folder, items=items, work_s=work_s, on_phase=on_phase)

    table = Table(title="summary", title_justify="left")
    table.add_column("phase")
    table.add_column("entries", justify="right")
    table.add_column("total s", justify="right")
    table.add_column("mean s", justify="right")
    for phase, times in summary.phase_seconds.items():
        table.add_row(
            plain(phase), str(len(times)), f"{sum(times):.2f}", f"{sum(times) / len(times):.2f}"
        )
    console.print(table)
    peak = summary.peak_used_mib
    say(
        f"starts {summary.starts}, evictions {summary.evictions}, preemptions "
        f"{summary.preemptions}, release stops {summary.releases}; "
        f"peak VRAM {peak} / {summary.total_mib} MiB ({100 * peak / summary.total_mib:.0f}%); "
        f"slowest reclaim {summary.max_reclaim_s:.3f}s; OOMs: {summary.ooms}; "
        f"wall {summary.wall_s:.1f}s"
    )
    say(f"audit it: gpusm events -c {summary.config}")
    say(f"          gpusm history comfyui -c {summary.config}")
    if summary.ooms:
        raise typer.Exit(EXIT_ERROR)


def register(app: typer.Typer) -> None:
    """Add ``demo`` to ``app``."""
    app.command("demo")(demo)
