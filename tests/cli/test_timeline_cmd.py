"""``gpusm timeline -o FILE.svg|.html|.png`` against a real SQLite file of recorded events."""

from __future__ import annotations

import shutil
import xml.etree.ElementTree as ET
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from gpusm.cli.timeline_cmd import find_chromium, register
from gpusm.domain.events import NewEvent
from gpusm.store import SqlEventStore

T0 = datetime(2026, 1, 31, 12, 0, tzinfo=UTC)
SVG = "{http://www.w3.org/2000/svg}"
EVICTED = "idle, priority 10, to make room for img (client w, phase video)"


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


@pytest.fixture
def app() -> typer.Typer:
    app = typer.Typer()
    register(app)
    app.command("other")(lambda: None)  # two commands: invoked by name, as in gpusm
    return app


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "gpusm.yaml"
    services = "".join(
        f"  {name}:\n    command: [sleep, '100']\n    vram_mib: {vram}\n"
        f"    health: {{tcp: '127.0.0.1:{port}'}}\n"
        for name, vram, port in (("llm", 18000, 9001), ("img", 20000, 9002))
    )
    path.write_text(f"state_dir: ./state\ngpu: {{backend: sim}}\nservices:\n{services}")
    return path


@pytest.fixture
def db(config: Path) -> Path:
    """The config's database with: llm runs 0-10 s (evicted at 9 s), img runs 10 s on."""
    path = config.parent / "state" / "gpusm.db"
    store = SqlEventStore(f"sqlite:///{path}")
    versions: dict[str, int] = {}

    def event(stream: str, type: str, s: float, move: tuple[str, str], **data: Any) -> NewEvent:
        versions[stream] = versions.get(stream, 0) + 1
        return NewEvent(stream, versions[stream], type, at(s), move[0], move[1], data)

    gpu = {"gpu": 0, "devices": [0], "free_mib": 24576, "used_mib": 0}
    store.append(
        [
            event("llm", "StartRequested", 0, ("stopped", "starting"), **gpu),
            event("llm", "HealthPassed", 1, ("starting", "healthy")),
            event("llm", "Evicted", 9, ("healthy", "draining"), reason=EVICTED),
            event("llm", "Stopped", 10, ("draining", "stopped")),
            event("img", "StartRequested", 10, ("stopped", "starting"), **gpu),
            event("img", "HealthPassed", 12, ("starting", "healthy")),
        ]
    )
    store.close()
    return path


def _run(app: typer.Typer, *args: str) -> Any:
    result = CliRunner().invoke(app, ["timeline", *args])
    # Never a traceback: every refusal is an exit with a line.
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result


def test_svg_has_a_lane_bar_per_start_and_stop_and_a_marker_titled_with_the_reason(
    app: typer.Typer, config: Path, db: Path, tmp_path: Path
) -> None:
    out = tmp_path / "t.svg"
    result = _run(app, "-c", str(config), "-o", str(out))
    assert result.exit_code == 0, result.output
    assert "2 segment(s), 1 marker(s) on 1 GPU(s)" in result.output
    root = ET.fromstring(out.read_text())
    bars = {
        (r.get("data-service"), r.get("data-start"), r.get("data-end"))
        for r in root.iter(f"{SVG}rect")
        if r.get("class") == "segment"
    }
    assert ("llm", at(0).isoformat(), at(10).isoformat()) in bars
    assert {b[0] for b in bars} == {"llm", "img"}
    markers = [g for g in root.iter(f"{SVG}g") if "marker" in (g.get("class") or "")]
    assert len(markers) == 1
    title = markers[0].find(f"{SVG}title")
    assert title is not None
    assert EVICTED in (title.text or "")
    areas = [p.get("data-service") for p in root.iter(f"{SVG}polygon")]
    assert sorted(areas) == ["img", "llm"]


def test_html_is_self_contained_and_lists_the_markers(
    app: typer.Typer, config: Path, db: Path, tmp_path: Path
) -> None:
    out = tmp_path / "t.html"
    assert _run(app, "-c", str(config), "-o", str(out)).exit_code == 0
    page = out.read_text()
    assert "<svg" in page
    assert EVICTED in page
    for loads in ("<script", "src=", "href=", "@import", "url("):
        assert loads not in page


def test_since_until_and_device_narrow_the_chart(
    app: typer.Typer, config: Path, db: Path, tmp_path: Path
) -> None:
    out = tmp_path / "t.svg"
    since, until = at(11).isoformat(), at(20).isoformat()
    args = ["-c", str(config), "-o", str(out), "--since", since, "--until", until]
    result = _run(app, *args, "--device", "0")
    assert result.exit_code == 0, result.output
    assert "1 segment(s), 0 marker(s)" in result.output


def test_the_db_option_reads_a_database_file_without_a_config(
    app: typer.Typer, db: Path, tmp_path: Path
) -> None:
    out = tmp_path / "t.svg"
    result = _run(app, "--db", str(db), "-o", str(out))
    assert result.exit_code == 0, result.output
    assert out.read_text().startswith("<svg")


@pytest.mark.parametrize(
    ("args", "code", "words"),
    [
        (["-o", "t.pdf"], 2, "must end in .svg, .html or .png"),
        (["-o", "no/such/folder/t.svg"], 2, "does not exist"),
        (["-o", "t.svg", "--since", "2026-02-01", "--until", "2026-01-01"], 2, "swap them"),
        (["-o", "t.svg", "--since", "noon"], 2, "not an ISO-8601 time"),
        (["-o", "t.svg", "--device", "3"], 2, "no GPU 3 (it mentions: 0)"),
        (["-o", "t.svg", "--db", "missing.db"], 2, "no database at missing.db"),
    ],
)
def test_bad_input_is_one_clear_line(
    app: typer.Typer,
    config: Path,
    db: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    args: list[str],
    code: int,
    words: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    result = _run(app, "-c", str(config), *args)
    assert result.exit_code == code, result.output
    assert words in " ".join(result.output.split())


def test_no_database_yet_says_so_instead_of_creating_one(
    app: typer.Typer, config: Path, tmp_path: Path
) -> None:
    result = _run(app, "-c", str(config), "-o", str(tmp_path / "t.svg"))
    assert result.exit_code == 1
    assert "no event database" in result.output
    assert not (config.parent / "state" / "gpusm.db").exists()


def test_png_without_chromium_names_what_to_install(
    app: typer.Typer, config: Path, db: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GPUSM_CHROMIUM", str(tmp_path / "no-chromium"))
    result = _run(app, "-c", str(config), "-o", str(tmp_path / "t.png"))
    assert result.exit_code == 1
    assert "apt-get install chromium" in result.output
    assert ".svg" in result.output


@pytest.mark.skipif(
    find_chromium() is None and shutil.which("chromium") is None, reason="needs chromium"
)
def test_png_is_drawn_by_headless_chromium(
    app: typer.Typer, config: Path, db: Path, tmp_path: Path
) -> None:
    out = tmp_path / "t.png"
    result = _run(app, "-c", str(config), "-o", str(out))
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
