"""The results: a Markdown table, ``results/latest.json``, and the table in the README."""

from __future__ import annotations

import json
import os
import platform
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks.common import Row

__all__ = ["header", "machine", "markdown_table", "update_readme", "write_json"]

README_START = "<!-- bench:table:start -->"
README_END = "<!-- bench:table:end -->"


def machine() -> dict[str, Any]:
    """Where the numbers come from: cores, CPU model, Python, OS."""
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0)
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()}",
        "loadavg_at_end": [round(x, 2) for x in load],
    }


def _ratio(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.3g}"


def _met(value: bool | None) -> str:
    return {True: "yes", False: "**no**", None: "—"}[value]


def markdown_table(rows: list[Row]) -> str:
    """The table: figure, gpusm, baseline, ratio, goal, met?"""
    lines = [
        "| figure | gpusm | baseline | ratio | goal | met? |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [r.figure, r.gpusm, r.baseline, _ratio(r.ratio), r.goal, _met(r.met)]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def header(mode: str, started: datetime, wall_s: float, info: dict[str, Any]) -> str:
    """One line saying when, where and how the table was measured."""
    return (
        f"Measured {started.strftime('%Y-%m-%d %H:%M UTC')}, mode `{mode}`, "
        f"{wall_s:.0f} s, on {info['nproc']} x {info['cpu']} "
        f"(Python {info['python']}, {info['os']}, load average at end "
        f"{', '.join(str(x) for x in info['loadavg_at_end'])})."
    )


def write_json(
    path: Path, rows: list[Row], mode: str, started: datetime, wall_s: float, errors: list[str]
) -> dict[str, Any]:
    """Write every row with its raw numbers, and the machine, to ``path``."""
    doc = {
        "date": started.isoformat(timespec="seconds"),
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        "mode": mode,
        "wall_s": round(wall_s, 1),
        "machine": machine(),
        "errors": errors,
        "rows": [r.as_dict() for r in rows],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    return doc


def update_readme(readme: Path, text: str) -> bool:
    """Replace the table between the README's markers with ``text``; False if no markers."""
    try:
        content = readme.read_text()
    except OSError:
        return False
    pattern = re.compile(re.escape(README_START) + r".*?" + re.escape(README_END), re.DOTALL)
    if not pattern.search(content):
        return False
    block = f"{README_START}\n{text}\n{README_END}"
    readme.write_text(pattern.sub(lambda _: block, content))
    return True
