"""``gpusm.Client`` against a live daemon: typed results, the same errors as in-process use."""

from __future__ import annotations

import itertools
import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gpusm.api.threaded import ThreadedServer
from gpusm.client import Client, daemon_url, find_daemon
from gpusm.domain.policy import Plan
from gpusm.errors import GpusmError, InsufficientVram, RequestTimeout, UnknownName
from gpusm.ports import EventQuery, WebhookStatus
from gpusm.results import PhaseResult, Status, StopNote
from gpusm.wire import DaemonStatus, from_json, problem_body, problem_for_error
from tests.api.api_helpers import TOKEN, free_port, seed_config, write_config
from tests.support import eventually

Serve = Callable[..., ThreadedServer]


@pytest.fixture
def client(live: ThreadedServer) -> Iterator[Client]:
    with Client(live.url, token=TOKEN) as c:
        yield c


def test_verbs_return_the_same_types_as_the_coordinator(client: Client) -> None:
    result = client.enter_phase("analysis", client="w1", timeout=30)
    assert isinstance(result, PhaseResult)
    assert result.started == ("vidi",)
    status = client.status()
    assert isinstance(status, Status)
    assert isinstance(status, DaemonStatus)
    assert status.webhooks == ()  # none configured
    assert status.leases == {"w1": "analysis"}
    vidi = next(s for s in status.services if s.name == "vidi")
    assert vidi.leased_by == ("w1",)
    plan = client.plan_phase("video", client="w2")
    assert isinstance(plan, Plan)
    assert plan.to_start == ("comfyui",)
    ensured = client.ensure_service("cosyvoice", client="w3")
    assert ensured.phase == "service:cosyvoice"
    client.release("w3")
    note = client.stop_service("cosyvoice")
    assert note == StopNote("cosyvoice", "stop", note.reason)
    client.reset_service("cosyvoice")
    client.start_service("cosyvoice", timeout=30)
    assert {s.name for s in client.status().services if s.state == "healthy"} >= {"cosyvoice"}
    stopped = client.release_all()
    assert {n.service for n in stopped} >= {"vidi", "cosyvoice"}


def test_status_tells_how_each_webhook_stands(serve: Serve, tmp_path: Path) -> None:
    (tmp_path / "hook.secret").write_bytes(b"hook-secret")
    url = f"http://127.0.0.1:{free_port()}/hook"  # nobody listens: every delivery fails
    hook = {"name": "ops", "url": url, "secret_file": "hook.secret", "min_backoff_s": 0.05}
    server = serve(write_config(tmp_path, seed_config(tmp_path, pipeline=[], notify=[hook])))
    with Client(server.url, token=TOKEN) as client:

        def failing() -> WebhookStatus | None:
            found = client.status().webhooks
            return found[0] if found and found[0].consecutive_failures else None

        status = eventually(failing, 20, "a failed delivery in the status")
    assert isinstance(status, WebhookStatus)
    assert (status.name, status.url, status.events) == ("ops", url, ("*",))
    assert status.pending >= 1  # recovery's event waits
    assert "cannot reach the receiver" in (status.last_error or "")
    spec = httpx.get(f"{server.url}/openapi.json").json()
    answer = spec["paths"]["/gpu/status"]["get"]["responses"]["200"]["content"]
    assert answer["application/json"]["schema"] == {"$ref": "#/components/schemas/DaemonStatus"}
    # A daemon from before webhooks: the same answer without them.
    older = from_json(DaemonStatus, {"recovered": True, "devices": [], "services": []})
    assert older.webhooks == ()


def test_insufficient_vram_comes_back_as_the_same_error_with_its_numbers(
    serve: Serve, tmp_path: Path
) -> None:
    server = serve(write_config(tmp_path, seed_config(tmp_path, pipeline=[])))
    with Client(server.url, token=TOKEN) as client:
        client.enter_phase("video", client="a")
        with pytest.raises(InsufficientVram) as caught:
            client.enter_phase("chat", client="b", timeout=0.5, priority=5)
    assert caught.value.need_mib == 18432
    assert caught.value.free_mib == 4096
    assert caught.value.foreign_mib == 0
    assert caught.value.blocked_by == ["comfyui"]


def test_unknown_names_come_back_as_unknown_name(client: Client) -> None:
    with pytest.raises(UnknownName) as caught:
        client.enter_phase("nope")
    assert caught.value.kind == "phase"
    assert "tts" in caught.value.known
    with pytest.raises(UnknownName):
        client.stop_service("%2e%2e")
    with pytest.raises(UnknownName):
        client.plan_phase("nope")
    # A name with a slash matches no route at all: still an error, never a different call.
    with pytest.raises(GpusmError, match="404"):
        client.start_service("vidi/../vidi")


def test_events_reads_every_page_and_honours_limit_and_order(client: Client) -> None:
    # chat is not in the pipeline: nothing is prefetched. (The monitor may still append.)
    client.enter_phase("chat", client="w")
    everything = client.events()
    seqs = [e.seq for e in everything]
    assert seqs == sorted(seqs)
    assert len(seqs) >= 4
    page, after = client.events_page(EventQuery(), page_size=2)
    assert [e.seq for e in page] == seqs[:2]
    assert after == seqs[1]
    assert [e.seq for e in client.events(EventQuery(limit=3))] == seqs[:3]
    newest = [e.seq for e in client.events(EventQuery(limit=2, newest_first=True))]
    assert len(newest) == 2
    assert newest[0] > newest[1] >= seqs[-2]
    ollama = client.events(EventQuery(stream="ollama", types=["HealthPassed"]))
    assert [e.type for e in ollama] == ["HealthPassed"]
    assert ollama[0].at.tzinfo is not None
    since = client.events(EventQuery(since=everything[-1].at, until=everything[-1].at))
    assert since == []


def test_token_comes_from_the_environment_or_the_token_file(
    live: ThreadedServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GPUSM_TOKEN", TOKEN)
    with Client(live.url) as client:
        client.release("nobody")
    monkeypatch.delenv("GPUSM_TOKEN")
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    with Client(live.url, token_file=token_file) as client:
        client.release("nobody")
    with Client(live.url) as client, pytest.raises(GpusmError, match="bearer token"):
        client.release("nobody")


def test_from_config_finds_the_daemon_and_its_token_file(
    serve: Serve, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("GPUSM_TOKEN", raising=False)
    doc = seed_config(tmp_path)
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    token_file.chmod(0o600)
    doc["api"]["token_file"] = str(token_file)
    path = write_config(tmp_path, doc)
    host, _, port = doc["api"]["listen"].rpartition(":")
    serve(path, host=host, port=int(port))
    with Client.from_config(path) as client:
        client.release("nobody")
        assert client.healthz()["status"] == "ok"
    assert find_daemon(daemon_url(doc["api"]["listen"])) is not None


def test_connection_refused_is_retried_a_bounded_number_of_times_then_fails() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with (
        Client(url, token=TOKEN, retries=2, max_wait_s=5) as client,
        pytest.raises(GpusmError, match="no gpusm daemon answers"),
    ):
        client.status()
    assert find_daemon(url) is None


def test_a_daemon_that_does_not_answer_in_time_is_a_request_timeout() -> None:
    # A listening socket that never answers: the request reaches it, then times out.
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        with (
            Client(url, token=TOKEN, timeout=0.3) as client,
            pytest.raises(RequestTimeout),
        ):
            client.status()


def test_connection_retry_reaches_a_daemon_that_comes_up_late(
    config_path: Path, tmp_path: Path
) -> None:
    from gpusm.config import load_config

    port = free_port()
    server = ThreadedServer(
        load_config(config_path), port=port, token=TOKEN, stop_services_on_exit=True
    )
    starter = threading.Timer(0.3, server.start)
    starter.start()
    try:
        with Client(f"http://127.0.0.1:{port}", token=TOKEN, retries=8, max_wait_s=30) as c:
            assert c.status().recovered is True
    finally:
        starter.join()
        server.stop()


def test_non_problem_error_answers_become_gpusm_errors() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/gpu/status":
            return httpx.Response(502, text="bad gateway from a proxy")
        return httpx.Response(200, text="not json")

    transport = httpx.MockTransport(handler)
    with Client("http://x", token=TOKEN, transport=transport) as client:
        with pytest.raises(GpusmError, match="answered 502: bad gateway"):
            client.status()
        with pytest.raises(GpusmError, match="answered 200"):
            client.healthz()


def test_client_does_not_send_a_token_it_does_not_have(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GPUSM_TOKEN", raising=False)
    seen: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("authorization"))
        return httpx.Response(200, json={"client": "x"})

    with Client("http://x", transport=httpx.MockTransport(handler)) as client:
        client.release("x")
    assert seen == [None]
    assert os.environ.get("GPUSM_TOKEN") is None


# ---------------------------------------------------------------- retries (in-process fake)
# httpx.MockTransport stands in for the daemon: each handler plays one outage.
PHASE_ANSWER = {
    "phase": "tts",
    "client": "w",
    "started": [],
    "kept": ["cosyvoice"],
    "stopped": [],
    "waited_s": 0.0,
    "free_before_mib": 20480,
    "free_after_mib": 20480,
}


class FakeDaemon:
    """Answers from a script, one entry per request (the last repeats); notes each request."""

    def __init__(self, *script: httpx.Response | type[httpx.TransportError]) -> None:
        self.script = list(script)
        self.seen: list[tuple[float, str, dict[str, Any] | None]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else None
        self.seen.append((time.monotonic(), request.url.path, body))
        step = self.script[min(len(self.seen), len(self.script)) - 1]
        if isinstance(step, httpx.Response):
            return step
        message = {
            httpx.ConnectError: "[Errno 111] Connection refused",
            httpx.RemoteProtocolError: "Server disconnected without sending a response",
        }.get(step, "connection reset")
        raise step(message, request=request)

    def client(self, **kwargs: Any) -> Client:
        return Client("http://x", token=TOKEN, transport=httpx.MockTransport(self), **kwargs)

    def gaps(self) -> list[float]:
        return [b[0] - a[0] for a, b in itertools.pairwise(self.seen)]


def ok(body: dict[str, Any] | None = None) -> httpx.Response:
    return httpx.Response(200, json=PHASE_ANSWER if body is None else body)


def problem(error: GpusmError) -> httpx.Response:
    status, doc = problem_for_error(error)
    return httpx.Response(status, json=doc, headers={"content-type": "application/problem+json"})


RECOVERING = httpx.Response(
    503,
    json=problem_body("recovering", "the gpusm daemon is recovering; retry shortly"),
    headers={"Retry-After": "1"},
)


def test_a_refused_connection_is_retried_with_backoff_until_the_daemon_answers() -> None:
    fake = FakeDaemon(httpx.ConnectError, httpx.ConnectError, httpx.ConnectError, ok())
    with fake.client() as client:
        result = client.enter_phase("tts", client="w")
    assert result.kept == ("cosyvoice",)
    assert len(fake.seen) == 4
    # 50 ms, doubling: never a spin.
    for gap, floor in zip(fake.gaps(), (0.05, 0.1, 0.2), strict=True):
        assert floor <= gap < floor + 0.5


def test_a_dropped_enter_phase_is_repeated_and_keeps_its_deadline() -> None:
    fake = FakeDaemon(httpx.RemoteProtocolError, httpx.ReadError, ok())
    with fake.client() as client:
        result = client.enter_phase("tts", client="w", timeout=5, priority=3)
    assert result == from_json(PhaseResult, PHASE_ANSWER)
    bodies = [body for _, _, body in fake.seen]
    assert bodies[0] == {"phase": "tts", "client": "w", "timeout": 5, "priority": 3}
    for body in bodies[1:]:
        # Repeated as is, but the daemon is given only the time left (of timeout + max_wait_s).
        assert body is not None
        assert {k: v for k, v in body.items() if k != "timeout"} == {
            "phase": "tts",
            "client": "w",
            "priority": 3,
        }
        assert 4 < body["timeout"] <= 5


def test_ensure_and_release_are_repeated_after_a_dropped_connection() -> None:
    fake = FakeDaemon(httpx.RemoteProtocolError, ok({**PHASE_ANSWER, "phase": "service:x"}))
    with fake.client() as client:
        assert client.ensure_service("x", client="w").phase == "service:x"
    fake = FakeDaemon(httpx.ReadError, ok({"client": "w"}))
    with fake.client() as client:
        client.release("w")
    assert [path for _, path, _ in fake.seen] == ["/gpu/release", "/gpu/release"]


def test_a_503_with_retry_after_is_waited_out_as_asked() -> None:
    fake = FakeDaemon(RECOVERING, ok())
    with fake.client() as client:
        assert client.enter_phase("tts", client="w").kept == ("cosyvoice",)
    assert len(fake.seen) == 2
    # Retry-After: 1 is honoured (the backoff alone would have waited 50 ms).
    assert 1.0 <= fake.gaps()[0] < 2.0


def test_it_gives_up_after_max_wait_s_naming_the_last_failure_and_the_time_spent() -> None:
    fake = FakeDaemon(httpx.ConnectError, httpx.RemoteProtocolError)
    started = time.monotonic()
    with (
        fake.client(max_wait_s=0.6) as client,
        pytest.raises(GpusmError, match="gave up after") as caught,
    ):
        client.enter_phase("tts", client="w", timeout=30)
    elapsed = time.monotonic() - started
    message = str(caught.value)
    assert "Server disconnected without sending a response" in message  # the last failure
    assert re.search(r"gave up after \d+ tries in \d\.\d s \(max_wait_s=0\.6\)", message)
    assert isinstance(caught.value.__cause__, httpx.RemoteProtocolError)
    assert 0.6 <= elapsed < 1.5
    # 50 + 100 + 200 ms, then what is left of the 600 ms: no spinning.
    assert 4 <= len(fake.seen) <= 6


def test_a_daemon_that_stays_recovering_is_given_up_on_with_its_own_words() -> None:
    fake = FakeDaemon(RECOVERING)
    with (
        fake.client(max_wait_s=0.3) as client,
        pytest.raises(GpusmError, match=r"is recovering.*gave up after 2 tries in 0\.[3-9] s"),
    ):
        client.status()
    # The only retry came when the window closed, not before.
    assert len(fake.seen) == 2


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(UnknownName("phase", "nope", ["tts"]), id="unknown-phase"),
        pytest.param(InsufficientVram(18432, 4096, 0, ["comfyui"]), id="insufficient-vram"),
        pytest.param(RequestTimeout("no finish before the deadline"), id="timeout-504"),
    ],
)
def test_a_problem_answer_raises_at_once_and_is_never_retried(answer: GpusmError) -> None:
    fake = FakeDaemon(problem(answer), ok())
    with fake.client() as client, pytest.raises(type(answer)) as caught:
        client.enter_phase("tts", client="w")
    assert str(caught.value) == str(answer)
    assert len(fake.seen) == 1


def test_a_503_without_retry_after_is_an_answer_not_a_retry() -> None:
    failed = problem_body("recovery-failed", "recovery failed: boom; the daemon is stopping")
    fake = FakeDaemon(httpx.Response(503, json=failed), ok())
    with fake.client() as client, pytest.raises(GpusmError, match="recovery failed: boom"):
        client.enter_phase("tts", client="w")
    assert len(fake.seen) == 1


@pytest.mark.parametrize(
    ("verb", "path"),
    [
        pytest.param(lambda c: c.start_service("vidi"), "/gpu/services/vidi/start", id="start"),
        pytest.param(lambda c: c.stop_service("vidi"), "/gpu/services/vidi/stop", id="stop"),
        pytest.param(lambda c: c.park_service("vidi"), "/gpu/services/vidi/park", id="park"),
        pytest.param(lambda c: c.reset_service("vidi"), "/gpu/services/vidi/reset", id="reset"),
        pytest.param(lambda c: c.release_all(), "/gpu/release-all", id="release-all"),
    ],
)
def test_a_non_idempotent_verb_is_not_repeated_after_a_dropped_connection(
    verb: Callable[[Client], object], path: str
) -> None:
    fake = FakeDaemon(httpx.RemoteProtocolError, ok({"stopped": []}))
    with (
        fake.client() as client,
        pytest.raises(GpusmError, match="may or may not have taken effect") as caught,
    ):
        verb(client)
    assert [p for _, p, _ in fake.seen] == [path]
    assert f"POST {path}" in str(caught.value)
    assert "Server disconnected" in str(caught.value)


def test_a_non_idempotent_verb_that_never_reached_the_daemon_is_sent_again() -> None:
    # A refused connection or a 503 refusal means nothing was done: repeating is safe.
    fake = FakeDaemon(httpx.ConnectError, RECOVERING, ok({"stopped": []}))
    with fake.client() as client:
        assert client.release_all() == []
    assert len(fake.seen) == 3


def test_retries_can_also_be_capped_by_count() -> None:
    fake = FakeDaemon(httpx.ConnectError)
    with (
        fake.client(retries=2, max_wait_s=30) as client,
        pytest.raises(GpusmError, match=r"no gpusm daemon answers.*gave up after 3 tries"),
    ):
        client.status()
    assert len(fake.seen) == 3


def test_max_wait_s_zero_tries_once() -> None:
    fake = FakeDaemon(httpx.ConnectError, ok())
    with (
        fake.client(max_wait_s=0) as client,
        pytest.raises(GpusmError, match="gave up after 1 try in"),
    ):
        client.release("w")
    assert len(fake.seen) == 1
