"""Delivering the event log to webhooks: one thread per webhook, a cursor per webhook.

Each thread reads the events of its webhook's types after its cursor (the last ``seq``
the receiver acknowledged, kept in the database), POSTs them in ``seq`` order in
batches of at most ``batch_size``, and moves the cursor only after a 2xx answer. A
failed batch is sent again, the same events under the same ``X-Gpusm-Delivery``, after
``min_backoff_s`` doubling up to ``max_backoff_s``. So delivery is at least once: a
daemon killed between a receiver's 2xx and the cursor's commit sends that batch again,
and receivers deduplicate by ``seq``.

A webhook seen for the first time starts after the newest event at that moment (the
daemon seeds its cursor before recovery, so what recovery records is delivered).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from gpusm.domain.events import RecordedEvent
from gpusm.errors import GpusmError
from gpusm.notify.signing import SIGNATURE_HEADER, TIMESTAMP_HEADER, sign
from gpusm.notify.webhook import PostResult
from gpusm.notify_config import ALL_EVENTS, WebhookConfig, display_url
from gpusm.ports import CursorStore, EventQuery, EventStore, WebhookStatus
from gpusm.version import VERSION

__all__ = ["Encode", "Sender", "WebhookNotifier", "WebhookWorker"]

# (webhook name, events) -> the POST body.
Encode = Callable[[str, Sequence[RecordedEvent]], bytes]
_log = logging.getLogger("gpusm.notify")
# Events read per query while counting what waits.
_PAGE = 1000
# How long close() waits for a thread stuck in a POST before leaving it (a daemon thread).
_JOIN_S = 2.0


class Sender(Protocol):
    """Sends one POST; never raises (see :class:`gpusm.notify.webhook.HttpSender`)."""

    def post(self, url: str, body: bytes, headers: Mapping[str, str]) -> PostResult:
        """POST ``body`` to ``url``."""
        ...

    def close(self) -> None:
        """Release connections; idempotent."""
        ...


@dataclass
class _Batch:
    events: list[RecordedEvent]
    attempt: int = 0

    @property
    def delivery(self) -> str:
        return f"{self.events[0].seq}-{self.events[-1].seq}"


class WebhookWorker:
    """One webhook's delivery loop (:meth:`run`) and its status."""

    def __init__(
        self,
        hook: WebhookConfig,
        secret: bytes,
        *,
        store: EventStore,
        cursors: CursorStore,
        sender: Sender,
        encode: Encode,
        poll_s: float = 0.2,
    ) -> None:
        self.hook = hook
        self.name = hook.key
        self._secret = secret
        self._store = store
        self._cursors = cursors
        self._sender = sender
        self._encode = encode
        self._poll_s = poll_s
        self._lock = threading.Lock()
        self._cursor = 0
        # Seqs of this webhook's events after the cursor, counted so far (oldest first).
        self._waiting: deque[int] = deque()
        self._scanned = 0
        self._retry: _Batch | None = None
        self._delivered = self._ok = self._failed = self._failures = 0
        self._last_error: str | None = None
        self._last_success: str | None = None
        self._next_attempt: float | None = None

    def seed(self) -> None:
        """Load the cursor; a new webhook's starts after the newest event now."""
        newest = self._store.read(EventQuery(newest_first=True, limit=1))
        self._cursor = self._cursors.seed(self.name, newest[0].seq if newest else 0)
        self._scanned = self._cursor

    def status(self) -> WebhookStatus:
        """Where this webhook stands now."""
        with self._lock:
            wait = None
            if self._next_attempt is not None:
                wait = round(max(0.0, self._next_attempt - time.monotonic()), 3)
            return WebhookStatus(
                name=self.name,
                url=display_url(self.hook.url),
                events=tuple(self.hook.types or (ALL_EVENTS,)),
                cursor_seq=self._cursor,
                newest_seq=max(self._scanned, self._cursor),
                pending=len(self._waiting),
                delivered_events=self._delivered,
                deliveries_ok=self._ok,
                deliveries_failed=self._failed,
                consecutive_failures=self._failures,
                last_error=self._last_error,
                last_success_at=self._last_success,
                next_attempt_in_s=wait,
            )

    def run(self, stop: threading.Event) -> None:
        """Deliver until ``stop`` is set."""
        while not stop.is_set():
            try:
                delay = self._step()
            except Exception as exc:  # a bug or a broken store: keep trying, visibly
                _log.exception("webhook %s: delivery failed unexpectedly", self.name)
                delay = self._failure(f"internal error: {exc!r}")
            stop.wait(delay)

    # ------------------------------------------------------------ one step
    def _step(self) -> float:
        """One attempt; returns how long to wait before the next."""
        try:
            self._count_new()
            batch = self._retry or self._next_batch()
        except GpusmError as exc:
            return self._failure(f"cannot read the event log: {exc}")
        if batch is None:
            return self._poll_s
        batch.attempt += 1
        result = self._sender.post(self.hook.url, *self._signed(batch))
        if not result.ok:
            self._retry = batch
            return self._failure(result.error or "failed")
        try:
            self._cursors.save(self.name, batch.events[-1].seq)
        except GpusmError as exc:
            # Acknowledged but not recorded: sent again (a duplicate the receiver drops).
            self._retry = batch
            return self._failure(f"delivered, but the cursor was not saved: {exc}")
        self._success(batch)
        return 0.0

    def _count_new(self) -> None:
        """Note this webhook's events appended since the last look (for ``pending``)."""
        while True:
            page = self._store.read(
                EventQuery(types=self.hook.types, after_seq=self._scanned, limit=_PAGE)
            )
            if page:
                with self._lock:
                    self._waiting.extend(e.seq for e in page)
                    self._scanned = page[-1].seq
            if len(page) < _PAGE:
                return

    def _next_batch(self) -> _Batch | None:
        events = self._store.read(
            EventQuery(types=self.hook.types, after_seq=self._cursor, limit=self.hook.batch_size)
        )
        if not events:
            return None
        with self._lock:
            # Appended between the count and this read: count them now.
            self._waiting.extend(e.seq for e in events if e.seq > self._scanned)
            self._scanned = max(self._scanned, events[-1].seq)
        return _Batch(events)

    def _signed(self, batch: _Batch) -> tuple[bytes, dict[str, str]]:
        body = self._encode(self.name, batch.events)
        stamp = int(time.time())
        headers = {
            "Content-Type": "application/json",
            "User-Agent": f"gpusm/{VERSION}",
            "X-Gpusm-Webhook": self.name,
            "X-Gpusm-Delivery": batch.delivery,
            "X-Gpusm-Attempt": str(batch.attempt),
            TIMESTAMP_HEADER: str(stamp),
            SIGNATURE_HEADER: sign(self._secret, stamp, body),
        }
        return body, headers

    def _success(self, batch: _Batch) -> None:
        last = batch.events[-1].seq
        with self._lock:
            if self._failures:
                _log.warning(
                    "webhook %s: delivering again after %d failures", self.name, self._failures
                )
            self._cursor = last
            while self._waiting and self._waiting[0] <= last:
                self._waiting.popleft()
            self._retry = None
            self._delivered += len(batch.events)
            self._ok += 1
            self._failures = 0
            self._next_attempt = None
            self._last_success = datetime.now(UTC).isoformat(timespec="seconds")

    def _failure(self, why: str) -> float:
        hook = self.hook
        with self._lock:
            self._failed += 1
            self._failures += 1
            self._last_error = why
            delay = min(hook.max_backoff_s, hook.min_backoff_s * 2.0 ** min(self._failures - 1, 62))
            self._next_attempt = time.monotonic() + delay
            failures = self._failures
        if failures == 1:
            _log.warning("webhook %s: %s; retrying with backoff", self.name, why)
        return delay


class WebhookNotifier:
    """Every webhook's worker, each in its own thread (a :class:`gpusm.ports.Notifier`)."""

    def __init__(self, workers: Sequence[WebhookWorker], on_close: Callable[[], None]) -> None:
        self._workers = list(workers)
        self._on_close = on_close
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._closed = False

    def seed(self) -> None:
        """Load (or create) every webhook's cursor."""
        for worker in self._workers:
            worker.seed()

    def start(self) -> None:
        """Begin delivering (idempotent)."""
        if self._threads or self._closed:
            return
        for worker in self._workers:
            thread = threading.Thread(
                target=worker.run,
                args=(self._stop,),
                name=f"gpusm-webhook-{worker.name}",
                daemon=True,
            )
            self._threads.append(thread)
            thread.start()

    def status(self) -> list[WebhookStatus]:
        """Each webhook's delivery state, in config order."""
        return [worker.status() for worker in self._workers]

    def close(self) -> None:
        """Stop every thread (a POST in flight is left to its timeout, unacknowledged)."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        deadline = time.monotonic() + _JOIN_S
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._on_close()
