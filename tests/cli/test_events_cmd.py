"""``gpusm events``, ``gpusm history`` and ``gpusm db upgrade`` against real SQLite files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from gpusm.cli.events_cmd import register
from gpusm.domain.events import NewEvent
from gpusm.store import SqlEventStore
from gpusm.store.schema import SCHEMA_REVISION

T0 = datetime(2026, 1, 31, 12, 0, tzinfo=UTC)


@pytest.fixture
def app() -> typer.Typer:
    app = typer.Typer()
    register(app)
    return app


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "gpusm.yaml"
    path.write_text(
        "state_dir: ./state\n"
        "gpu: {backend: sim}\n"
        "services:\n"
        "  tts:\n"
        "    command: [sleep, '100']\n"
        "    vram_mib: 1000\n"
        "    health: {tcp: '127.0.0.1:9001'}\n"
    )
    return path


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "state" / "gpusm.db"


@pytest.fixture
def seeded(db: Path) -> Iterator[SqlEventStore]:
    store = SqlEventStore(f"sqlite:///{db}")

    def at(s: float) -> datetime:
        return T0 + timedelta(seconds=s)

    store.append(
        [
            NewEvent("tts", 1, "StartRequested", at(0), "stopped", "starting", {"by": "w1"}),
            NewEvent("tts", 2, "ProcessLaunched", at(1), "starting", "starting", {"pid": 42}),
            NewEvent("tts", 3, "HealthPassed", at(10), "starting", "healthy"),
            NewEvent("coordinator", 1, "PhaseEntered", at(11), data={"phase": "[bold]x"}),
            NewEvent("tts", 4, "Evicted", at(3700), "healthy", "draining", {"cause": "evict"}),
            NewEvent("tts", 5, "Stopped", at(3702), "draining", "stopped", {"free_mib": 9000}),
        ]
    )
    yield store
    store.close()


def run(app: typer.Typer, config: Path, *args: str, columns: int = 200) -> tuple[int, str, str]:
    # Rich reads COLUMNS on every print, so tables are laid out for this width.
    result = CliRunner(env={"COLUMNS": str(columns)}).invoke(app, [*args, "-c", str(config)])
    return result.exit_code, result.stdout, result.stderr


def lines(out: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.splitlines()]


# ---------------------------------------------------------------- events
def test_events_json_on_a_fresh_database_prints_nothing_and_creates_it(
    app: typer.Typer, config: Path, db: Path
) -> None:
    assert run(app, config, "events", "--json") == (0, "", "")
    assert db.is_file()


def test_events_json_in_a_real_process_prints_nothing_on_a_fresh_database(
    config: Path, db: Path
) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "gpusm", "events", "--json", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")
    assert db.is_file()


def test_events_json_prints_one_object_per_event(
    app: typer.Typer, config: Path, seeded: SqlEventStore
) -> None:
    code, out, _ = run(app, config, "events", "--json")
    assert code == 0
    events = lines(out)
    assert [e["seq"] for e in events] == [1, 2, 3, 4, 5, 6]
    assert events[0] == {
        "seq": 1,
        "at": "2026-01-31T12:00:00+00:00",
        "stream": "tts",
        "version": 1,
        "type": "StartRequested",
        "from_state": "stopped",
        "to_state": "starting",
        "data": {"by": "w1"},
    }


@pytest.mark.parametrize(
    ("args", "seqs"),
    [
        (["--service", "tts"], [1, 2, 3, 5, 6]),
        (["--type", "Evicted", "--type", "Stopped"], [5, 6]),
        (["--since", "2026-01-31T12:00:10Z"], [3, 4, 5, 6]),
        (["--until", "2026-01-31T12:00:10+00:00"], [1, 2]),
        (["--since", "2026-01-31 12:00:01", "--until", "2026-01-31T13:00:00"], [2, 3, 4]),
        (["--limit", "2"], [5, 6]),
        (["-s", "coordinator"], [4]),
    ],
)
def test_events_filters(
    app: typer.Typer, config: Path, seeded: SqlEventStore, args: list[str], seqs: list[int]
) -> None:
    code, out, _ = run(app, config, "events", "--json", *args)
    assert code == 0
    assert [e["seq"] for e in lines(out)] == seqs


def test_events_table_shows_moves_and_data_without_markup(
    app: typer.Typer, config: Path, seeded: SqlEventStore
) -> None:
    code, out, _ = run(app, config, "events")
    assert code == 0
    assert "StartRequested" in out
    assert "stopped -> starting" in out
    assert "[bold]x" in out  # logged text is shown, not interpreted


def test_events_table_keeps_identifying_columns_whole_on_a_narrow_terminal(
    app: typer.Typer, config: Path, seeded: SqlEventStore
) -> None:
    code, out, _ = run(app, config, "events", columns=80)
    assert code == 0
    assert max(len(line) for line in out.splitlines()) <= 80
    for text in ("StartRequested", "ProcessLaunched", "2026-01-31 12:00:00.000", "coordinator"):
        assert text in out


def test_events_table_on_an_empty_log_says_so(app: typer.Typer, config: Path) -> None:
    assert run(app, config, "events")[:2] == (0, "no events\n")


@pytest.mark.parametrize("option", ["--since", "--until"])
def test_events_with_a_bad_time_exits_2_naming_the_option(
    app: typer.Typer, config: Path, db: Path, option: str
) -> None:
    code, out, err = run(app, config, "events", option, "yesterday")
    assert code == 2
    assert f"{option}: 'yesterday' is not an ISO-8601 time" in err
    assert out == ""
    assert not db.exists()


def test_events_with_a_broken_config_exits_2(app: typer.Typer, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("gpu: {backend: cuda}\n")
    code, _, err = run(app, bad, "events")
    assert code == 2
    assert "gpu.backend" in err


def test_a_database_url_gpusm_cannot_use_is_a_config_error(
    app: typer.Typer, tmp_path: Path
) -> None:
    cfg = tmp_path / "gpusm.yaml"
    cfg.write_text("database: postgresql://db/gpusm\ngpu: {backend: sim}\n")
    code, _, err = run(app, cfg, "events", "--json")
    assert code == 2
    assert "database: 'postgresql://db/gpusm' is not the URL of a SQLite file" in err


def test_an_unusable_database_exits_1_with_the_reason(
    app: typer.Typer, config: Path, db: Path
) -> None:
    db.parent.mkdir(parents=True)
    db.write_text("not a database, just text " * 100)
    code, _, err = run(app, config, "events", "--json")
    assert code == 1
    assert err.startswith("error: cannot open event store at ")


# ---------------------------------------------------------------- history
def test_history_json_gives_the_timeline_with_durations(
    app: typer.Typer, config: Path, seeded: SqlEventStore
) -> None:
    code, out, _ = run(app, config, "history", "tts", "--json")
    assert code == 0
    assert [(i["state"], i["duration_s"], i["entered_by"]) for i in lines(out)] == [
        ("starting", 10.0, "StartRequested"),
        ("healthy", 3690.0, "HealthPassed"),
        ("draining", 2.0, "Evicted"),
        ("stopped", None, "Stopped"),
    ]


def test_history_table_shows_human_durations(
    app: typer.Typer, config: Path, seeded: SqlEventStore
) -> None:
    code, out, _ = run(app, config, "history", "tts")
    assert code == 0
    for text in ("10.000s", "1h 01m 30s", "2.000s", "ongoing", "evict"):
        assert text in out


def test_history_stops_explains_why_and_with_how_much_vram(
    app: typer.Typer, config: Path, seeded: SqlEventStore
) -> None:
    code, out, _ = run(app, config, "history", "tts", "--stops")
    assert code == 0
    assert "#6 2026-01-31T13:01:42+00:00 stopped after Evicted because evict" in out
    assert "with 9000 MiB free" in out
    code, out, _ = run(app, config, "history", "tts", "--stops", "--json")
    assert [s["free_mib"] for s in lines(out)] == [9000]


def test_history_of_a_configured_service_without_events(app: typer.Typer, config: Path) -> None:
    assert run(app, config, "history", "tts") == (0, "no events for service 'tts' yet\n", "")
    assert run(app, config, "history", "tts", "--json") == (0, "", "")


def test_history_stops_of_a_service_that_never_stopped(
    app: typer.Typer, config: Path, db: Path
) -> None:
    store = SqlEventStore(f"sqlite:///{db}")
    store.append([NewEvent("tts", 1, "StartRequested", T0, "stopped", "starting")])
    store.close()
    code, out, _ = run(app, config, "history", "tts", "--stops")
    assert (code, out) == (0, "service 'tts' has not stopped yet\n")


def test_history_of_an_unknown_service_exits_2(app: typer.Typer, config: Path) -> None:
    code, _, err = run(app, config, "history", "nope")
    assert code == 2
    assert "unknown service 'nope'; known: tts" in err


def test_history_of_a_removed_service_still_shows_its_log(
    app: typer.Typer, config: Path, seeded: SqlEventStore
) -> None:
    seeded.append([NewEvent("old", 1, "StartRequested", T0, "stopped", "starting")])
    code, out, _ = run(app, config, "history", "old", "--json")
    assert code == 0
    assert [i["state"] for i in lines(out)] == ["starting"]


# ---------------------------------------------------------------- db
def test_db_upgrade_creates_and_reports_the_revision(
    app: typer.Typer, config: Path, db: Path
) -> None:
    code, out, _ = run(app, config, "db", "upgrade")
    assert code == 0
    assert f"schema revision {SCHEMA_REVISION} (newest)" in out
    assert db.is_file()
    assert run(app, config, "db", "upgrade")[0] == 0


# ---------------------------------------------------------------- events --follow
# (Following through a daemon's stream: tests/api/test_event_stream.py.)
@pytest.fixture
def alone(config: Path) -> Path:
    """The config with its API on a free port where no daemon answers: --follow reads
    the database."""
    from tests.support import free_port

    config.write_text(config.read_text() + f"api: {{listen: '127.0.0.1:{free_port()}'}}\n")
    return config


def _append_later(store: SqlEventStore, delay_s: float, n: int = 2) -> threading.Thread:
    def append() -> None:
        time.sleep(delay_s)
        for i in range(n):
            at = T0 + timedelta(hours=2, seconds=i)
            store.append([NewEvent("coordinator", 2 + i, "PhaseEntered", at, data={"i": i})])

    thread = threading.Thread(target=append, daemon=True)
    thread.start()
    return thread


@pytest.mark.timeout(30)
def test_events_follow_prints_the_log_then_new_events_from_the_database(
    app: typer.Typer, alone: Path, seeded: SqlEventStore
) -> None:
    writer = _append_later(seeded, 0.5)
    started = time.monotonic()
    code, out, err = run(app, alone, "events", "--follow", "--json", "--count", "8")
    writer.join(5)
    assert code == 0, err
    assert [e["seq"] for e in lines(out)] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert lines(out)[-1]["data"] == {"i": 1}
    assert time.monotonic() - started < 10


@pytest.mark.timeout(30)
def test_events_follow_with_limit_and_filters_starts_at_the_newest_matching(
    app: typer.Typer, alone: Path, seeded: SqlEventStore
) -> None:
    writer = _append_later(seeded, 0.3)
    code, out, err = run(
        app, alone, "events", "-f", "-s", "coordinator", "--limit", "1", "--count", "3"
    )
    writer.join(5)
    assert code == 0, err
    found = out.splitlines()
    assert [line.split()[0] for line in found] == ["#4", "#7", "#8"]
    assert "coordinator  v2  PhaseEntered  i=0" in found[1]


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--follow", "--until", "2026-01-31"], "--until cannot be used with --follow"),
        (["--count", "2"], "--count is for --follow"),
        (["--follow", "--count", "0"], "Invalid value for '--count'"),
    ],
)
def test_events_follow_refuses_options_that_make_no_sense(
    app: typer.Typer, alone: Path, args: list[str], says: str
) -> None:
    code, _, err = run(app, alone, "events", *args)
    assert code == 2
    assert says in err


@pytest.mark.timeout(60)
def test_ctrl_c_ends_events_follow_quietly(alone: Path, seeded: SqlEventStore) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "gpusm", "events", "--follow", "-c", str(alone)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "COLUMNS": "200"},
    )
    try:
        assert proc.stdout is not None
        # The backlog is printed: it is following now.
        backlog = [proc.stdout.readline() for _ in range(6)]
        assert [line.split()[0] for line in backlog] == [b"#%d" % n for n in range(1, 7)]
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 0, err
    assert b"Traceback" not in err
    assert err.strip() == b""
    assert out == b""
