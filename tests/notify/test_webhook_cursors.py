"""Webhook cursors: one contract for SQLite and memory, and `gpusm db upgrade` from 0001."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from alembic import command
from alembic.config import Config as AlembicConfig
from typer.testing import CliRunner

from gpusm.cli.main import app
from gpusm.errors import StoreError
from gpusm.ports import CursorStore
from gpusm.store import SqlEventStore
from gpusm.store.cursors import MemoryCursorStore, SqlCursorStore
from gpusm.store.schema import SCHEMA_REVISION

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(params=["memory", "sqlite"])
def cursors(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[CursorStore]:
    store: CursorStore
    if request.param == "memory":
        store = MemoryCursorStore()
    else:
        store = SqlCursorStore(f"sqlite:///{tmp_path / 'gpusm.db'}")
    yield store
    store.close()


def test_a_new_cursor_is_seeded_once_and_kept(cursors: CursorStore) -> None:
    assert cursors.load("ops") is None
    assert cursors.seed("ops", 7) == 7
    assert cursors.seed("ops", 99) == 7, "seeding again keeps the cursor"
    assert cursors.load("ops") == 7


def test_saving_moves_one_cursor_only(cursors: CursorStore) -> None:
    cursors.seed("a", 1)
    cursors.seed("b", 1)
    cursors.save("a", 5)
    cursors.save("c", 3)
    assert (cursors.load("a"), cursors.load("b"), cursors.load("c")) == (5, 1, 3)


def test_a_closed_store_refuses(cursors: CursorStore) -> None:
    cursors.close()
    cursors.close()
    with pytest.raises(StoreError, match="closed"):
        cursors.load("a")


def test_sqlite_cursors_survive_reopening(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'gpusm.db'}"
    first = SqlCursorStore(url)
    first.save("ops", 42)
    first.close()
    again = SqlCursorStore(url)
    try:
        assert again.load("ops") == 42
    finally:
        again.close()


def test_db_upgrade_of_a_revision_0001_database_keeps_its_events_and_adds_cursors(
    tmp_path: Path,
) -> None:
    db = tmp_path / "old.db"
    alembic = AlembicConfig()
    alembic.set_main_option("script_location", str(ROOT / "migrations"))
    alembic.set_main_option("sqlalchemy.url", f"sqlite:///{db}")
    command.upgrade(alembic, "0001")
    raw = sqlite3.connect(db)
    with raw:
        raw.executemany(
            "INSERT INTO events (stream, version, type, at, data) "
            "VALUES ('tts', ?, 'Crashed', ?, '{}')",
            [(v, f"2026-01-01T00:00:0{v}.000000+00:00") for v in (1, 2, 3)],
        )
    raw.close()
    config = tmp_path / "gpusm.yaml"
    service = {"command": ["true"], "vram_mib": 1, "health": {"tcp": "127.0.0.1:9"}}
    doc = {"state_dir": str(tmp_path), "database": f"sqlite:///{db}", "services": {"s": service}}
    config.write_text(yaml.safe_dump(doc))

    result = CliRunner().invoke(app, ["db", "upgrade", "-c", str(config)])

    assert result.exit_code == 0, result.output
    assert f"schema revision {SCHEMA_REVISION} (newest)" in result.stdout
    store = SqlEventStore(f"sqlite:///{db}", upgrade=False)
    try:
        assert [(e.seq, e.type) for e in store.read()] == [
            (1, "Crashed"),
            (2, "Crashed"),
            (3, "Crashed"),
        ]
    finally:
        store.close()
    cursors = SqlCursorStore(f"sqlite:///{db}")
    try:
        assert cursors.seed("ops", 3) == 3
    finally:
        cursors.close()
