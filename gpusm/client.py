"""``gpusm.Client``: the coordinator's verbs over HTTP, for workers in other processes.

::

    from gpusm import Client

    with Client() as gpu:                      # http://127.0.0.1:7723, token from $GPUSM_TOKEN
        gpu.enter_phase("tts", client="worker-1")
        ...                                    # call the TTS server
        gpu.release("worker-1")

Results are the same frozen dataclasses the in-process coordinator returns
(:class:`~gpusm.results.PhaseResult`, :class:`~gpusm.results.Status` — from the daemon
a :class:`~gpusm.wire.DaemonStatus`, which adds its webhooks —,
:class:`~gpusm.domain.policy.Plan`, :class:`~gpusm.domain.events.RecordedEvent`), and
refusals raise the same errors (:class:`~gpusm.errors.InsufficientVram` with its
numbers, :class:`~gpusm.errors.UnknownName`, :class:`~gpusm.errors.RequestTimeout`,
:class:`~gpusm.errors.ServiceStartFailed`, else :class:`~gpusm.errors.GpusmError`).

A daemon restart is ridden out: a call that finds no daemon, or a daemon still
recovering, or (for the idempotent verbs) loses its connection mid-request, is repeated
for up to ``max_wait_s`` before it raises; see :class:`Client`.

Answers are decoded, and problems mapped to errors, by :mod:`gpusm.wire`, the
description the daemon encodes with; this module never imports :mod:`gpusm.api`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Generator, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from gpusm.config import Config, load_config
from gpusm.domain.events import RecordedEvent
from gpusm.domain.policy import Plan
from gpusm.errors import GpusmError, RequestTimeout
from gpusm.ports import EventQuery
from gpusm.results import PhaseResult, ReloadResult, StopNote
from gpusm.wire import (
    DaemonStatus,
    EventPage,
    ReleasedAll,
    Renewed,
    error_from_problem,
    from_json,
    parse_listen,
    read_token,
)

__all__ = ["DEFAULT_URL", "Client", "daemon_url", "find_daemon"]

DEFAULT_URL = "http://127.0.0.1:7723"
_PAGE = 1000
_log = logging.getLogger(__name__)


def daemon_url(listen: str) -> str:
    """The base URL for a daemon listening on ``listen`` (``HOST:PORT``; wildcards -> loopback)."""
    return parse_listen(listen).url


def find_daemon(url: str, timeout: float = 1.0) -> dict[str, object] | None:
    """The ``/healthz`` answer of a gpusm daemon at ``url``, or None if none answers."""
    try:
        response = httpx.get(f"{url}/healthz", timeout=timeout)
        found = response.json()
    except (httpx.HTTPError, ValueError):
        return None
    if response.status_code == 200 and isinstance(found, dict) and found.get("service") == "gpusm":
        return found
    return None


class Client:
    """A worker's handle on a running ``gpusm serve`` (see the module docstring).

    ``token`` defaults to ``$GPUSM_TOKEN``, else the contents of ``token_file``.
    ``timeout`` bounds quick calls; calls that wait for services (phase, ensure, start,
    stop, release-all) wait for the daemon's own deadline plus ``timeout``.
    ``transport`` replaces httpx's (for tests).

    **Retries** (a daemon restarting under a worker). A call is repeated when

    - no daemon answers (connection refused or connect timeout): the request never
      reached one, so every verb repeats it;
    - the daemon answers ``503`` with ``Retry-After`` (recovering or shutting down): it
      refused before doing anything, so every verb repeats it (not ``healthz``);
    - the connection breaks after the request went out (disconnect, read or write error
      mid-response) — only for the idempotent calls: ``enter_phase``,
      ``ensure_service``, ``release`` and the reads (``status``, ``plan_phase``,
      ``events``, ``healthz``). ``start_service``, ``stop_service``, ``reset_service``
      and ``release_all`` may have taken effect, so they raise at once, saying so.

    Any other answer — a 4xx or 5xx problem such as :class:`~gpusm.errors.UnknownName`
    or :class:`~gpusm.errors.InsufficientVram`, a 503 without ``Retry-After`` — and a
    read timeout (:class:`~gpusm.errors.RequestTimeout`) raise at once. Retries wait
    50 ms, doubling up to 1 s, or longer when ``Retry-After`` (capped at 10 s) asks; they
    go on for at most ``max_wait_s`` seconds (default 30) after the first failure, and at
    most ``retries`` times if it is given; then a :class:`~gpusm.errors.GpusmError`
    names the last failure, the tries and the seconds spent. A repeated call keeps its
    deadline (the daemon is sent only the ``timeout`` left of ``timeout + max_wait_s``),
    so a call ends within its own timeout (its ``timeout`` argument, if given, plus the
    client's ``timeout``) plus ``max_wait_s``. ``max_wait_s=0`` tries once.

    **Leases.** While the client is open, a background thread renews, every
    ``renew_every_s`` seconds (default 15; None: never), the lease of each client name
    that took one through it (``enter_phase``, ``ensure_service``) and has not released
    it, so a worker that is busy for a long phase keeps its services while one that is
    killed loses them after the daemon's ``api.lease_ttl_s``.
    """

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        token: str | None = None,
        *,
        token_file: str | os.PathLike[str] | None = None,
        timeout: float = 10.0,
        retries: int | None = None,
        max_wait_s: float = 30.0,
        renew_every_s: float | None = 15.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.renew_every_s = renew_every_s
        self._held: set[str] = set()
        self._held_lock = threading.Lock()
        self._closed = threading.Event()
        self._renewer: threading.Thread | None = None
        self.timeout = timeout
        self.retries = retries
        self.max_wait_s = max_wait_s
        if token is None:
            token = read_token(Path(token_file) if token_file is not None else None)
        headers = {"Accept": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._http = httpx.Client(
            base_url=self.base_url, headers=headers, timeout=timeout, transport=transport
        )

    @classmethod
    def from_config(cls, config: str | os.PathLike[str] | Config, **kwargs: Any) -> Client:
        """A client for the daemon a config file describes (its ``api.listen`` and token)."""
        cfg = config if isinstance(config, Config) else load_config(config)
        kwargs.setdefault("token_file", cfg.token_path)
        return cls(daemon_url(cfg.api.listen), **kwargs)

    # ------------------------------------------------------------ lifecycle
    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop renewing leases and close the connection pool; idempotent."""
        self._closed.set()
        if self._renewer is not None and self._renewer is not threading.current_thread():
            self._renewer.join(timeout=5)
        self._http.close()

    # ------------------------------------------------------------ verbs
    def healthz(self) -> dict[str, Any]:
        """The daemon's liveness answer (``status``: ok, recovering, failed, stopping)."""
        found: dict[str, Any] = self._json(
            "GET", "/healthz", idempotent=True, retry_unavailable=False
        )
        return found

    def status(self) -> DaemonStatus:
        """Devices, services and leases now (a :class:`~gpusm.results.Status`, as the
        coordinator's), and how each of the daemon's webhooks stands (``webhooks``)."""
        return from_json(DaemonStatus, self._json("GET", "/gpu/status", idempotent=True))

    def enter_phase(
        self,
        name: str,
        client: str = "default",
        timeout: float | None = None,
        priority: int | None = None,
    ) -> PhaseResult:
        """Make exactly ``name``'s services healthy for ``client``; block until they are."""
        body: dict[str, Any] = {"phase": name, "client": client}
        if timeout is not None:
            body["timeout"] = timeout
        if priority is not None:
            body["priority"] = priority
        found = self._json("POST", "/gpu/phase", body, blocking=True, wait=timeout, idempotent=True)
        self._hold(client)
        return from_json(PhaseResult, found)

    def ensure_service(
        self, name: str, client: str = "default", timeout: float | None = None
    ) -> PhaseResult:
        """Make one service healthy for ``client`` (its lease becomes just that service)."""
        body: dict[str, Any] = {"client": client}
        if timeout is not None:
            body["timeout"] = timeout
        path = f"/gpu/services/{_segment(name)}/ensure"
        found = self._json("POST", path, body, blocking=True, wait=timeout, idempotent=True)
        self._hold(client)
        return from_json(PhaseResult, found)

    def release(self, client: str = "default") -> None:
        """Drop ``client``'s lease; its services stay warm until their room is needed."""
        with self._held_lock:
            self._held.discard(client)
        self._json("POST", "/gpu/release", {"client": client}, idempotent=True)

    def renew(self, client: str = "default") -> bool:
        """Keep ``client``'s lease alive; False if it has none any more (it expired or was
        revoked: enter the phase again)."""
        found = self._json("POST", "/gpu/leases/renew", {"client": client}, idempotent=True)
        return from_json(Renewed, found).renewed

    def reload(self, by: str = "client") -> ReloadResult:
        """Make the daemon read its config file again and apply it without a restart;
        ReloadRefused (running config unchanged) if the file is invalid or changes what
        only a restart can."""
        return from_json(ReloadResult, self._json("POST", "/gpu/reload", {"by": by}))

    # ------------------------------------------------------------ lease renewal
    def _hold(self, client: str) -> None:
        if self.renew_every_s is None:
            return
        with self._held_lock:
            self._held.add(client)
            if self._renewer is None and not self._closed.is_set():
                self._renewer = threading.Thread(
                    target=self._renew_loop, name="gpusm-client-renew", daemon=True
                )
                self._renewer.start()

    def _renew_loop(self) -> None:
        assert self.renew_every_s is not None
        while not self._closed.wait(self.renew_every_s):
            with self._held_lock:
                clients = sorted(self._held)
            for client in clients:
                try:
                    if not self.renew(client):
                        with self._held_lock:
                            self._held.discard(client)  # gone: the next call hears why
                except GpusmError:
                    continue  # the daemon is away; the retries and the next round cover it

    def release_all(self, by: str = "client") -> list[StopNote]:
        """Drop every lease and stop every running service."""
        found = self._json("POST", "/gpu/release-all", {"by": by}, blocking=True)
        return list(from_json(ReleasedAll, found).stopped)

    def start_service(self, name: str, by: str = "client", timeout: float | None = None) -> None:
        """Start one service without a lease; return once it is healthy."""
        body: dict[str, Any] = {"by": by}
        if timeout is not None:
            body["timeout"] = timeout
        self._json(
            "POST", f"/gpu/services/{_segment(name)}/start", body, blocking=True, wait=timeout
        )

    def stop_service(self, name: str, by: str = "client") -> StopNote:
        """Stop one service now and wait until its VRAM is back."""
        found = self._json(
            "POST", f"/gpu/services/{_segment(name)}/stop", {"by": by}, blocking=True
        )
        return from_json(StopNote, found)

    def park_service(self, name: str, by: str = "client") -> StopNote:
        """Park one service and wait until the GPU shows it parked (or it was stopped)."""
        found = self._json(
            "POST", f"/gpu/services/{_segment(name)}/park", {"by": by}, blocking=True
        )
        return from_json(StopNote, found)

    def reset_service(self, name: str, by: str = "client") -> None:
        """Clear a service that gave up (``failed``) so that it may start again."""
        self._json("POST", f"/gpu/services/{_segment(name)}/reset", {"by": by})

    def plan_phase(self, name: str, client: str = "default", priority: int | None = None) -> Plan:
        """Dry run: what entering ``name`` would stop and start, or why it cannot fit."""
        params: dict[str, Any] = {"client": client}
        if priority is not None:
            params["priority"] = priority
        found = self._json("GET", f"/gpu/plan/{_segment(name)}", params=params, idempotent=True)
        return from_json(Plan, found)

    def events_page(
        self, query: EventQuery | None = None, page_size: int = 100
    ) -> tuple[list[RecordedEvent], int | None]:
        """One page of events after ``query.after_seq`` and the ``after_seq`` of the next
        page (None when there is no more). ``query.limit`` and ``newest_first`` are ignored."""
        query = query or EventQuery()
        params: list[tuple[str, str | int]] = [
            ("after_seq", query.after_seq),
            ("limit", page_size),
        ]
        if query.stream is not None:
            params.append(("service", query.stream))
        for kind in query.types or ():
            params.append(("type", kind))
        for key, at in (("since", query.since), ("until", query.until)):
            if at is not None:
                params.append((key, at.isoformat()))
        found = self._json("GET", "/gpu/events", params=params, idempotent=True)
        page = from_json(EventPage, found)
        return list(page.events), page.next_after_seq

    def events(self, query: EventQuery | None = None) -> list[RecordedEvent]:
        """Events like ``Coordinator.events``: oldest first (newest first if asked); with
        ``limit``, the first ``limit`` in that order. Reads page by page."""
        query = query or EventQuery()
        found: list[RecordedEvent] = []
        after: int | None = query.after_seq
        while after is not None:
            page_query = EventQuery(
                stream=query.stream,
                types=query.types,
                since=query.since,
                until=query.until,
                after_seq=after,
            )
            page, after = self.events_page(page_query, _PAGE)
            found += page
            if query.limit is not None and not query.newest_first and len(found) >= query.limit:
                break
        if query.newest_first:
            found.reverse()
        return found if query.limit is None else found[: query.limit]

    def stream_events(
        self,
        query: EventQuery | None = None,
        *,
        after_seq: int = 0,
        reconnect: bool = True,
        heartbeat_s: float = 15.0,
    ) -> Iterator[RecordedEvent]:
        """Follow the log live (``GET /gpu/events/stream``): every event after ``after_seq``
        (else ``query.after_seq``), then each new one as it is recorded; endless unless
        ``query.limit`` events have been yielded. ``query.stream`` and ``query.types``
        filter; ``since``, ``until`` and ``newest_first`` are not supported (ValueError).

        A dropped connection (the daemon restarted, even after ``kill -9``) is resumed with
        ``Last-Event-ID``, the seq of the last event yielded, so the caller sees every seq
        exactly once. Reconnects back off and give up like the other calls' retries (see
        the class docstring: ``max_wait_s`` after the first failure since the daemon last
        sent something, at most ``retries`` times in a row); ``reconnect=False`` raises at
        the first failure. The daemon sends a heartbeat every ``heartbeat_s`` seconds while
        quiet; a connection silent for three of them is taken as dropped. Close the
        iterator (or leave a ``for`` loop) to hang up.
        """
        query = query or EventQuery()
        if query.since is not None or query.until is not None or query.newest_first:
            raise ValueError(
                "stream_events follows the log forward: since, until and newest_first "
                "are not supported (use events())"
            )
        params: list[tuple[str, str | int | float | bool | None]] = [("heartbeat_s", heartbeat_s)]
        if query.stream is not None:
            params.append(("service", query.stream))
        params += [("type", kind) for kind in query.types or ()]
        cursor = _Cursor(after_seq or query.after_seq, query.limit)
        timeout = httpx.Timeout(self.timeout, read=max(3 * heartbeat_s, self.timeout))
        started = time.monotonic()
        window_end: float | None = None  # the first failure since the last progress + max_wait_s
        tries = 0
        while cursor.left is None or cursor.left > 0:
            tries += 1
            cursor.progressed = False
            failure = yield from self._follow(params, timeout, cursor)
            if failure is None:
                return
            if not reconnect:
                raise failure.error from failure.cause
            now = time.monotonic()
            if cursor.progressed:  # the daemon was answering: a fresh window
                window_end, tries = None, 1
            if window_end is None:
                window_end = now + self.max_wait_s
            pause = min(max(failure.pause, _backoff(tries)), window_end - now)
            if pause <= 0 or (self.retries is not None and tries > self.retries):
                raise self._gave_up(failure, tries, started) from failure.cause
            _log.debug(
                "event stream: %s; resume after %d in %.2f s", failure.error, cursor.last, pause
            )
            time.sleep(pause)

    def _follow(
        self,
        params: list[tuple[str, str | int | float | bool | None]],
        timeout: httpx.Timeout,
        cursor: _Cursor,
    ) -> Generator[RecordedEvent, None, _Failure | None]:
        """One connection to the stream: yield its new events; return why it ended (None:
        ``cursor.left`` reached 0), or raise an error that is not worth a retry."""
        path = "/gpu/events/stream"
        headers = {"Accept": "text/event-stream", "Last-Event-ID": str(cursor.last)}
        try:
            with self._http.stream(
                "GET", path, params=params, headers=headers, timeout=timeout
            ) as response:
                if response.status_code != 200:
                    response.read()
                    pause = _retry_after(response)
                    try:
                        _answer(response)
                    except GpusmError as exc:
                        if pause is None:
                            raise
                        return _Failure(exc, exc, pause)
                    raise GpusmError(f"GET {path}: the daemon answered {response.status_code}")
                for message in _sse_messages(response.iter_lines()):
                    cursor.progressed = True  # the daemon is answering
                    if message.data is None:
                        continue  # a heartbeat, a retry hint
                    event = from_json(RecordedEvent, message.data)
                    if event.seq <= cursor.last:
                        continue  # never twice, whatever a daemon sends
                    cursor.last = event.seq
                    yield event
                    if cursor.left is not None:
                        cursor.left -= 1
                        if cursor.left <= 0:
                            return None
        except (*_UNSENT, *_LOST, httpx.ReadTimeout) as exc:
            error = GpusmError(
                f"GET {path}: lost the gpusm daemon at {self.base_url} ({_describe(exc)})"
            )
            return _Failure(error, exc)
        except httpx.HTTPError as exc:
            raise GpusmError(f"GET {path} at {self.base_url} failed: {exc}") from exc
        error = GpusmError(f"GET {path}: the gpusm daemon at {self.base_url} ended the stream")
        return _Failure(error, error)

    # ------------------------------------------------------------ transport
    def _json(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | None = None,
        *,
        params: Any = None,
        blocking: bool = False,
        wait: float | None = None,
        idempotent: bool = False,
        retry_unavailable: bool = True,
    ) -> Any:
        """Send, retry as the class docstring says, and return the JSON answer or raise the
        mapped error.

        A ``blocking`` call waits on the daemon for up to ``wait`` seconds (None: the
        daemon's own deadline), so the read timeout is lifted accordingly. ``idempotent``
        calls are also repeated when the connection broke after the request was sent.
        """
        started = time.monotonic()
        # No try starts after ``budget_end`` (None: only the retry window bounds them),
        # so that a call ends within its own timeout plus max_wait_s.
        budget_end = None
        if not blocking or wait is not None:
            budget_end = started + (wait or 0.0) + self.max_wait_s
        window_end: float | None = None  # the first failure + max_wait_s
        tries = 0
        failure: _Failure | None = None
        while True:
            sent, daemon_wait = body, wait
            if failure is not None and wait is not None and budget_end is not None:
                # A retried blocking call keeps its deadline: the daemon gets what is left.
                daemon_wait = min(wait, budget_end - time.monotonic())
                if daemon_wait <= 0:
                    raise self._gave_up(failure, tries, started) from failure.cause
                sent = {**(body or {}), "timeout": daemon_wait}
            tries += 1
            found = self._once(
                method, path, sent, params, blocking, daemon_wait, idempotent, retry_unavailable
            )
            if not isinstance(found, _Failure):
                return found
            failure = found
            now = time.monotonic()
            if window_end is None:
                window_end = now + self.max_wait_s
                if budget_end is not None:
                    window_end = min(window_end, budget_end)
            pause = min(max(failure.pause, _backoff(tries)), window_end - now)
            if pause <= 0 or (self.retries is not None and tries > self.retries):
                raise self._gave_up(failure, tries, started) from failure.cause
            _log.debug("%s %s: %s; retry %d in %.2f s", method, path, failure.error, tries, pause)
            time.sleep(pause)

    def _once(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | None,
        params: Any,
        blocking: bool,
        wait: float | None,
        idempotent: bool,
        retry_unavailable: bool,
    ) -> Any:
        """One try: the JSON answer, a :class:`_Failure` that may be retried, or an error."""
        if not blocking:
            timeout = httpx.Timeout(self.timeout)
        else:
            read = None if wait is None else wait + self.timeout
            timeout = httpx.Timeout(self.timeout, read=read)
        try:
            response = self._http.request(method, path, json=body, params=params, timeout=timeout)
        except _UNSENT as exc:
            # Never reached the daemon: safe to repeat, even a POST.
            error = GpusmError(
                f"no gpusm daemon answers at {self.base_url} ({_describe(exc)}); "
                "start one with `gpusm serve`"
            )
            return _Failure(error, exc)
        except _LOST as exc:
            error = GpusmError(
                f"{method} {path}: the connection to the gpusm daemon at {self.base_url} "
                f"broke before it answered ({_describe(exc)})"
            )
            if idempotent:
                return _Failure(error, exc)
            raise GpusmError(
                f"{error}; it may or may not have taken effect, so it is not repeated: "
                "check `gpusm status` before trying again"
            ) from exc
        except httpx.TimeoutException as exc:
            raise RequestTimeout(f"{method} {path}: the daemon did not answer in time") from exc
        except httpx.HTTPError as exc:
            raise GpusmError(f"{method} {path} at {self.base_url} failed: {exc}") from exc
        retry_after = _retry_after(response) if retry_unavailable else None
        if retry_after is None:
            return _answer(response)
        # Refused before anything was done (recovering, shutting down): safe to repeat.
        try:
            _answer(response)
        except GpusmError as exc:
            return _Failure(exc, exc, retry_after)
        raise GpusmError(f"gpusm daemon answered {response.status_code}")  # pragma: no cover

    def _gave_up(self, failure: _Failure, tries: int, started: float) -> GpusmError:
        return GpusmError(
            f"{failure.error}; gave up after {tries} {'try' if tries == 1 else 'tries'} in "
            f"{time.monotonic() - started:.1f} s (max_wait_s={self.max_wait_s:g})"
        )


@dataclass(frozen=True)
class _Failure:
    """A try that may be repeated: what went wrong, and the pause the daemon asked for."""

    error: GpusmError
    cause: BaseException
    pause: float = 0.0


# Retries back off from 50 ms, doubling up to 1 s; Retry-After (≤ 10 s) is honoured.
_BACKOFF_FIRST_S = 0.05
_BACKOFF_MAX_S = 1.0
_RETRY_AFTER_MAX_S = 10.0
# The request never reached the daemon: safe to repeat for every verb.
_UNSENT = (httpx.ConnectError, httpx.ConnectTimeout)
# The connection broke after the request went out: the daemon may have acted on it.
_LOST = (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError, httpx.CloseError)


def _backoff(tries: int) -> float:
    return float(min(_BACKOFF_FIRST_S * 2 ** (tries - 1), _BACKOFF_MAX_S))


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _segment(name: str) -> str:
    # A name with "/" or "%" must stay one path segment (the daemon then answers 404).
    from urllib.parse import quote

    return quote(name, safe="")


def _retry_after(response: httpx.Response) -> float | None:
    """Seconds to wait before repeating a request a 503 with ``Retry-After`` refused."""
    if response.status_code != 503 or "retry-after" not in response.headers:
        return None
    value = response.headers["retry-after"].strip()
    try:
        seconds = float(value)
    except ValueError:
        try:  # an HTTP date
            seconds = (parsedate_to_datetime(value) - datetime.now(UTC)).total_seconds()
        except (TypeError, ValueError):
            seconds = 1.0
    return max(0.0, min(seconds, _RETRY_AFTER_MAX_S))


def _answer(response: httpx.Response) -> Any:
    try:
        found = response.json()
    except ValueError:
        found = None
    if response.is_success and found is not None:
        return found
    if isinstance(found, dict) and "status" in found:
        raise error_from_problem(response.status_code, found)
    text = response.text[:200].strip() or response.reason_phrase
    raise GpusmError(f"gpusm daemon answered {response.status_code}: {text}")


@dataclass
class _Cursor:
    """Where a followed stream is: the last seq yielded, how many more to yield (None:
    endless), and whether the current connection has heard from the daemon."""

    last: int
    left: int | None
    progressed: bool = False


@dataclass(frozen=True)
class _SseMessage:
    """One dispatched Server-Sent Events message (``data`` None: no data field)."""

    id: str | None
    event: str | None
    data: str | None


def _sse_messages(lines: Iterable[str]) -> Iterator[_SseMessage]:
    """The messages in an ``text/event-stream`` (WHATWG HTML, "Server-sent events"):
    ``field: value`` lines up to a blank line; ``:`` starts a comment. A message with no
    ``data`` (a comment, a ``retry`` hint) is yielded with ``data`` None, so that the
    caller sees the connection is alive."""
    ident: str | None = None
    kind: str | None = None
    data: list[str] = []
    seen = False
    for line in lines:
        if not line:
            if seen:
                yield _SseMessage(ident, kind, "\n".join(data) if data else None)
            ident, kind, data, seen = None, None, [], False
            continue
        seen = True
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "data":
            data.append(value)
        elif field == "id" and "\0" not in value:
            ident = value
        elif field == "event":
            kind = value
