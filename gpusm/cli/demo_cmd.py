"""``gpusm demo``: the plan's pipeline on simulated GPUs, with a live view and a summary."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.live import Live
from rich.table import Table
from rich.text import Text

from gpusm.cli.common import EXIT_ERROR, console, friendly_errors, is_tty, plain, say
from gpusm.engine.coordinator import Coordinator
from gpusm.results import DeviceStatus, PhaseResult

__all__ = ["register"]


def _bar(device: DeviceStatus, width: int = 40) -> str:
    filled = round(width * device.used_mib / device.total_mib) if device.total_mib else 0
    return f"[{'#' * filled}{'.' * (width - filled)}] {device.used_mib}/{device.total_mib} MiB"


def _view(item: int, items: int, phase: str, coordinator: Coordinator) -> Table:
    status = coordinator.status()
    several = len(status.devices) > 1
    # Text, not markup: the VRAM bar's "[###" would otherwise be read as a style tag.
    title = Text.assemble(f"item {item}/{items}  phase ", plain(phase, style="bold"))
    if several:
        for device in status.devices:
            title.append(f"\n  GPU {device.index} {_bar(device, width=20)}")
    else:
        title.append(f"  VRAM {_bar(status.devices[0])}")
    table = Table(title=title, title_justify="left")
    columns = ("service", "state", "GPU", "VRAM MiB", "priority", "pid")
    for column in columns if several else tuple(c for c in columns if c != "GPU"):
        table.add_column(column)
    for svc in status.services:
        colour = {"healthy": "green", "starting": "yellow", "draining": "magenta"}.get(
            svc.state, "dim"
        )
        row: list[Text | str] = [
            plain(svc.name),
            plain(svc.state, style=colour),
            str(svc.used_mib),
            str(svc.priority),
            str(svc.pid or ""),
        ]
        if several:
            on = ",".join(str(d) for d in svc.devices) if svc.state != "stopped" else ""
            row.insert(2, on)
        table.add_row(*row)
    return table


def _per_device(coordinator: Coordinator) -> str:
    """One device's use per word (``gpu0 8192/24576``), for the plain (non-TTY) lines."""
    return " ".join(
        f"gpu{d.index} {d.used_mib}/{d.total_mib}" for d in coordinator.status().devices
    )


def demo(
    items: Annotated[int, typer.Option(min=1, max=50, help="Pipeline items to process.")] = 3,
    folder: Annotated[
        Path, typer.Option("--dir", help="Where the demo's config and database go.")
    ] = Path("gpusm-demo"),
    work_s: Annotated[float, typer.Option(min=0, help="Worker's CPU work per phase.")] = 0.3,
    devices: Annotated[
        int,
        typer.Option(min=1, max=8, help="Simulated 24 GiB GPUs; services go to any (gpu: auto)."),
    ] = 1,
) -> None:
    """Run crawl → analysis → tts → video → render on simulated 24 GiB GPUs."""
    from gpusm.demo import run_demo

    gpus = "a simulated 24 GiB GPU" if devices == 1 else f"{devices} simulated 24 GiB GPUs"
    say(
        f"gpusm demo: {items} item(s) through the plan's pipeline on {gpus} "
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
        line = (
            f"item {item} {phase:<8} {result.waited_s:5.2f}s  free {result.free_after_mib:>5} MiB"
            f"  {started} {stopped}".rstrip()
        )
        if devices > 1:
            line += f"  [{_per_device(coordinator)}]"
        say(line)

    with friendly_errors():
        if live is not None:
            with live:
                summary = run_demo(
                    folder, items=items, work_s=work_s, on_phase=on_phase, devices=devices
                )
        else:
            summary = run_demo(
                folder, items=items, work_s=work_s, on_phase=on_phase, devices=devices
            )

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
        f"starts {summary.starts}, parks {summary.parks}, wakes {summary.wakes}, evictions "
        f"{summary.evictions}, preemptions {summary.preemptions}, release stops "
        f"{summary.releases}; "
        f"peak VRAM {peak} / {summary.total_mib} MiB ({100 * peak / summary.total_mib:.0f}%); "
        f"slowest reclaim {summary.max_reclaim_s:.3f}s; OOMs: {summary.ooms}; "
        f"wall {summary.wall_s:.1f}s"
    )
    if devices > 1:
        for index, (device_peak, total) in enumerate(
            zip(summary.device_peak_mib, summary.device_total_mib, strict=True)
        ):
            say(
                f"  GPU {index}: peak {device_peak} / {total} MiB "
                f"({100 * device_peak / total:.0f}%)"
            )
    say(f"timeline: {summary.timeline}")
    say(f"audit it: gpusm events -c {summary.config}")
    say(f"          gpusm history comfyui -c {summary.config}")
    say(f"          gpusm timeline -c {summary.config} -o timeline.svg")
    if summary.ooms:
        raise typer.Exit(EXIT_ERROR)


def register(app: typer.Typer) -> None:
    """Add ``demo`` to ``app``."""
    app.command("demo")(demo)
