"""The event log's tables (SQLAlchemy Core) and how rows encode times and data.

``events`` is the append-only log: ``seq`` is the global order (AUTOINCREMENT, so a
number is never reused), ``UNIQUE(stream, version)`` is the optimistic-concurrency
guard. ``stream_heads`` is a projection updated in the same transaction as every
append, so reading every stream's latest version and state never scans the log.
``webhook_cursors`` holds, per webhook, the last ``seq`` its receiver acknowledged.

Times are stored as fixed-width UTC ISO-8601 text with microseconds
(``2026-01-31T12:00:00.000000+00:00``), so text order is time order and a
timezone-aware UTC datetime round-trips exactly. ``data`` is compact JSON text.

Alembic's migrations (``migrations/versions``) build exactly this metadata; a test
compares them, and :data:`SCHEMA_REVISION` must name the newest migration.
:func:`migrate` runs them from :data:`MIGRATIONS_DIR`: the copy a wheel carries as
``gpusm/store/migrations``, else ``migrations/`` at the root of a checkout (an editable
install, where ``alembic.ini`` uses the same folder). Without either, an empty database
gets this metadata created directly, stamped :data:`SCHEMA_REVISION`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any, Final

from sqlalchemy import (
    Column,
    Connection,
    Engine,
    Index,
    Integer,
    MetaData,
    Table,
    Text,
    UniqueConstraint,
    text,
)

from gpusm.errors import StoreError
from gpusm.store.validation import require_aware

__all__ = [
    "MIGRATIONS_DIR",
    "SCHEMA_REVISION",
    "decode_at",
    "decode_data",
    "encode_at",
    "encode_data",
    "events",
    "metadata",
    "migrate",
    "read_revision",
    "stream_heads",
    "webhook_cursors",
]

# The Alembic revision this code's tables correspond to (the newest in migrations/).
SCHEMA_REVISION: Final = "0002"


def _find_migrations() -> Path:
    # A wheel installs the scripts inside this package (pyproject.toml maps the checkout's
    # top-level migrations/ there); a checkout keeps them at <repo>/migrations.
    packaged = resources.files(__package__ or "gpusm.store") / "migrations"
    # Alembic needs a real folder: files on disk are one, a zipped import would not be.
    if isinstance(packaged, Path) and (packaged / "env.py").is_file():
        return packaged.resolve()
    return Path(__file__).resolve().parents[2] / "migrations"


# Where Alembic's scripts live (see _find_migrations).
MIGRATIONS_DIR: Path = _find_migrations()

metadata = MetaData(
    # Named constraints, so that Alembic's batch mode on SQLite can find them again.
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "pk": "pk_%(table_name)s",
    }
)

events = Table(
    "events",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("stream", Text, nullable=False),
    Column("version", Integer, nullable=False),
    Column("type", Text, nullable=False),
    Column("from_state", Text, nullable=True),
    Column("to_state", Text, nullable=True),
    Column("at", Text, nullable=False),
    Column("data", Text, nullable=False),
    UniqueConstraint("stream", "version"),
    # (stream, seq) serves "one stream in log order" without a sort.
    Index(None, "stream", "seq"),
    Index(None, "type"),
    Index(None, "at"),
    sqlite_autoincrement=True,
)

stream_heads = Table(
    "stream_heads",
    metadata,
    Column("stream", Text, primary_key=True),
    Column("version", Integer, nullable=False),
    # to_state of the latest event that has one; NULL for a stream without states.
    Column("state", Text, nullable=True),
    Column("last_seq", Integer, nullable=False),
    Column("at", Text, nullable=False),
)

webhook_cursors = Table(
    "webhook_cursors",
    metadata,
    # The webhook's name (``notify[].name``, else its URL without credentials or query).
    Column("name", Text, primary_key=True),
    # The last event seq the receiver acknowledged (2xx); delivery resumes after it.
    Column("seq", Integer, nullable=False),
    Column("updated_at", Text, nullable=False),
)


def encode_at(at: datetime, what: str = "event time") -> str:
    """``at`` as fixed-width UTC text; StoreError if it is naive (its zone is unknown)."""
    return require_aware(at, what).isoformat(timespec="microseconds")


def decode_at(value: str) -> datetime:
    """The timezone-aware UTC datetime that :func:`encode_at` wrote."""
    return datetime.fromisoformat(value).astimezone(UTC)


def encode_data(data: Mapping[str, Any], where: str) -> str:
    """``data`` as compact JSON; StoreError naming ``where`` if it is not JSON-serialisable."""
    try:
        return json.dumps(dict(data), separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise StoreError(f"{where}: data is not JSON-serialisable ({exc})") from exc


def decode_data(value: str) -> dict[str, Any]:
    """The mapping :func:`encode_data` wrote."""
    data = json.loads(value)
    return data if isinstance(data, dict) else {}


# ---------------------------------------------------------------- migrations
def read_revision(conn: Connection) -> str | None:
    """The Alembic revision the database is at, or None if it was never migrated."""
    has_table = conn.execute(
        text("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'alembic_version'")
    ).first()
    if has_table is None:
        return None
    return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()


def migrate(engine: Engine) -> str:
    """Bring the database to :data:`SCHEMA_REVISION` in one write transaction; returns it.

    ``engine`` must come from ``gpusm.store.sql`` (its connections begin with ``BEGIN
    IMMEDIATE`` when asked), so two processes opening one new file migrate it once.
    StoreError if the database is newer than this code or cannot be migrated.
    """
    with engine.connect() as conn, conn.begin():
        # The common case (already at head) costs one read and no Alembic import.
        if read_revision(conn) == SCHEMA_REVISION:
            return SCHEMA_REVISION
    with engine.connect() as conn:
        conn.execution_options(gpusm_write=True)
        with conn.begin():
            # Under the write lock: a second process opening a new file waits, then sees head.
            current = read_revision(conn)
            if current == SCHEMA_REVISION:
                return current
            if _is_ours(MIGRATIONS_DIR):
                _alembic_upgrade(conn, current)
            elif current is None and not _has_table(conn, "events"):
                metadata.create_all(conn)
                conn.exec_driver_sql(
                    "CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL, "
                    "CONSTRAINT alembic_version_pkc PRIMARY KEY (version_num))"
                )
                conn.execute(
                    text("INSERT INTO alembic_version (version_num) VALUES (:rev)"),
                    {"rev": SCHEMA_REVISION},
                )
            else:
                raise StoreError(
                    f"cannot upgrade schema revision {current or 'none'}: the migrations folder "
                    f"{MIGRATIONS_DIR} is missing; reinstall gpusm from its wheel "
                    "(pip install --force-reinstall gpusm-*.whl) or a checkout (pip install -e .)"
                )
            return read_revision(conn) or "none"


def _is_ours(folder: Path) -> bool:
    # The copy inside this package is ours. Otherwise parents[2] may be site-packages,
    # where another project's stray top-level "migrations" may live; ours sits beside
    # alembic.ini in a checkout.
    if not (folder / "env.py").is_file():
        return False
    inside = folder.resolve().parent == Path(__file__).resolve().parent
    return inside or (folder.parent / "alembic.ini").is_file()


def _has_table(conn: Connection, name: str) -> bool:
    found = conn.execute(
        text("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = :name"), {"name": name}
    ).first()
    return found is not None


def _alembic_upgrade(conn: Connection, current: str | None) -> None:
    from alembic import command
    from alembic.config import Config as AlembicConfig
    from alembic.util import CommandError

    config = AlembicConfig()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    # env.py runs on this connection, inside our BEGIN IMMEDIATE transaction.
    config.attributes["connection"] = conn
    try:
        command.upgrade(config, "head")
    except CommandError as exc:
        raise StoreError(
            f"cannot upgrade schema revision {current or 'none'} ({exc}); "
            "the database may come from a newer gpusm"
        ) from exc
