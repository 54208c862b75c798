"""``GET /gpu/events/stream`` over real HTTP on 127.0.0.1: SSE framing, filters, heartbeats,
resume with ``Last-Event-ID`` after a forced disconnect and after ``kill -9`` of the daemon
(every seq exactly once), ``Client.stream_events`` and ``gpusm events --follow``."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import pytest
import typer
from typer.testing import CliRunner

from gpusm.api.state import ApiState
from gpusm.api.stream import StreamHub, close_streams
from gpusm.api.threaded import ThreadedServer
from gpusm.cli.events_cmd import register
from gpusm.client import Client, daemon_url
from gpusm.domain.events import RecordedEvent
from gpusm.ports import EventQuery
from gpusm.store.memory import MemoryEventStore
from tests.api.api_helpers import TOKEN, seed_config, write_config
from tests.api.daemon_proc import Daemon
from tests.coordinator.fakes_helpers import fake_config, fake_service, open_world
from tests.support import eventually

STREAM = "/gpu/events/stream"


@dataclass
class Message:
    """One SSE message as a browser would dispatch it (comments kept apart)."""

    id: str | None = None
    event: str | None = None
    data: list[str] = field(default_factory=list)
    comments: list[str] = field(default_factory=list)
    retry: str | None = None


def messages(lines: Iterator[str]) -> Iterator[Message]:
    """An independent reading of the text/event-stream framing (not the client's)."""
    current = Message()
    touched = False
    for line in lines:
        if line == "":
            if touched:
                yield current
            current, touched = Message(), False
            continue
        touched = True
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "":
            current.comments.append(value)
        elif name == "data":
            current.data.append(value)
        elif name in ("id", "event", "retry"):
            setattr(current, name, value)
        else:
            raise AssertionError(f"unexpected SSE line {line!r}")


def read_stream(
    url: str,
    until: Callable[[list[Message]], bool],
    *,
    timeout_s: float = 10.0,
    params: Any = None,
    headers: dict[str, str] | None = None,
) -> list[Message]:
    """Messages from one connection until ``until(messages)``; then hang up."""
    found: list[Message] = []
    deadline = time.monotonic() + timeout_s
    with httpx.stream(
        "GET", url + STREAM, params=params, headers=headers, timeout=timeout_s
    ) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        for message in messages(response.iter_lines()):
            found.append(message)
            if until(found):
                return found
            assert time.monotonic() < deadline, f"stream never got there: {found}"
    raise AssertionError(f"the stream ended early: {found}")


def events_of(found: list[Message]) -> list[Message]:
    return [m for m in found if m.data]


def seqs_of(found: list[Message]) -> list[int]:
    return [int(m.id or "-1") for m in events_of(found)]


def log_seqs(url: str, **params: Any) -> list[int]:
    page = httpx.get(f"{url}/gpu/events", params={"limit": 1000, **params}, timeout=10).json()
    return [e["seq"] for e in page["events"]]


def make_events(client: Client, n: int, tag: str = "w") -> None:
    """2n cheap events: a phase without services entered, then its lease released."""
    for i in range(n):
        client.enter_phase("crawl", client=f"{tag}{i}", timeout=30)
        client.release(f"{tag}{i}")


def quiet_config(tmp_path: Path) -> dict[str, Any]:
    """The seed config without a pipeline: entering ``crawl`` starts nothing ahead."""
    doc = seed_config(tmp_path)
    doc.pop("pipeline")
    return doc


@pytest.fixture
def server(serve: Callable[..., ThreadedServer], tmp_path: Path) -> ThreadedServer:
    return serve(write_config(tmp_path, quiet_config(tmp_path)))


@pytest.fixture
def client(server: ThreadedServer) -> Iterator[Client]:
    with Client(server.url, token=TOKEN, renew_every_s=None) as found:
        yield found


# ---------------------------------------------------------------- the stream itself
@pytest.mark.timeout(60)
def test_each_event_is_one_message_whose_id_is_its_seq_in_order(
    server: ThreadedServer, client: Client
) -> None:
    make_events(client, 3)
    expected = log_seqs(server.url)
    assert len(expected) == 7  # Recovered, then three phases and releases

    def live_too(found: list[Message]) -> bool:
        if len(events_of(found)) == len(expected):
            make_events(client, 1, "late")  # recorded while the stream is open
        return len(events_of(found)) == len(expected) + 2

    found = read_stream(server.url, live_too)
    assert found[0].retry == "1000"  # the reconnection hint comes first
    all_seqs = log_seqs(server.url)
    assert seqs_of(found) == all_seqs == sorted(set(all_seqs))
    page = httpx.get(f"{server.url}/gpu/events", params={"limit": 1000}).json()["events"]
    for message, item in zip(events_of(found), page, strict=True):
        assert len(message.data) == 1
        assert json.loads(message.data[0]) == item  # the same shape as GET /gpu/events
        assert message.event == item["type"]


@pytest.mark.timeout(60)
def test_service_and_type_filter_the_stream(server: ThreadedServer, client: Client) -> None:
    make_events(client, 3)
    released = log_seqs(server.url, type="LeaseReleased")
    assert len(released) == 3
    found = read_stream(
        server.url,
        lambda f: len(events_of(f)) == 3,
        params={"service": "coordinator", "type": "LeaseReleased"},
    )
    assert seqs_of(found) == released
    assert {m.event for m in events_of(found)} == {"LeaseReleased"}
    # Two types, and a stream with no events at all: only heartbeats.
    both = read_stream(
        server.url,
        lambda f: len(events_of(f)) == 6,
        params=[("type", "LeaseReleased"), ("type", "PhaseEntered")],
    )
    assert seqs_of(both) == log_seqs(server.url)[1:]
    none = read_stream(
        server.url,
        lambda f: any(m.comments for m in f),
        params={"service": "comfyui", "heartbeat_s": 0.2},
    )
    assert events_of(none) == []


@pytest.mark.timeout(60)
def test_heartbeat_comments_arrive_while_the_log_is_quiet(server: ThreadedServer) -> None:
    started = time.monotonic()
    found = read_stream(
        server.url,
        lambda f: sum(1 for m in f if m.comments) >= 3,
        params={"heartbeat_s": 0.2},
    )
    took = time.monotonic() - started
    assert [m.comments for m in found if m.comments] == [["keep-alive"]] * 3
    assert seqs_of(found) == [1]  # the Recovered event, then silence
    assert 0.5 < took < 5, took


@pytest.mark.timeout(60)
def test_resume_after_a_forced_disconnect_gives_every_seq_exactly_once(
    server: ThreadedServer, client: Client
) -> None:
    make_events(client, 2)
    first = read_stream(server.url, lambda f: len(events_of(f)) == 3)  # hang up mid-log
    last_id = events_of(first)[-1].id
    assert last_id == "3"
    make_events(client, 2, "while-away")  # recorded while nobody listens
    total = len(log_seqs(server.url))
    # after_seq=0 is what the page first asked; a browser resends it with Last-Event-ID.
    second = read_stream(
        server.url,
        lambda f: len(seqs_of(first)) + len(seqs_of(f)) == total,
        params={"after_seq": 0},
        headers={"Last-Event-ID": last_id},
    )
    assert seqs_of(first) + seqs_of(second) == log_seqs(server.url)
    # ?after_seq= resumes the same way.
    third = read_stream(server.url, lambda f: len(events_of(f)) == 2, params={"after_seq": 7})
    assert seqs_of(third) == [8, 9]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("bad", ["abc", "-1", "1.5", "0x10", str(2**62 + 1), "٣"])
def test_a_bad_last_event_id_is_a_422_problem(server: ThreadedServer, bad: str) -> None:
    response = httpx.get(server.url + STREAM, headers={"Last-Event-ID": bad.encode()})
    assert response.status_code == 422
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["type"] == "urn:gpusm:invalid-request"
    assert "Last-Event-ID" in problem["detail"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "params",
    [{"after_seq": "-1"}, {"heartbeat_s": "0"}, [("after_seq", "1"), ("after_seq", "2")]],
)
def test_bad_query_parameters_are_422_problems(server: ThreadedServer, params: Any) -> None:
    response = httpx.get(server.url + STREAM, params=params)
    assert response.status_code == 422
    assert response.json()["type"] == "urn:gpusm:invalid-request"


@pytest.mark.timeout(60)
def test_close_streams_ends_open_streams_at_once(server: ThreadedServer) -> None:
    ended = threading.Event()

    def follow() -> None:
        with httpx.stream("GET", server.url + STREAM, timeout=30) as response:
            for _ in response.iter_lines():
                pass
        ended.set()

    reader = threading.Thread(target=follow, daemon=True)
    reader.start()
    time.sleep(0.3)
    assert not ended.is_set()
    close_streams(server.state)
    assert ended.wait(2), "the stream did not end"
    started = time.monotonic()
    server.stop()  # nothing left for the graceful shutdown to wait for
    assert time.monotonic() - started < 5


@pytest.mark.timeout(60)
def test_many_streams_alike_each_get_every_event_once_others_only_their_own(
    server: ThreadedServer, client: Client
) -> None:
    # Twenty streams with the same filters and position (whose reads the hub shares),
    # one with a type filter, one that starts later in the log; all open while the
    # events are recorded.
    alike, total = 20, 1 + 2 * 5
    connected = threading.Barrier(alike + 3)
    found: dict[str, list[Message]] = {}
    errors: list[BaseException] = []

    def follow(name: str, want: int, params: Any = None) -> None:
        def until(messages: list[Message]) -> bool:
            if len(messages) == 1:  # the retry hint: this stream is open
                connected.wait(20)
            return len(events_of(messages)) >= want

        try:
            found[name] = read_stream(server.url, until, timeout_s=40, params=params)
        except BaseException as exc:  # reported below
            errors.append(exc)

    readers = [threading.Thread(target=follow, args=(f"s{i}", total)) for i in range(alike)]
    readers.append(threading.Thread(target=follow, args=("released", 5, {"type": "LeaseReleased"})))
    readers.append(threading.Thread(target=follow, args=("later", total - 3, {"after_seq": 3})))
    for reader in readers:
        reader.daemon = True
        reader.start()
    connected.wait(20)
    make_events(client, 5)
    for reader in readers:
        reader.join(45)
    assert errors == []
    everything = log_seqs(server.url)
    assert len(everything) == total
    for i in range(alike):
        assert seqs_of(found[f"s{i}"]) == everything, i
    assert seqs_of(found["released"]) == log_seqs(server.url, type="LeaseReleased")
    assert {m.event for m in events_of(found["released"])} == {"LeaseReleased"}
    assert seqs_of(found["later"]) == everything[3:]


class GatedStore(MemoryEventStore):
    """The in-memory store, noting each read in seq order (what streams ask) in
    :attr:`reads`; while :attr:`gate` is cleared, those reads wait for it."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[EventQuery] = []
        self.gate = threading.Event()
        self.gate.set()

    def read(self, query: EventQuery | None = None) -> list[RecordedEvent]:
        query = query or EventQuery()
        if not query.newest_first:
            self.reads.append(query)
            assert self.gate.wait(20)
        return super().read(query)


def test_streams_asking_for_the_same_read_at_once_share_one(tmp_path: Path) -> None:
    store = GatedStore()
    config = fake_config(tmp_path, {"a": fake_service(1024)})
    world = open_world(config, store=store)
    coordinator = world.coordinator
    hub = StreamHub(ApiState(config, TOKEN))
    head = coordinator.events(EventQuery(newest_first=True, limit=1))[0].seq  # Recovered
    same = EventQuery(types=["Recovered", "PhaseEntered"], after_seq=0, limit=500)

    async def ask(query: EventQuery, seen: int = head) -> Any:
        return await hub.read(coordinator, query, seen)

    async def scenario() -> None:
        store.gate.clear()
        store.reads.clear()
        shared = [asyncio.ensure_future(ask(same)) for _ in range(10)]
        # The order of type= does not matter; the one that hangs up leaves the read running.
        reordered = asyncio.ensure_future(ask(replace(same, types=["PhaseEntered", "Recovered"])))
        hangs_up = asyncio.ensure_future(ask(same))
        own = [
            asyncio.ensure_future(ask(EventQuery(stream="a", after_seq=0, limit=500))),
            asyncio.ensure_future(ask(EventQuery(types=same.types, after_seq=1, limit=500))),
            asyncio.ensure_future(ask(same, seen=head + 1)),
        ]
        await asyncio.sleep(0)  # every caller has asked
        assert hub.reads_in_flight == 4
        hangs_up.cancel()
        store.gate.set()
        pages = await asyncio.gather(*shared, reordered)
        assert all(page is pages[0] for page in pages)  # the same bytes for each
        assert pages[0].last_seq == head
        assert b"event: Recovered" in pages[0].frames
        with pytest.raises(asyncio.CancelledError):
            await hangs_up
        others = await asyncio.gather(*own)
        assert [page.last_seq for page in others] == [None, None, head]
        assert len(store.reads) == 4
        # Forgotten once done: asking again reads again.
        assert hub.reads_in_flight == 0
        assert (await ask(same)).frames == pages[0].frames
        assert len(store.reads) == 5

    try:
        asyncio.run(scenario())
    finally:
        store.gate.set()
        coordinator.close()


# ---------------------------------------------------------------- the client
class CuttingTransport(httpx.HTTPTransport):
    """httpx's transport, but the first ``cuts`` stream responses break off with a
    ReadError in the middle of their second chunk of events (half a message sent)."""

    def __init__(self, cuts: int) -> None:
        super().__init__()
        self.cuts = cuts
        self.resumed_from: list[str | None] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        if request.url.path != STREAM:
            return response
        self.resumed_from.append(request.headers.get("last-event-id"))
        if self.cuts <= 0:
            return response
        self.cuts -= 1
        inner = response.stream
        assert isinstance(inner, httpx.SyncByteStream)

        class Cut(httpx.SyncByteStream):
            def __iter__(self) -> Iterator[bytes]:
                events = 0
                for chunk in inner:
                    if b"data:" in chunk:
                        events += 1
                        if events == 2:
                            yield chunk[: len(chunk) // 2]
                            raise httpx.ReadError("forced disconnect")
                    yield chunk

            def close(self) -> None:
                inner.close()

        return httpx.Response(
            response.status_code, headers=response.headers, stream=Cut(), request=request
        )


@pytest.mark.timeout(60)
def test_client_resumes_after_forced_disconnects_with_every_seq_once(
    server: ThreadedServer, client: Client
) -> None:
    transport = CuttingTransport(cuts=3)
    make_events(client, 1)
    got: list[int] = []
    with Client(server.url, transport=transport, renew_every_s=None) as follower:
        stream = follower.stream_events(heartbeat_s=0.5)
        for event in stream:
            got.append(event.seq)
            if len(transport.resumed_from) < 4:  # until the uncut connection
                make_events(client, 1, f"after{event.seq}-")  # keep messages coming
            elif got[-1] == log_seqs(server.url)[-1]:
                break
        stream.close()
    assert got == log_seqs(server.url) == list(range(1, len(got) + 1))
    assert len(transport.resumed_from) == 4
    # Each reconnection named the last event the caller had seen.
    assert transport.resumed_from[0] == "0"
    assert [int(r or 0) for r in transport.resumed_from] == sorted(
        int(r or 0) for r in transport.resumed_from
    )


@pytest.mark.timeout(60)
def test_client_stream_filters_and_stops_after_limit(
    server: ThreadedServer, client: Client
) -> None:
    make_events(client, 3)
    query = EventQuery(stream="coordinator", types=["PhaseEntered"], limit=2)
    found = list(client.stream_events(query, after_seq=2))
    assert [e.seq for e in found] == [4, 6]
    assert all(isinstance(e, RecordedEvent) and e.type == "PhaseEntered" for e in found)
    with pytest.raises(ValueError, match="since"):
        next(client.stream_events(EventQuery(newest_first=True)))


# ---------------------------------------------------------------- across kill -9
class KillableDaemon(Daemon):
    def kill_9(self, n: int) -> None:
        self.proc.kill()
        self.proc.wait(10)
        self._out.close()
        self.log.rename(self.log.with_name(f"serve-killed-{n}.log"))


class Follower(threading.Thread):
    """``Client.stream_events`` in a thread, keeping every seq it yields."""

    def __init__(self, url: str) -> None:
        super().__init__(name="stream-follower", daemon=True)
        self.url = url
        self.seqs: list[int] = []
        self.errors: list[BaseException] = []
        self.done = threading.Event()

    def run(self) -> None:
        with Client(self.url, max_wait_s=30, renew_every_s=None) as client:
            try:
                for event in client.stream_events(heartbeat_s=0.5):
                    self.seqs.append(event.seq)
                    if self.done.is_set():
                        return
            except BaseException as exc:  # reported by the test
                self.errors.append(exc)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_client_stream_rides_out_kill_9_with_every_seq_exactly_once(tmp_path: Path) -> None:
    doc = quiet_config(tmp_path)
    path = write_config(tmp_path, doc)
    url = daemon_url(doc["api"]["listen"])
    daemon = KillableDaemon(path, url, TOKEN)
    follower = Follower(url)
    try:
        daemon.wait_ready()
        follower.start()
        with Client(url, token=TOKEN, max_wait_s=30, renew_every_s=None) as producer:
            for n in range(2):
                make_events(producer, 3, f"round{n}-")
                seen = len(follower.seqs)
                eventually(lambda s=seen: len(follower.seqs) > s or follower.errors, 10)
                daemon.kill_9(n)
                time.sleep(0.3)  # the follower meets no daemon for a moment
                daemon = KillableDaemon(path, url, TOKEN)
                daemon.wait_ready()
            make_events(producer, 2, "last")
            log = producer.events()
            everything = [e.seq for e in log]

        def caught_up() -> bool:
            assert not follower.errors, follower.errors
            return len(follower.seqs) >= len(everything)

        eventually(caught_up, 30, "the follower to see every event")
        follower.done.set()
        with Client(url, token=TOKEN, renew_every_s=None) as producer:
            make_events(producer, 1, "bye")  # wakes the follower, which hangs up
        follower.join(10)
    finally:
        follower.done.set()
        daemon.stop()  # a stream still open would hold the graceful shutdown for 10 s
    assert follower.errors == []
    assert follower.seqs[: len(everything)] == everything
    assert len(set(follower.seqs)) == len(follower.seqs)  # no duplicate
    assert everything == list(range(1, len(everything) + 1))  # no gap
    # Each daemon recorded its recovery; the follower saw those events too.
    assert sum(1 for e in log if e.type == "Recovered") == 3
    assert len(everything) >= 3 + 2 * 6 + 4


# ---------------------------------------------------------------- gpusm events --follow
@pytest.mark.timeout(60)
def test_events_follow_reads_the_daemons_stream(
    serve: Callable[..., ThreadedServer], tmp_path: Path
) -> None:
    doc = quiet_config(tmp_path)
    path = write_config(tmp_path, doc)
    port = int(doc["api"]["listen"].rpartition(":")[2])
    server = serve(path, port=port)
    with Client(server.url, token=TOKEN, renew_every_s=None) as client:
        make_events(client, 1)  # 3 events so far
        app = typer.Typer()
        register(app)

        def later() -> None:
            time.sleep(0.5)
            make_events(client, 2, "later")

        producer = threading.Thread(target=later, daemon=True)
        producer.start()
        started = time.monotonic()
        result = CliRunner().invoke(
            app,
            [
                "events",
                "--follow",
                "--json",
                "--count",
                "6",
                "-t",
                "PhaseEntered",
                "-t",
                "LeaseReleased",
                "-c",
                str(path),
            ],
        )
        producer.join(10)
    assert result.exit_code == 0, result.output
    found = [json.loads(line) for line in result.stdout.splitlines()]
    assert [e["seq"] for e in found] == [2, 3, 4, 5, 6, 7]
    assert time.monotonic() - started < 20
    # Text lines, the newest one of the backlog only.
    result = CliRunner(env={"COLUMNS": "200"}).invoke(
        app, ["events", "-f", "--limit", "1", "--count", "1", "-c", str(path)]
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("#7  ")
    assert "coordinator  v7  LeaseReleased" in result.stdout


def test_stopping_the_daemon_ends_open_streams_at_once(
    serve: Callable[..., ThreadedServer], tmp_path: Path
) -> None:
    server = serve(write_config(tmp_path, seed_config(tmp_path)))
    opened = threading.Event()

    def follow() -> None:
        with httpx.stream("GET", f"{server.url}/gpu/events/stream", timeout=30) as answer:
            opened.set()
            for _ in answer.iter_lines():
                pass

    reader = threading.Thread(target=follow, daemon=True)
    reader.start()
    assert opened.wait(10)
    began = time.monotonic()
    server.stop()
    assert time.monotonic() - began < 5  # not uvicorn's 10 s graceful timeout
    reader.join(10)
    assert not reader.is_alive()
