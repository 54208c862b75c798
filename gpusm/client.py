"""``gpusm.Client``: the coordinator's verbs over HTTP, for workers in other processes.

::

    from gpusm import Client

    with Client() as gpu:                      # http://127.0.0.1:7723, token from $GPUSM_TOKEN
        gpu.enter_phase("tts", client="worker-1")
        ...                                    # call the TTS server
        gpu.release("worker-1")

Results are the same frozen dataclasses the in-process coordinator returns
(:class:`~gpusm.results.PhaseResult`, :class:`~gpusm.results.Status`,
:class:`~gpusm.domain.policy.Plan`, :class:`~gpusm.domain.events.RecordedEvent`), and
refusals raise the same errors (:class:`~gpusm.errors.InsufficientVram` with its
numbers, :class:`~gpusm.errors.UnknownName`, :class:`~gpusm.errors.RequestTimeout`,
:class:`~gpusm.errors.ServiceStartFailed`, else :class:`~gpusm.errors.GpusmError`).

Connection failures are retried a bounded number of times (a request that never
reached the daemon is safe to repeat), and so are 503 answers that carry
``Retry-After`` (the daemon is recovering or restarting), within ``max_wait_s``.

Answers are decoded, and problems mapped to errors, by :mod:`gpusm.wire`, the
description the daemon encodes with; this module never imports :mod:`gpusm.api`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from gpusm.config import Config, load_config
from gpusm.domain.events import RecordedEvent
from gpusm.domain.policy import Plan
from gpusm.errors import GpusmError, RequestTimeout
from gpusm.ports import EventQuery
from gpusm.results import PhaseResult, Status, StopNote
from gpusm.wire import (
    EventPage,
    ReleasedAll,
    error_from_problem,
    from_json,
    parse_listen,
    read_token,
)

__all__ = ["DEFAULT_URL", "Client", "daemon_url", "find_daemon"]

DEFAULT_URL = "http://127.0.0.1:7723"
_PAGE = 1000


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
    ``retries`` and ``max_wait_s`` bound the retries described above. ``transport``
    replaces httpx's (for tests).
    """

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        token: str | None = None,
        *,
        token_file: str | os.PathLike[str] | None = None,
        timeout: float = 10.0,
        retries: int = 5,
        max_wait_s: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
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
        """Close the connection pool; idempotent."""
        self._http.close()

    # ------------------------------------------------------------ verbs
    def healthz(self) -> dict[str, Any]:
        """The daemon's liveness answer (``status``: ok, recovering, failed, stopping)."""
        found: dict[str, Any] = self._json("GET", "/healthz", retry_unavailable=False)
        return found

    def status(self) -> Status:
        """Devices, services and leases now."""
        return from_json(Status, self._json("GET", "/gpu/status"))

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
        found = self._json("POST", "/gpu/phase", body, blocking=True, wait=timeout)
        return from_json(PhaseResult, found)

    def ensure_service(
        self, name: str, client: str = "default", timeout: float | None = None
    ) -> PhaseResult:
        """Make one service healthy for ``client`` (its lease becomes just that service)."""
        body: dict[str, Any] = {"client": client}
        if timeout is not None:
            body["timeout"] = timeout
        path = f"/gpu/services/{_segment(name)}/ensure"
        return from_json(PhaseResult, self._json("POST", path, body, blocking=True, wait=timeout))

    def release(self, client: str = "default") -> None:
        """Drop ``client``'s lease; its services stay warm until their room is needed."""
        self._json("POST", "/gpu/release", {"client": client})

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

    def reset_service(self, name: str, by: str = "client") -> None:
        """Clear a service that gave up (``failed``) so that it may start again."""
        self._json("POST", f"/gpu/services/{_segment(name)}/reset", {"by": by})

    def plan_phase(self, name: str, client: str = "default", priority: int | None = None) -> Plan:
        """Dry run: what entering ``name`` would stop and start, or why it cannot fit."""
        params: dict[str, Any] = {"client": client}
        if priority is not None:
            params["priority"] = priority
        return from_json(Plan, self._json("GET", f"/gpu/plan/{_segment(name)}", params=params))

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
        page = from_json(EventPage, self._json("GET", "/gpu/events", params=params))
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
        retry_unavailable: bool = True,
    ) -> Any:
        """Send, retry as documented, and return the JSON answer or raise the mapped error.

        A ``blocking`` call waits on the daemon for up to ``wait`` seconds (None: the
        daemon's own deadline), so the read timeout is lifted accordingly.
        """
        if not blocking:
            timeout = httpx.Timeout(self.timeout)
        else:
            read = None if wait is None else wait + self.timeout
            timeout = httpx.Timeout(self.timeout, read=read)
        deadline = time.monotonic() + self.max_wait_s
        attempt = 0
        while True:
            attempt += 1
            try:
                response = self._http.request(
                    method, path, json=body, params=params, timeout=timeout
                )
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                # Never reached the daemon: safe to repeat, even a POST.
                if attempt > self.retries or time.monotonic() >= deadline:
                    raise GpusmError(
                        f"no gpusm daemon answers at {self.base_url} ({exc}); "
                        "start one with `gpusm serve`"
                    ) from exc
                time.sleep(min(0.1 * 2**attempt, 2.0, max(0.0, deadline - time.monotonic())))
                continue
            except httpx.TimeoutException as exc:
                raise RequestTimeout(f"{method} {path}: the daemon did not answer in time") from exc
            except httpx.HTTPError as exc:
                raise GpusmError(f"{method} {path} at {self.base_url} failed: {exc}") from exc
            pause = _retry_after(response)
            if (
                retry_unavailable
                and pause is not None
                and attempt <= self.retries
                and time.monotonic() + pause < deadline
            ):
                time.sleep(pause)
                continue
            return _answer(response)


def _segment(name: str) -> str:
    # A name with "/" or "%" must stay one path segment (the daemon then answers 404).
    from urllib.parse import quote

    return quote(name, safe="")


def _retry_after(response: httpx.Response) -> float | None:
    if response.status_code != 503 or "retry-after" not in response.headers:
        return None
    try:
        return max(0.0, min(float(response.headers["retry-after"]), 10.0))
    except ValueError:
        return 1.0


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
