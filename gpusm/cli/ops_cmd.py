"""Operating commands: ``status``, ``phase``, ``start``, ``stop``, ``park``, ``reset``,
``release``, ``plan`` and ``doctor``.

Each command first asks the config's ``api.listen`` address for ``/healthz`` (briefly).
If a gpusm daemon answers, the command goes through it ("via daemon at …"); if not, it
opens the coordinator in this process ("no daemon at …; running in-process"), does the
one thing, and closes it again WITHOUT stopping services: what it started keeps
running, and the next ``gpusm serve`` or command adopts it. Those notes go to stderr,
so ``--json`` output stays clean.

Exit codes: 0 ok, 1 the operation failed (insufficient VRAM, timeout, start failed…),
2 bad input, bad config or an unknown name.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from typing import Annotated, Protocol, TypeVar

import typer
from rich.console import Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from gpusm.cli.common import (
    EXIT_CONFIG,
    EXIT_ERROR,
    ConfigOption,
    check_client,
    console,
    fail,
    friendly_errors,
    is_tty,
    load,
    plain,
    say,
)
from gpusm.client import Client, daemon_url, find_daemon
from gpusm.config import Config
from gpusm.domain.policy import Plan
from gpusm.results import PhaseResult, Status, StopNote
from gpusm.wire import DaemonStatus

__all__ = ["register"]

_T = TypeVar("_T")
_STATE_STYLE = {
    "healthy": "green",
    "starting": "yellow",
    "draining": "magenta",
    "parking": "cyan",
    "parked": "blue",
    "waking": "yellow",
    "failed": "bold red",
    "stopped": "dim",
}
_BY = "cli"


class Verbs(Protocol):
    """What the commands need; both Coordinator and Client provide it."""

    def status(self) -> Status: ...

    def enter_phase(
        self,
        name: str,
        client: str = ...,
        timeout: float | None = ...,
        priority: int | None = ...,
    ) -> PhaseResult: ...

    def release(self, client: str = ...) -> None: ...

    def release_all(self, by: str = ...) -> list[StopNote]: ...

    def start_service(self, name: str, by: str = ..., timeout: float | None = ...) -> None: ...

    def stop_service(self, name: str, by: str = ...) -> StopNote: ...

    def park_service(self, name: str, by: str = ...) -> StopNote: ...

    def reset_service(self, name: str, by: str = ...) -> None: ...

    def plan_phase(self, name: str, client: str = ..., priority: int | None = ...) -> Plan: ...


# ---------------------------------------------------------------- daemon or in-process
@contextmanager
def connect(cfg: Config, *, starts_services: bool = False) -> Iterator[Verbs]:
    """The daemon's client if one answers, else an in-process coordinator (see module doc)."""
    from gpusm.engine.coordinator import Coordinator

    url = daemon_url(cfg.api.listen)
    if find_daemon(url) is not None:
        say(f"via daemon at {url}", err=True)
        # A recovering daemon answers 503 for a while: wait for it rather than fail.
        with Client(url, token_file=cfg.token_path, max_wait_s=300.0, retries=300) as client:
            yield client
        return
    say(f"no daemon at {url}; running in-process", err=True)
    coordinator = Coordinator.from_config(cfg)
    try:
        yield coordinator
    finally:
        coordinator.close()
    if starts_services:
        say(
            "services keep running after this command; `gpusm serve` or the next command "
            "adopts them (`gpusm release --all` stops them)",
            err=True,
        )


# ---------------------------------------------------------------- rendering
def _state(state: str) -> Text:
    return plain(state, style=_STATE_STYLE.get(state, ""))


def status_view(status: Status) -> Group:
    """The status as Rich renderables: devices, services, leases, and from a daemon with
    webhooks one line each: where it posts, how many events wait, how it last failed."""
    devices = Table(box=None, title=None)
    for column in ("gpu", "name", "total", "used", "free", "foreign", "free for admission"):
        devices.add_column(column, no_wrap=True)
    for d in status.devices:
        if d.error:
            devices.add_row(str(d.index), plain(f"unreadable: {d.error}", style="red"))
            continue
        devices.add_row(
            str(d.index),
            plain(d.name),
            *(
                f"{v} MiB"
                for v in (
                    d.total_mib,
                    d.used_mib,
                    d.free_mib,
                    d.foreign_mib,
                    d.free_for_admission_mib,
                )
            ),
        )
    services = Table(box=None)
    # The device column only where there is more than one device to tell apart.
    several = len(status.devices) > 1
    columns = ["service", "state", "for", *(["gpu"] if several else []), "pid", "used"]
    for column in (*columns, "reserved", "prio", "leased by"):
        services.add_column(column, no_wrap=True)
    services.add_column("last error", overflow="fold")
    for s in status.services:
        ident = str(s.pid) if s.pid else (s.container_id or "")[:12]
        gpu = [",".join(str(d) for d in s.devices or (s.gpu,))] if several else []
        services.add_row(
            plain(s.name),
            _state(s.state),
            f"{s.in_state_s:.1f}s",
            *gpu,
            ident or "-",
            f"{s.used_mib} MiB",
            f"{s.reservation_mib} MiB",
            str(s.priority),
            plain(", ".join(s.leased_by) or "-"),
            plain(s.last_error or ""),
        )
    leases = ", ".join(f"{c} -> {p}" for c, p in sorted(status.leases.items())) or "none"
    recovery = "" if status.recovered else " (recovery has not finished)"
    parts: list[Table | Text] = [devices, Text(""), services, plain(f"leases: {leases}{recovery}")]
    if isinstance(status, DaemonStatus) and status.webhooks:
        webhooks = Table(box=None)
        for column in ("webhook", "url", "pending", "failures in a row"):
            webhooks.add_column(column, no_wrap=True)
        webhooks.add_column("last error", overflow="fold")
        for w in status.webhooks:
            webhooks.add_row(
                plain(w.name),
                plain(w.url),
                str(w.pending),
                plain(str(w.consecutive_failures), style="red" if w.consecutive_failures else ""),
                plain(w.last_error or "-"),
            )
        parts += [Text(""), webhooks]
    return Group(*parts)


def progress_view(
    status: Status, names: Sequence[str], elapsed: float, timeout: float | None
) -> Table:
    """One line per awaited service: state, time in state, elapsed and deadline."""
    table = Table(box=None)
    for column in ("service", "state", "in state", "elapsed", "deadline"):
        table.add_column(column, no_wrap=True)
    deadline = f"{max(0.0, timeout - elapsed):.0f}s left" if timeout else "daemon default"
    for s in status.services:
        if s.name in names:
            table.add_row(
                plain(s.name), _state(s.state), f"{s.in_state_s:.1f}s", f"{elapsed:.1f}s", deadline
            )
    return table


def _with_progress(
    verbs: Verbs, work: Callable[[], _T], names: Sequence[str], timeout: float | None
) -> _T:
    """Run ``work``; on a terminal, show the awaited services live while it runs."""
    if not is_tty() or not names:
        return work()
    done: list[_T] = []
    failed: list[BaseException] = []

    def run() -> None:
        try:
            done.append(work())
        except BaseException as exc:  # handed to the main thread below
            failed.append(exc)

    worker = threading.Thread(target=run, name="gpusm-cli-work", daemon=True)
    started = time.monotonic()
    worker.start()
    with Live(console=console, transient=True, refresh_per_second=4) as live:
        while worker.is_alive():
            # A status read failing must not hide the real outcome.
            with contextlib.suppress(Exception):
                view = progress_view(verbs.status(), names, time.monotonic() - started, timeout)
                live.update(view)
            worker.join(0.25)
    if failed:
        raise failed[0]
    return done[0]


def _print_json(obj: object) -> None:
    typer.echo(json.dumps(obj, indent=2, sort_keys=False))


# ---------------------------------------------------------------- commands
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
# The bounds are the API's (gpusm.api.schemas): the same input is refused in-process too.
TimeoutOption = Annotated[
    float | None,
    typer.Option(min=0.001, max=86400, help="Seconds to wait at most (default: the daemon's)."),
]
PriorityOption = Annotated[
    int | None,
    typer.Option(min=-(10**9), max=10**9, help="Override the request priority."),
]


def status(
    as_json: JsonOption = False,
    watch: Annotated[bool, typer.Option("--watch", "-w", help="Keep refreshing.")] = False,
    interval: Annotated[float, typer.Option(min=0.05, help="Seconds between refreshes.")] = 1.0,
    count: Annotated[int, typer.Option(min=0, help="With --watch: stop after N (0 = never).")] = 0,
    config: ConfigOption = None,
) -> None:
    """Show devices, services (state, pid, VRAM, leases) and leases."""
    cfg = load(config)
    with friendly_errors(), connect(cfg) as verbs:
        if not watch:
            found = verbs.status()
            if as_json:
                _print_json(found.as_dict())
            else:
                console.print(status_view(found))
            return
        with Live(status_view(verbs.status()), console=console, auto_refresh=False) as live:
            shown = 1
            while count == 0 or shown < count:
                time.sleep(interval)
                live.update(status_view(verbs.status()), refresh=True)
                shown += 1


def phase(
    name: Annotated[str, typer.Argument(help="The phase to enter.")],
    client: Annotated[str, typer.Option(help="Whose phase this is.")] = "default",
    timeout: TimeoutOption = None,
    priority: PriorityOption = None,
    as_json: JsonOption = False,
    config: ConfigOption = None,
) -> None:
    """Enter a phase: return once exactly its services are healthy."""
    check_client(client)
    cfg = load(config)
    with friendly_errors():
        names = list(cfg.phase(name).services)
        with connect(cfg, starts_services=bool(names)) as verbs:
            result = _with_progress(
                verbs, lambda: verbs.enter_phase(name, client, timeout, priority), names, timeout
            )
    if as_json:
        _print_json(result.as_dict())
        return
    say(f"phase {result.phase} ready for client {result.client} in {result.waited_s:.2f}s")
    for label, items in (
        ("started", result.started),
        ("kept", result.kept),
        ("prefetching", result.prefetching),
    ):
        if items:
            say(f"  {label}: {', '.join(items)}")
    for note in result.stopped:
        verb = "parked" if note.action == "park" else "stopped"
        say(f"  {verb} {note.service} ({note.kind}): {note.reason}")


def start(
    name: Annotated[str, typer.Argument(help="The service to start.")],
    timeout: TimeoutOption = None,
    config: ConfigOption = None,
) -> None:
    """Start one service without a lease; return once it is healthy."""
    cfg = load(config)
    with friendly_errors():
        cfg.service(name)
        with connect(cfg, starts_services=True) as verbs:
            _with_progress(verbs, lambda: verbs.start_service(name, _BY, timeout), [name], timeout)
    say(f"service {name} is healthy")


def stop(
    name: Annotated[str, typer.Argument(help="The service to stop.")],
    config: ConfigOption = None,
) -> None:
    """Stop one service and wait until its VRAM is back."""
    cfg = load(config)
    with friendly_errors():
        cfg.service(name)
        with connect(cfg) as verbs:
            verbs.stop_service(name, _BY)
    say(f"service {name} is stopped")


def park(
    name: Annotated[str, typer.Argument(help="The service to park.")],
    config: ConfigOption = None,
) -> None:
    """Park one service: its process stays, its VRAM goes back (verified on the GPU)."""
    cfg = load(config)
    with friendly_errors():
        cfg.service(name)
        with connect(cfg) as verbs:
            note = verbs.park_service(name, _BY)
    if note.action == "park":
        say(f"service {name} is parked")
    else:
        fail(f"service {name} could not park and was stopped: {note.reason}")


def reset(
    name: Annotated[str, typer.Argument(help="The failed service to clear.")],
    config: ConfigOption = None,
) -> None:
    """Clear a service that gave up (failed) so that it may start again."""
    cfg = load(config)
    with friendly_errors():
        cfg.service(name)
        with connect(cfg) as verbs:
            verbs.reset_service(name, _BY)
    say(f"service {name} may start again")


def release(
    client: Annotated[str | None, typer.Option(help="Drop this client's lease.")] = None,
    all_: Annotated[
        bool, typer.Option("--all", help="Drop every lease and stop every service.")
    ] = False,
    config: ConfigOption = None,
) -> None:
    """Drop a client's lease (services stay warm), or with --all stop everything."""
    if all_ and client is not None:
        fail("give --client C or --all, not both", EXIT_CONFIG)
    who = check_client("default" if client is None else client)
    cfg = load(config)
    with friendly_errors(), connect(cfg) as verbs:
        if all_:
            notes = verbs.release_all(_BY)
            say(f"released every lease; stopped {len(notes)} service(s)")
            for note in notes:
                say(f"  stopped {note.service}")
            return
        verbs.release(who)
    say(f"released the lease of client {who}")


def plan(
    name: Annotated[str, typer.Argument(help="The phase to plan.")],
    client: Annotated[str, typer.Option(help="Whose phase this would be.")] = "default",
    priority: PriorityOption = None,
    as_json: JsonOption = False,
    config: ConfigOption = None,
) -> None:
    """Dry run: what entering a phase would stop and start, or why it cannot fit."""
    check_client(client)
    cfg = load(config)
    with friendly_errors():
        cfg.phase(name)
        with connect(cfg) as verbs:
            found = verbs.plan_phase(name, client, priority)
    if as_json:
        _print_json(asdict(found))
        return
    verdict = "fits" if found.fits else "does NOT fit"
    say(
        f"phase {name} {verdict}: need {found.need_mib} MiB, {found.free_before_mib} MiB free "
        f"now, {found.free_after_mib} MiB after the stops"
    )
    for label, items in (
        ("would start", found.to_start),
        ("already running", found.already_running),
        ("blocked by", found.blocked_by),
    ):
        if items:
            say(f"  {label}: {', '.join(items)}")
    for victim in found.victims:
        say(f"  would {victim.kind} {victim.name} ({victim.frees_mib} MiB): {victim.reason}")
    say(f"  {found.reason}")


def doctor(config: ConfigOption = None) -> None:
    """Check the set-up: config, GPU, Docker, database, API port, token. Exit 1 if any fails."""
    from gpusm.cli.doctor import run_checks

    results = run_checks(config)
    for check in results:
        mark = Text("✓ ", style="green") if check.ok else Text("✗ ", style="bold red")
        line = Text.assemble(mark, plain(f"{check.what}: {check.detail}"))
        if not check.ok and check.fix:
            line.append_text(plain(f" — fix: {check.fix}", style="yellow"))
        console.print(line, soft_wrap=True)
    if not all(check.ok for check in results):
        raise typer.Exit(EXIT_ERROR)


def register(app: typer.Typer) -> None:
    """Add the operating commands to ``app``."""
    for command in (status, phase, start, stop, park, reset, release, plan, doctor):
        app.command(command.__name__)(command)
