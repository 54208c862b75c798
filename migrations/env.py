"""Alembic environment for gpusm's event store.

gpusm runs this itself when it opens a database, handing over its own connection in
``config.attributes["connection"]`` (already inside ``BEGIN IMMEDIATE``, so the whole
upgrade is one transaction). From the ``alembic`` command line the URL comes from
``-x url=…``, else ``$GPUSM_DATABASE_URL``, else ``sqlalchemy.url`` in alembic.ini.
"""

from __future__ import annotations

import os
from logging.config import fileConfig

from alembic import context
from sqlalchemy import Connection, create_engine
from sqlalchemy.pool import NullPool

from gpusm.store.schema import metadata

config = context.config
target_metadata = metadata

# Only the command line configures logging; gpusm's own calls leave the host's logging alone.
if config.config_file_name is not None and config.attributes.get("connection") is None:
    fileConfig(config.config_file_name, disable_existing_loggers=False)


def _url() -> str:
    url = context.get_x_argument(as_dictionary=True).get("url")
    return (
        url
        or os.environ.get("GPUSM_DATABASE_URL")
        or config.get_main_option("sqlalchemy.url")
        or ""
    )


def _configure(**kwargs: object) -> None:
    # Batch mode: SQLite can only change a table by copying it.
    context.configure(target_metadata=target_metadata, render_as_batch=True, **kwargs)  # type: ignore[arg-type]
    with context.begin_transaction():
        context.run_migrations()


def run_offline() -> None:
    """Print the SQL instead of running it (``alembic upgrade head --sql``)."""
    _configure(url=_url(), literal_binds=True)


def run_online() -> None:
    """Run the migrations on gpusm's connection, or on a fresh one from the URL."""
    given = config.attributes.get("connection")
    if isinstance(given, Connection):
        _configure(connection=given)
        return
    engine = create_engine(_url(), poolclass=NullPool)
    try:
        with engine.connect() as connection:
            _configure(connection=connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
