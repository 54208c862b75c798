"""The Alembic migrations build exactly gpusm.store.schema.metadata, by every route."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine

from gpusm.errors import StoreError
from gpusm.store import SqlEventStore, schema, upgrade
from gpusm.store.schema import SCHEMA_REVISION, metadata

ROOT = Path(__file__).resolve().parents[2]


def _differences(db: Path) -> list[object]:
    engine = create_engine(f"sqlite:///{db}")
    try:
        with engine.connect() as conn:
            return list(compare_metadata(MigrationContext.configure(conn), metadata))
    finally:
        engine.dispose()


def _revision(db: Path) -> str:
    raw = sqlite3.connect(db)
    try:
        return str(raw.execute("SELECT version_num FROM alembic_version").fetchone()[0])
    finally:
        raw.close()


def test_schema_revision_names_the_newest_migration() -> None:
    assert ScriptDirectory(str(ROOT / "migrations")).get_current_head() == SCHEMA_REVISION
    assert schema.MIGRATIONS_DIR == ROOT / "migrations"


def test_upgrading_an_empty_database_yields_exactly_the_metadata(tmp_path: Path) -> None:
    db = tmp_path / "gpusm.db"
    assert upgrade(f"sqlite:///{db}") == SCHEMA_REVISION
    assert _differences(db) == []
    assert _revision(db) == SCHEMA_REVISION


def test_upgrade_is_idempotent_and_keeps_events(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'gpusm.db'}"
    upgrade(url)
    raw = sqlite3.connect(tmp_path / "gpusm.db")
    with raw:
        raw.execute(
            "INSERT INTO events (stream, version, type, at, data) VALUES ('a', 1, 'X', 't', '{}')"
        )
    raw.close()
    assert upgrade(url) == SCHEMA_REVISION
    assert upgrade(url) == SCHEMA_REVISION
    assert (
        len(sqlite3.connect(tmp_path / "gpusm.db").execute("SELECT * FROM events").fetchall()) == 1
    )


def test_the_alembic_command_line_migrates_down_and_up(tmp_path: Path) -> None:
    db = tmp_path / "cli.db"
    env = {**os.environ, "GPUSM_DATABASE_URL": f"sqlite:///{db}"}

    def alembic(*args: str) -> None:
        subprocess.run(
            [sys.executable, "-m", "alembic", "-c", str(ROOT / "alembic.ini"), *args],
            cwd=tmp_path,
            env=env,
            check=True,
            capture_output=True,
            timeout=60,
        )

    alembic("upgrade", "head")
    assert _differences(db) == []
    alembic("downgrade", "base")
    raw = sqlite3.connect(db)
    tables = {r[0] for r in raw.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    raw.close()
    assert not tables & {"events", "stream_heads"}
    alembic("upgrade", "head")
    assert _revision(db) == SCHEMA_REVISION


def test_without_the_migrations_folder_a_new_database_gets_the_metadata(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(schema, "MIGRATIONS_DIR", tmp_path / "not-installed")
    db = tmp_path / "gpusm.db"
    SqlEventStore(f"sqlite:///{db}").close()
    assert _differences(db) == []
    assert _revision(db) == SCHEMA_REVISION


def test_a_stray_migrations_folder_without_alembic_ini_is_not_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stray = tmp_path / "site-packages" / "migrations"
    stray.mkdir(parents=True)
    (stray / "env.py").write_text("raise SystemExit('foreign env.py ran')\n")
    monkeypatch.setattr(schema, "MIGRATIONS_DIR", stray)
    db = tmp_path / "gpusm.db"
    SqlEventStore(f"sqlite:///{db}").close()
    assert _differences(db) == []


def test_without_the_migrations_folder_an_old_database_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(schema, "MIGRATIONS_DIR", tmp_path / "not-installed")
    db = tmp_path / "gpusm.db"
    raw = sqlite3.connect(db)
    raw.execute("CREATE TABLE events (seq INTEGER PRIMARY KEY)")
    raw.close()
    with pytest.raises(StoreError, match=r"migrations folder .* is missing"):
        SqlEventStore(f"sqlite:///{db}")


def test_a_database_from_a_newer_gpusm_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "gpusm.db"
    upgrade(f"sqlite:///{db}")
    raw = sqlite3.connect(db)
    with raw:
        raw.execute("UPDATE alembic_version SET version_num = '9999'")
    raw.close()
    with pytest.raises(StoreError, match=r"cannot upgrade schema revision 9999.*newer gpusm"):
        SqlEventStore(f"sqlite:///{db}")


def test_without_upgrade_an_unmigrated_database_is_refused_until_upgraded(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'gpusm.db'}"
    with pytest.raises(StoreError, match=r"schema revision none.*run `gpusm db upgrade`"):
        SqlEventStore(url, upgrade=False)
    upgrade(url)
    store = SqlEventStore(url, upgrade=False)
    try:
        assert store.read() == []
    finally:
        store.close()
