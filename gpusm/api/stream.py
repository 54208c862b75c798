"""``GET /gpu/events/stream``: the event log as Server-Sent Events, resumable by ``seq``.

Each log entry is one SSE message::

    id: <seq>
    event: <type>
    data: <the event as JSON, the same shape as an item of GET /gpu/events>

The stream opens with a ``retry:`` hint and sends a ``: keep-alive`` comment after
``heartbeat_s`` seconds (default 15) without an event, so proxies and clients can tell
a quiet log from a dead connection.

**Resuming.** The stream starts after ``Last-Event-ID`` (what a browser's EventSource
sends when it reconnects), else after ``?after_seq=`` (default 0: the whole log, then
new events). The ``id`` is the event's ``seq`` in the store, so a client that
reconnects — to the same daemon or to one restarted after ``kill -9`` — with the last
id it saw gets every later event exactly once. ``service`` and ``type`` narrow the
stream like they narrow ``GET /gpu/events``; resume with the same filters.

**No gap, no duplicate.** Each stream reads the store with ``seq > last delivered``, in
``seq`` order. The SQLite store assigns a seq inside the append's ``BEGIN IMMEDIATE``
transaction (the one write lock, across processes) as the last seq plus one, and
commits the batch atomically; a reader's snapshot therefore never holds seq N+1
without N. A reader never waits for a "hole" to fill: one it sees is permanent (seqs
need not be contiguous), never an append still in flight.

**Waking.** One watcher per app reads the newest seq every :data:`POLL_S` seconds while
any stream is open (one indexed row, whoever writes: this daemon, ``gpusm`` commands
on the same database) and wakes the streams when it moved. Idle streams cost no reads
of their own.

**One read per wake.** A woken stream asks the hub for what is new after its position
(:meth:`StreamHub.read`). Streams that ask for the same read at the same time share it:
same filters (``service``; ``type`` as a set), same position (``seq > last
delivered``) and same head seen by the watcher. The first one starts the read in a
worker thread, which also encodes the events as SSE frames; the others await it, and
every one of them sends the same bytes. With many subscribers following the log
together (a dashboard per browser tab, workers), a wake costs one store read, one
worker thread and one encoding instead of one per stream. A read is shared only while
it is in flight, never kept: a stream that asks later reads again. Sharing cannot
break the guarantee above, because a shared read answers exactly the query each of its
streams would have sent, and it started after the watcher saw that head, so it holds
every event up to it. A stream that hangs up stops waiting; the read goes on for the
others. Streams at different positions or with different filters each read on their
own, as before.

A stream ends when the client hangs up, when the daemon stops (the coordinator is
closed), or when :func:`close_streams` is called (e.g. at the start of a shutdown, so
that uvicorn's graceful shutdown does not wait for open streams).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, replace
from typing import Annotated, Any

import anyio.to_thread
from fastapi import APIRouter, Header, Query
from fastapi.responses import StreamingResponse

from gpusm.api.problems import HttpProblem
from gpusm.api.state import ApiState
from gpusm.domain.events import RecordedEvent
from gpusm.engine.coordinator import Coordinator
from gpusm.errors import GpusmError
from gpusm.ports import EventQuery
from gpusm.wire import to_json

__all__ = [
    "MAX_SEQ",
    "POLL_S",
    "Page",
    "StreamHub",
    "build_stream_router",
    "close_streams",
    "sse_frame",
]

_log = logging.getLogger("gpusm.api")

MAX_SEQ = 2**62
# How often the watcher reads the newest seq while streams are open.
POLL_S = 0.025
# Events read (and sent) per store read while catching up.
_BATCH = 500
# The reconnection delay an SSE client (a browser's EventSource) is asked to use.
_RETRY_MS = 1000
_HEARTBEAT_S = 15.0
_HEARTBEAT = b": keep-alive\n\n"
_HEADERS = {
    "Cache-Control": "no-cache",
    # nginx and friends: pass each message on at once.
    "X-Accel-Buffering": "no",
}
# Each app's hub, by its state (for :func:`close_streams`).
_SSE_EVENT = {
    "type": "object",
    "properties": {
        "id": {"type": "string", "pattern": "^[0-9]+$"},
        "event": {"type": "string"},
        "data": {"type": "string", "contentMediaType": "application/json"},
        "retry": {"type": "integer"},
    },
    "required": ["id", "event", "data"],
}
_HUBS: weakref.WeakKeyDictionary[ApiState, StreamHub] = weakref.WeakKeyDictionary()
# Which reads are the same: the coordinator (its id), the query (types sorted), the head seen.
_ReadKey = tuple[int, EventQuery, int]


def sse_frame(event: RecordedEvent) -> bytes:
    """One event as an SSE message: ``id`` (its seq), ``event`` (its type), ``data`` (JSON)."""
    kind = "".join(ch for ch in event.type if ch not in "\r\n")
    # Compact JSON never holds a raw newline (they are escaped), so data is one line.
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (event.seq, kind.encode(), to_json(event))


@dataclass(frozen=True, slots=True)
class Page:
    """One read of the log for the streams that asked for it, ready to send."""

    # The events as SSE messages (:func:`sse_frame`), in seq order; b"" when none.
    frames: bytes
    # The seq of the last event read, where the streams go on from; None when none.
    last_seq: int | None
    # The read returned as many events as it asked for: more may wait, read on at once.
    full: bool


def _read_page(coordinator: Coordinator, query: EventQuery) -> Page:
    """Read and encode (in a worker thread: both take time the event loop should not)."""
    found = coordinator.events(query)
    return Page(
        frames=b"".join(sse_frame(e) for e in found),
        last_seq=found[-1].seq if found else None,
        full=query.limit is not None and len(found) >= query.limit,
    )


def _read_key(coordinator: Coordinator, query: EventQuery, seen: int) -> _ReadKey:
    types = query.types
    if types is not None:
        # A set filter: the order and repeats of ``type=`` do not change what is read.
        types = tuple(sorted({types} if isinstance(types, str) else set(types)))
    return id(coordinator), replace(query, types=types), seen


def _head(coordinator: Coordinator) -> int:
    found = coordinator.events(EventQuery(newest_first=True, limit=1))
    return found[0].seq if found else 0


class StreamHub:
    """Tells the open streams of one app that the log has grown (see module docstring).

    Lives on the server's event loop; :meth:`close` may be called from any thread.
    """

    def __init__(self, state: ApiState, poll_s: float = POLL_S) -> None:
        self._state = weakref.ref(state)  # the hub must not keep its app alive
        self.poll_s = poll_s
        self.head = 0  # the newest seq the watcher has seen
        self.closed = False
        self._subscribers = 0
        self._task: asyncio.Task[None] | None = None
        self._grown: asyncio.Event | None = None
        # The reads in flight, each shared by the streams awaiting it (see :meth:`read`).
        self._reads: dict[_ReadKey, asyncio.Task[Page]] = {}

    def coordinator(self) -> Coordinator | None:
        """The coordinator to read, or None once the daemon is stopping."""
        state = self._state()
        found = None if state is None or self.closed else state.coordinator
        return None if found is None or found.closed else found

    @contextlib.asynccontextmanager
    async def subscribe(self) -> AsyncIterator[None]:
        """Keep the watcher running while the caller streams."""
        self._subscribers += 1
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._watch())
        try:
            yield
        finally:
            self._subscribers -= 1

    async def wait(self, seen: int, timeout: float) -> None:
        """Return once the head is past ``seen``, the daemon stops, or ``timeout`` passes."""
        if self.head > seen or self.coordinator() is None:
            return
        if self._grown is None:
            self._grown = asyncio.Event()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._grown.wait(), timeout)

    async def read(self, coordinator: Coordinator, query: EventQuery, seen: int) -> Page:
        """The events ``coordinator`` holds for ``query`` (a stream's filters, its
        position as ``after_seq`` and a ``limit``), read in a worker thread started after
        the watcher saw head ``seen`` (so none up to it is missing).

        Callers asking for the same read while it is in flight share it: one store read
        and one encoding, the same :class:`Page` for each. A caller cancelled while it
        waits (its client hung up) leaves the read running for the others. Raises what
        the read raised (:class:`~gpusm.errors.GpusmError` when the store failed or the
        coordinator was closed) in every caller that shared it.
        """
        key = _read_key(coordinator, query, seen)
        task = self._reads.get(key)
        if task is None:
            # A task of its own, not the first caller's: that one may hang up first.
            task = asyncio.ensure_future(anyio.to_thread.run_sync(_read_page, coordinator, key[1]))
            self._reads[key] = task
            task.add_done_callback(lambda done: self._read_done(key, done))
        return await asyncio.shield(task)

    def _read_done(self, key: _ReadKey, task: asyncio.Task[Page]) -> None:
        # Forgotten once done: a stream asking later reads again, and sees newer events.
        if self._reads.get(key) is task:
            del self._reads[key]
        if not task.cancelled():
            task.exception()  # retrieved even when every caller had hung up (each raises it)

    @property
    def reads_in_flight(self) -> int:
        """How many store reads the streams are waiting for now."""
        return len(self._reads)

    def close(self) -> None:
        """End every open stream at its next wake (within :attr:`poll_s`); thread-safe."""
        self.closed = True

    def _wake(self) -> None:
        grown, self._grown = self._grown, None
        if grown is not None:
            grown.set()

    async def _watch(self) -> None:
        try:
            while self._subscribers > 0:
                coordinator = self.coordinator()
                if coordinator is None:
                    break  # stopping: the woken streams see it and end
                try:
                    head = await anyio.to_thread.run_sync(_head, coordinator)
                except GpusmError as exc:  # e.g. the store was busy; the next poll retries
                    _log.debug("event stream watcher: %s", exc)
                else:
                    if head != self.head:
                        self.head = head
                        self._wake()
                await asyncio.sleep(self.poll_s)
        finally:
            self._wake()


def close_streams(state: ApiState) -> None:
    """End the open event streams of the app holding ``state`` (thread-safe); new ones
    end at once too. For a shutdown: uvicorn waits for open responses before it stops."""
    hub = _HUBS.get(state)
    if hub is not None:
        hub.close()


def _start_after(last_event_id: str | None, after_seq: int) -> int:
    """Where a stream starts: after ``Last-Event-ID`` if sent, else after ``after_seq``."""
    if last_event_id is None or not last_event_id.strip():
        # An empty Last-Event-ID means "no id yet" in the SSE model.
        return after_seq
    value = last_event_id.strip()
    if not value.isascii() or not value.isdigit() or int(value) > MAX_SEQ:
        raise HttpProblem(
            "invalid-request",
            f"Last-Event-ID: {value[:40]!r} is not an event seq (an integer from 0 to {MAX_SEQ}); "
            "send the id of the last event received",
        )
    return int(value)


async def _events(hub: StreamHub, query: EventQuery, heartbeat_s: float) -> AsyncIterator[bytes]:
    loop = asyncio.get_running_loop()
    last = query.after_seq
    yield b"retry: %d\n\n" % _RETRY_MS
    async with hub.subscribe():
        quiet_since = loop.time()
        while (coordinator := hub.coordinator()) is not None:
            seen = hub.head  # taken before the read: an append after it wakes the wait below
            ask = EventQuery(stream=query.stream, types=query.types, after_seq=last, limit=_BATCH)
            try:
                page = await hub.read(coordinator, ask, seen)  # shared with streams alike
            except GpusmError as exc:  # closed under us, or the store failed: the client resumes
                _log.debug("event stream ends: %s", exc)
                return
            if page.last_seq is not None:
                yield page.frames
                last = page.last_seq
                quiet_since = loop.time()
                if page.full:
                    continue  # catching up: read on at once
            now = loop.time()
            if now - quiet_since >= heartbeat_s:
                yield _HEARTBEAT
                quiet_since = now
            await hub.wait(seen, quiet_since + heartbeat_s - now)


def build_stream_router(
    state: ApiState, coord: Any, responses: dict[int | str, Any], dependencies: Sequence[Any]
) -> APIRouter:
    """The stream's route. ``coord`` is the dependency that yields the recovered
    coordinator (else 503), ``responses`` the problems to document, ``dependencies``
    run before it (e.g. refusing repeated query parameters)."""
    router = APIRouter()
    hub = _HUBS[state] = StreamHub(state)

    @router.get(
        "/gpu/events/stream",
        response_class=StreamingResponse,
        # Left out of /openapi.json for now: a spec-driven fuzzer (tests/api/
        # test_schemathesis.py) reads a stream until 20 events or its request timeout,
        # a minute per generated case on a quiet log.
        include_in_schema=False,
        responses={
            200: {
                "description": "One SSE message per event: id (its seq), event (its type), "
                "data (the event as JSON); `: keep-alive` comments while quiet",
                # OpenAPI before 3.2: the schema describes each event.
                "content": {"text/event-stream": {"schema": _SSE_EVENT}},
            },
            **responses,
        },
        dependencies=[coord, *dependencies],
    )
    async def stream(
        service: Annotated[str | None, Query(max_length=200)] = None,
        type: Annotated[list[str] | None, Query(max_length=50)] = None,
        after_seq: Annotated[int, Query(ge=0, le=MAX_SEQ)] = 0,
        heartbeat_s: Annotated[float, Query(ge=0.05, le=3600)] = _HEARTBEAT_S,
        last_event_id: Annotated[str | None, Header(alias="Last-Event-ID", max_length=64)] = None,
    ) -> StreamingResponse:
        """Every event after ``Last-Event-ID`` (else ``after_seq``) as Server-Sent Events,
        then new ones as they are recorded; ``service`` and ``type`` filter. Resuming with
        the last id received gives every later event exactly once, also across a daemon
        restart (the id is the event's ``seq``)."""
        query = EventQuery(
            stream=service, types=type, after_seq=_start_after(last_event_id, after_seq)
        )
        return StreamingResponse(
            _events(hub, query, heartbeat_s),
            media_type="text/event-stream",
            headers=_HEADERS,
        )

    return router
