"""``gpusm events``, ``gpusm history``, ``gpusm db upgrade|current``: reading and keeping the log.

Each opens the event store named by the config (``database``, default
``<state_dir>/gpusm.db``), creating and migrating it if needed, and closes it again.
``--json`` prints one JSON object per line, for scripts.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Annotated, Any

import typer
from rich.table import Table

from gpusm.cli.common import (
    EXIT_CONFIG,
    ConfigOption,
    console,
    fail,
    friendly_errors,
    load,
    plain,
    say,
)
from gpusm.config import Config, find_config_path, make_folder, sqlite_file
from gpusm.domain.events import RecordedEvent
from gpusm.engine import audit
from gpusm.errors import StoreError, UnknownName
from gpusm.ports import EventStore
from gpusm.wiring import open_store, store_revision, upgrade_store

__all__ = ["register"]

db_app = typer.Typer(help="Look after the event database.", no_args_is_help=True)


@contextmanager
def _store(cfg: Config) -> Iterator[EventStore]:
    # The database's folder is made here, so that an unusable one is a config error (exit 2).
    database = sqlite_file(cfg.database_url)
    if database is not None:
        key = "database" if cfg.database else "state_dir"
        make_folder(database.parent, key, cfg.source)
    store = open_store(cfg)
    try:
        yield store
    finally:
        store.close()


def _parse_time(value: str | None, option: str) -> datetime | None:
    """``value`` as an aware UTC time; exit 2 if it is not an ISO-8601 time in range."""
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
        # A time without a zone is taken as UTC, like every time gpusm records. Near the
        # ends of the calendar a zone can push the time out of range (OverflowError).
        return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)
    except ValueError:
        fail(
            f"{option}: {value!r} is not an ISO-8601 time; write e.g. 2026-01-31T12:00:00Z "
            "or 2026-01-31 (times without a zone are UTC)",
            EXIT_CONFIG,
        )
    except OverflowError:
        fail(
            f"{option}: {value!r} is outside the years 1 to 9999 once converted to UTC; "
            "give a time in range",
            EXIT_CONFIG,
        )


def _when(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "ongoing"
    if seconds < 60:
        return f"{seconds:.3f}s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    text = f"{minutes}m {secs:02d}s" if not hours else f"{hours}h {minutes:02d}m {secs:02d}s"
    return f"{days}d {text}" if days else text


def _event_dict(event: RecordedEvent) -> dict[str, Any]:
    return {
        "seq": event.seq,
        "at": event.at.isoformat(),
        "stream": event.stream,
        "version": event.version,
        "type": event.type,
        "from_state": event.from_state,
        "to_state": event.to_state,
        "data": dict(event.data),
    }


def _json_line(obj: dict[str, Any]) -> None:
    typer.echo(json.dumps(obj, separators=(",", ":"), sort_keys=False))


def events(
    service: Annotated[
        str | None, typer.Option("--service", "-s", help="Only this service (stream).")
    ] = None,
    types: Annotated[
        list[str] | None,
        typer.Option("--type", "-t", help="Only this event type; repeat for several."),
    ] = None,
    since: Annotated[
        str | None, typer.Option(help="From this ISO-8601 time on (inclusive; no zone = UTC).")
    ] = None,
    until: Annotated[str | None, typer.Option(help="Before this ISO-8601 time.")] = None,
    limit: Annotated[
        int | None, typer.Option(min=0, help="Only the newest N matching events.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
    config: ConfigOption = None,
) -> None:
    """Show the event log, oldest first."""
    cfg = load(config)
    since_at = _parse_time(since, "--since")
    until_at = _parse_time(until, "--until")
    with friendly_errors(), _store(cfg) as store:
        found = audit.query_events(
            store, service=service, type=types, since=since_at, until=until_at, limit=limit
        )
    if as_json:
        for event in found:
            _json_line(_event_dict(event))
        return
    if not found:
        say("no events")
        return
    table = Table(box=None)
    # The identifying columns never wrap; the data column folds to whatever room is left.
    for name in ("seq", "at (UTC)", "stream", "v", "type"):
        table.add_column(name, no_wrap=True)
    table.add_column("state")
    table.add_column("data", overflow="fold")
    for event in found:
        move = ""
        if event.to_state is not None:
            move = event.to_state
            if event.from_state not in (None, event.to_state):
                move = f"{event.from_state} -> {event.to_state}"
        data = _brief(event.data)
        # plain(): logged strings are data, never Rich markup.
        table.add_row(
            str(event.seq),
            _when(event.at),
            plain(event.stream),
            str(event.version),
            plain(event.type),
            plain(move),
            plain(data),
        )
    console.print(table)


def history(
    service: Annotated[str, typer.Argument(help="The service whose timeline to show.")],
    stops: Annotated[
        bool, typer.Option("--stops", help="Explain each stop and crash instead.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
    config: ConfigOption = None,
) -> None:
    """Show a service's states over time and how long each lasted (or why it stopped)."""
    cfg = load(config)
    with friendly_errors():
        with _store(cfg) as store:
            intervals = audit.history(store, service)
            explained = audit.explain_stops(store, service) if stops else []
        if not intervals and service not in cfg.services:
            raise UnknownName("service", service, list(cfg.services))
    if as_json:
        for item in explained if stops else intervals:
            _json_line(item.as_dict())
        return
    if not intervals:
        say(f"no events for service {service!r} yet")
        return
    if stops:
        for stop in explained:
            say(f"#{stop.seq} {stop.summary()}")
        if not explained:
            say(f"service {service!r} has not stopped yet")
        return
    table = Table(box=None)
    for name in ("since (UTC)", "state", "for", "entered by"):
        table.add_column(name, no_wrap=True)
    table.add_column("reason", overflow="fold")
    for interval in intervals:
        table.add_row(
            _when(interval.entered_at),
            plain(interval.state),
            _duration(interval.duration_s),
            plain(f"{interval.entered_by} #{interval.seq}"),
            plain(interval.reason or ""),
        )
    console.print(table)


@db_app.command("upgrade")
def db_upgrade(config: ConfigOption = None) -> None:
    """Create the event database, or migrate it to the newest schema."""
    cfg = load(config)
    with friendly_errors():
        revision = upgrade_store(cfg)
    console.print(
        f"event database {cfg.database_url}: schema revision {revision} (newest)", markup=False
    )


# How the store says that a database is not at this gpusm's revision (see store/sql.py).
_OUT_OF_DATE = re.compile(r"has schema revision (?P<found>\S+), this gpusm needs (?P<newest>\S+);")


@db_app.command("current")
def db_current(config: ConfigOption = None) -> None:
    """Show the event database's schema revision and whether it is the newest (exit 0)."""
    cfg = load(config)
    url = cfg.database_url
    upgrade_hint = f"gpusm db upgrade -c {find_config_path(config).resolve()}"
    path = sqlite_file(url)
    # Checked first: opening a missing SQLite file would create an empty one.
    if path is not None and not path.exists():
        say(
            f"event database {path} does not exist yet; create it with `{upgrade_hint}` "
            "(or start `gpusm serve`, which creates it)"
        )
        return
    with friendly_errors():
        try:
            revision = store_revision(cfg)
        except StoreError as exc:
            old = _OUT_OF_DATE.search(str(exc))
            if old is None:
                raise  # a real failure: one line, exit 1
            say(
                f"event database {url}: schema revision {old['found']}, not the newest "
                f"({old['newest']}); migrate it with `{upgrade_hint}`"
            )
            return
    say(f"event database {url}: schema revision {revision} (newest)")


def register(app: typer.Typer) -> None:
    """Add ``events``, ``history`` and the ``db`` group to ``app``."""
    app.command("events")(events)
    app.command("history")(history)
    app.add_typer(db_app, name="db")


def _brief(data: Mapping[str, Any]) -> str:
    """The data column: the reason first, then the other non-empty values as key=value."""
    parts = [str(data["reason"])] if data.get("reason") else []
    parts += [
        f"{key}={json.dumps(value, separators=(',', ':'))}"
        for key, value in data.items()
        if key != "reason" and value not in (None, "", [], {})
    ]
    return "; ".join(parts)
