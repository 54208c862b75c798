"""``gpusm events``, ``gpusm history``, ``gpusm db upgrade|current``: reading and keeping the log.

Each opens the event store named by the config (``database``, default
``<state_dir>/gpusm.db``), creating and migrating it if needed, and closes it again.
``--json`` prints one JSON object per line, for scripts.

``gpusm events --follow`` prints what ``gpusm events`` would, then each new event as it
is recorded: from the daemon's ``GET /gpu/events/stream`` when one answers at
``api.listen`` (riding out its restarts), else by reading the database every
:data:`POLL_S` seconds. ``--count N`` stops after N events; Ctrl-C ends it (exit 0).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import replace
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
from gpusm.client import Client, daemon_url, find_daemon
from gpusm.config import Config, find_config_path, make_folder, sqlite_file
from gpusm.domain.events import RecordedEvent
from gpusm.engine import audit
from gpusm.errors import StoreError, UnknownName
from gpusm.ports import EventQuery, EventStore
from gpusm.wiring import open_store, store_revision, upgrade_store

__all__ = ["register"]

db_app = typer.Typer(help="Look after the event database.", no_args_is_help=True)

# How often ``events --follow`` reads the database when no daemon answers.
POLL_S = 0.25
_PAGE = 500


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
    follow: Annotated[
        bool,
        typer.Option(
            "--follow",
            "-f",
            help="Then print new events as they are recorded (from the daemon if one "
            "answers, else from the database); Ctrl-C ends.",
        ),
    ] = False,
    count: Annotated[
        int | None, typer.Option(min=1, help="With --follow: stop after N events.")
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Show the event log, oldest first."""
    cfg = load(config)
    since_at = _parse_time(since, "--since")
    until_at = _parse_time(until, "--until")
    if follow:
        if until_at is not None:
            fail("--until cannot be used with --follow (new events are always later)", EXIT_CONFIG)
        query = EventQuery(stream=service, types=types, since=since_at, limit=limit)
        _follow(cfg, query, count, as_json)
        return
    if count is not None:
        fail("--count is for --follow; use --limit for the newest N events", EXIT_CONFIG)
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


def _follow(cfg: Config, query: EventQuery, count: int | None, as_json: bool) -> None:
    """Print the backlog ``query`` selects, then new events; Ctrl-C ends it quietly."""
    url = daemon_url(cfg.api.listen)
    printed = 0
    with friendly_errors():
        try:
            if find_daemon(url) is not None:
                with Client(url, token_file=cfg.token_path, renew_every_s=None) as client:
                    for event in _daemon_events(client, query):
                        printed += _show(event, as_json)
                        if printed == count:
                            return
            else:
                with _store(cfg) as store:
                    for event in _store_events(store, query):
                        printed += _show(event, as_json)
                        if printed == count:
                            return
        except KeyboardInterrupt:
            return  # the way to stop following: exit 0, no "interrupted"


def _backlog(
    newest: list[RecordedEvent], found: list[RecordedEvent]
) -> tuple[list[RecordedEvent], int]:
    """The backlog to print (oldest first, up to the head) and the head seq to follow from.

    The head is read before the backlog, so an event recorded in between is printed
    once, by the follow, rather than twice or never."""
    head = newest[0].seq if newest else 0
    return [e for e in found if e.seq <= head], head


def _daemon_events(client: Client, query: EventQuery) -> Iterator[RecordedEvent]:
    newest = client.events(EventQuery(newest_first=True, limit=1))
    newest_first = query.limit is not None
    found = client.events(replace(query, newest_first=newest_first))
    backlog, head = _backlog(newest, found[::-1] if newest_first else found)
    yield from backlog
    live = EventQuery(stream=query.stream, types=query.types)
    # since: a new event may carry an earlier time than a past one only if the clock stepped.
    yield from _since(client.stream_events(live, after_seq=head), query)


def _store_events(store: EventStore, query: EventQuery) -> Iterator[RecordedEvent]:
    newest = store.read(EventQuery(newest_first=True, limit=1))
    found = audit.query_events(
        store, service=query.stream, type=query.types, since=query.since, limit=query.limit
    )
    backlog, last = _backlog(newest, found)
    yield from backlog
    while True:
        page = EventQuery(stream=query.stream, types=query.types, after_seq=last, limit=_PAGE)
        new = store.read(page)
        yield from _since(new, query)
        if new:
            last = new[-1].seq
        if len(new) < _PAGE:
            time.sleep(POLL_S)


def _since(events: Iterable[RecordedEvent], query: EventQuery) -> Iterator[RecordedEvent]:
    return (e for e in events if query.since is None or e.at >= query.since)


def _show(event: RecordedEvent, as_json: bool) -> int:
    """Print one followed event as a line; returns 1."""
    if as_json:
        _json_line(_event_dict(event))
        return 1
    move = ""
    if event.to_state is not None:
        move = event.to_state
        if event.from_state not in (None, event.to_state):
            move = f"{event.from_state} -> {event.to_state}"
    fields = [
        f"#{event.seq}",
        _when(event.at),
        event.stream,
        f"v{event.version}",
        event.type,
        move,
        _brief(event.data),
    ]
    say("  ".join(f for f in fields if f))
    return 1


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
