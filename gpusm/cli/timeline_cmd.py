"""``gpusm timeline -o FILE.svg|.html|.png``: the dashboard's VRAM timeline, offline.

Reads the event database named by the config (never created; migrated like every
command does) or ``--db FILE`` (e.g. a copy attached to an issue: only read), folds it with
:func:`gpusm.timeline.read_timeline` and writes the chart: ``.svg`` (pure Python),
``.html`` (a self-contained page: the SVG, a table of the markers, no script, nothing
loaded) or ``.png`` (that page photographed by headless Chromium, which must be
installed: ``apt-get install chromium``, or ``$GPUSM_CHROMIUM``).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer

from gpusm.cli.common import EXIT_CONFIG, EXIT_ERROR, ConfigOption, fail, friendly_errors, load, say
from gpusm.config import Config, sqlite_file
from gpusm.timeline import Timeline, read_timeline, render_html, render_svg
from gpusm.wiring import open_store

__all__ = ["find_chromium", "register", "write_timeline"]

FORMATS = (".svg", ".html", ".htm", ".png")
_BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
_PNG_TIMEOUT_S = 60


def find_chromium() -> str | None:
    """The Chromium to photograph pages with: ``$GPUSM_CHROMIUM``, else one on the PATH."""
    chosen = os.environ.get("GPUSM_CHROMIUM")
    if chosen:
        return shutil.which(chosen)
    return next((found for name in _BROWSERS if (found := shutil.which(name))), None)


def _time(value: str | None, option: str) -> datetime | None:
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
        return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)
    except (OverflowError, ValueError):
        fail(
            f"{option}: {value!r} is not an ISO-8601 time; write e.g. 2026-01-31T12:00:00Z "
            "or 2026-01-31 (times without a zone are UTC)",
            EXIT_CONFIG,
        )


def _png(svg: str, output: Path, chromium: str) -> None:
    """Photograph ``svg`` with headless Chromium into ``output``."""
    size = re.search(r'width="(\d+)" height="(\d+)"', svg)
    width, height = (int(size.group(1)), int(size.group(2))) if size else (1100, 800)
    with tempfile.TemporaryDirectory(prefix="gpusm-timeline-") as work:
        page = Path(work) / "timeline.html"
        page.write_text(
            '<!doctype html><html><head><meta charset="utf-8"><style>body{margin:0}</style>'
            f"</head><body>{svg}</body></html>",
            encoding="utf-8",
        )
        command = [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            f"--user-data-dir={Path(work) / 'profile'}",
            f"--window-size={width},{height}",
            f"--screenshot={output.resolve()}",
            page.as_uri(),
        ]
        try:
            done = subprocess.run(
                command, capture_output=True, text=True, timeout=_PNG_TIMEOUT_S, check=False
            )
        except subprocess.TimeoutExpired:
            fail(f"{chromium} took over {_PNG_TIMEOUT_S}s to draw the PNG; write .svg instead")
        if done.returncode != 0 or not output.exists():
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            fail(f"{chromium} could not draw the PNG (exit {done.returncode}: {last})")


def write_timeline(
    timeline: Timeline, output: Path, *, now: datetime, names: list[str], title: str = ""
) -> None:
    """Write ``timeline`` to ``output`` as its suffix says (see the module docstring)."""
    suffix = output.suffix.lower()
    if suffix in (".html", ".htm"):
        output.write_text(render_html(timeline, now=now, names=names, title=title), "utf-8")
    elif suffix == ".svg":
        output.write_text(render_svg(timeline, now=now, names=names, title=title), "utf-8")
    else:
        chromium = find_chromium()
        if chromium is None:
            fail("writing .png needs Chromium (apt-get install chromium); or write .svg or .html")
        _png(render_svg(timeline, now=now, names=names, title=title), output, chromium)


def _database(config: Path | None, db: Path | None) -> tuple[Config, list[str]]:
    """The config to read the log of, and the configured service names (for colours)."""
    if db is not None:
        if not db.is_file():
            fail(f"--db: no database at {db}", EXIT_CONFIG)
        return Config(database=f"sqlite:///{db.resolve()}"), []
    cfg = load(config)
    found = sqlite_file(cfg.database_url)
    if found is not None and not found.is_file():
        fail(
            f"no event database at {found} yet: nothing has run with this config "
            "(gpusm serve or gpusm demo records one), or pass --db FILE",
            EXIT_ERROR,
        )
    return cfg, list(cfg.services)


def timeline(
    output: Annotated[
        Path,
        typer.Option(
            "--output",
            "-o",
            help="Where to write: FILE.svg, FILE.html or FILE.png.",
            dir_okay=False,
        ),
    ],
    since: Annotated[
        str | None, typer.Option(help="From this ISO-8601 time (no zone = UTC).")
    ] = None,
    until: Annotated[str | None, typer.Option(help="Up to this ISO-8601 time.")] = None,
    device: Annotated[int | None, typer.Option(min=0, help="Only this GPU.")] = None,
    db: Annotated[
        Path | None,
        typer.Option(help="Read this event database file instead of the config's.", dir_okay=False),
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Draw the VRAM timeline (who held which GPU's memory when, and why things stopped)."""
    if output.suffix.lower() not in FORMATS:
        fail(
            f"-o: {str(output)!r} must end in .svg, .html or .png (the format to write)",
            EXIT_CONFIG,
        )
    if not output.parent.is_dir():
        fail(f"-o: the folder {output.parent} does not exist", EXIT_CONFIG)
    since_at, until_at = _time(since, "--since"), _time(until, "--until")
    if since_at is not None and until_at is not None and since_at > until_at:
        fail(f"--since ({since}) is after --until ({until}); swap them", EXIT_CONFIG)
    if output.suffix.lower() == ".png" and find_chromium() is None:
        fail("writing .png needs Chromium (apt-get install chromium); or write .svg or .html")
    cfg, names = _database(config, db)
    now = datetime.now(UTC)
    with friendly_errors():
        # The config's own database is migrated like every command does; a --db file
        # (perhaps someone else's) is only read.
        store = open_store(cfg, upgrade=db is None)
        try:
            found = read_timeline(
                store.read,
                services=[*cfg.services, *store.heads()],
                now=now,
                since=since_at,
                until=until_at,
                declared={name: svc.vram_mib for name, svc in cfg.services.items()},
            )
        finally:
            store.close()
        if device is not None:
            known = [d.index for d in found.devices]
            if device not in known:
                listed = ", ".join(map(str, known)) or "none"
                fail(
                    f"--device: the log mentions no GPU {device} (it mentions: {listed})",
                    EXIT_CONFIG,
                )
            found = found.for_device(device)
        write_timeline(found, output, now=now, names=names)
    say(
        f"wrote {output}: {len(found.segments)} segment(s), {len(found.markers)} marker(s) "
        f"on {len(found.devices)} GPU(s)"
    )


def register(app: typer.Typer) -> None:
    """Add ``timeline`` to ``app``."""
    app.command("timeline")(timeline)
