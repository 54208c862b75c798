"""``gpusm.Client`` against a live daemon: typed results, the same errors as in-process use."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from gpusm.api.threaded import ThreadedServer
from gpusm.client import Client, daemon_url, find_daemon
from gpusm.domain.policy import Plan
from gpusm.errors import GpusmError, InsufficientVram, RequestTimeout, UnknownName
from gpusm.ports import EventQuery
from gpusm.results import PhaseResult, Status, StopNote
from tests.api.api_helpers import TOKEN, free_port, seed_config, write_config

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
