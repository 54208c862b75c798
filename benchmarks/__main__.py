"""``python -m benchmarks [--quick] [--only 1,4]``: run the benchmarks, print the table.

Writes ``benchmarks/results/latest.json`` (or ``--out``); a full run of every figure
also refreshes the table in ``benchmarks/README.md``. Progress goes to stderr, the
Markdown table to stdout. Exit status: 0 when every figure was measured, 1 when one
could not be (a missed goal is a result, not an error, unless ``--strict``).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from benchmarks.common import Ctx, ProcessGuard, Row
from benchmarks.report import header, machine, markdown_table, update_readme, write_json

__all__ = ["FIGURES", "main"]

HERE = Path(__file__).resolve().parent
# Figure number -> module; run in this order (7 and 8 after the others: they need the API,
# written last; 9, the parked tier, and 10, placement on several devices, came later).
FIGURES: dict[str, str] = {
    "1": "benchmarks.append",
    "2": "benchmarks.recovery",
    "3": "benchmarks.noop_phase",
    "4": "benchmarks.switch",
    "5": "benchmarks.reclaim",
    "6": "benchmarks.pipeline",
    "7": "benchmarks.status_api",
    "8": "benchmarks.busy_host",
    "9": "benchmarks.parking",
    "10": "benchmarks.placement",
    "11": "benchmarks.proxy",
    "12": "benchmarks.sse_fanout",
}


def _log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a ~1 minute smoke run")
    parser.add_argument(
        "--only", default="", help="comma-separated figure numbers to run (default: all)"
    )
    parser.add_argument(
        "--out", type=Path, default=HERE / "results" / "latest.json", help="JSON results file"
    )
    parser.add_argument(
        "--busy-procs",
        type=int,
        default=None,
        help="idle processes figure 8 adds (default: 2000, 500 with --quick)",
    )
    parser.add_argument(
        "--strict", action="store_true", help="exit 2 when a goal is missed (for CI)"
    )
    args = parser.parse_args(argv)
    chosen = [f.strip() for f in args.only.split(",") if f.strip()] or list(FIGURES)
    unknown = [f for f in chosen if f not in FIGURES]
    if unknown:
        parser.error(f"unknown figure(s) {', '.join(unknown)}; choose from {', '.join(FIGURES)}")
    args.figures = chosen
    return args


def _error_row(number: str, exc: BaseException) -> Row:
    return Row(
        figure=f"{number}. (failed)",
        gpusm=f"error: {type(exc).__name__}: {exc}"[:200],
        baseline="—",
        ratio=None,
        goal="—",
        met=None,
    )


def main(argv: list[str] | None = None) -> int:
    """Run the chosen figures; returns the exit status."""
    args = _parse(argv)
    mode = "quick" if args.quick else "full"
    started = datetime.now(UTC)
    began = time.perf_counter()
    guard = ProcessGuard()
    rows: list[Row] = []
    errors: list[str] = []
    with tempfile.TemporaryDirectory(prefix="gpusm-bench-") as tmp:
        ctx = Ctx(quick=args.quick, work=Path(tmp), guard=guard, log=_log)
        if args.busy_procs is not None:
            ctx.shared["busy_procs"] = args.busy_procs
        try:
            for number in args.figures:
                t0 = time.perf_counter()
                _log(f"figure {number} ({FIGURES[number]}) ...")
                try:
                    run: Callable[[Ctx], list[Row]] = importlib.import_module(FIGURES[number]).run
                    rows += run(ctx)
                except Exception as exc:
                    errors.append(f"figure {number}: {traceback.format_exc()}")
                    rows.append(_error_row(number, exc))
                    _log(f"figure {number} failed: {exc!r}")
                finally:
                    guard.stop_all()
                _log(f"figure {number} done in {time.perf_counter() - t0:.1f} s")
        finally:
            guard.stop_all()
    wall = time.perf_counter() - began
    write_json(args.out, rows, mode, started, wall, errors)
    table = markdown_table(rows)
    text = header(mode, started, wall, machine()) + "\n\n" + table
    print(text)
    full = mode == "full" and args.figures == list(FIGURES) and not errors
    if full and update_readme(HERE / "README.md", text):
        _log("benchmarks/README.md table updated")
    _log(f"wrote {args.out} ({wall:.0f} s in all)")
    if errors:
        for e in errors:
            print(e, file=sys.stderr)
        return 1
    if args.strict and any(r.met is False for r in rows):
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
