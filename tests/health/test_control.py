"""Sending park and wake requests: the real HTTP control over loopback, and its fake."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from gpusm.health import HttpControl, MemoryControl
from gpusm.park_config import HttpCall
from gpusm.ports import CallResult


class Recorder:
    """A loopback server that records each request and answers ``status`` with ``body``."""

    def __init__(self) -> None:
        self.status = 200
        self.body = b""
        self.delay = threading.Event()
        self.slow = False
        self.seen: list[tuple[str, str, Any]] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                owner.seen.append((self.command, self.path, json.loads(raw) if raw else None))
                if owner.slow:
                    owner.delay.wait(5)
                self.send_response(owner.status)
                self.send_header("Content-Length", str(len(owner.body)))
                self.end_headers()
                self.wfile.write(owner.body)

            do_GET = do_POST = do_PUT = do_DELETE = answer

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.delay.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def server() -> Iterator[Recorder]:
    recorder = Recorder()
    yield recorder
    recorder.close()


@pytest.fixture
def control() -> Iterator[HttpControl]:
    http = HttpControl()
    yield http
    http.close()


def test_sends_the_method_path_and_json_body(server: Recorder, control: HttpControl) -> None:
    call = HttpCall(url=f"{server.base}/api/generate", json={"model": "m", "keep_alive": 0})
    result = control.call(call)
    assert (result.ok, result.status, result.reason) == (True, 200, "")
    assert server.seen == [("POST", "/api/generate", {"model": "m", "keep_alive": 0})]


def test_a_query_string_and_no_body_are_sent_as_given(
    server: Recorder, control: HttpControl
) -> None:
    assert control.call(HttpCall(url=f"{server.base}/sleep?level=2")).ok
    assert server.seen == [("POST", "/sleep?level=2", None)]


def test_an_unexpected_status_names_it_the_request_and_the_answer(
    server: Recorder, control: HttpControl
) -> None:
    server.status, server.body = 503, b'{"error": "the server is loading"}'
    result = control.call(HttpCall(url=f"{server.base}/wake_up"))
    assert (result.ok, result.status) == (False, 503)
    assert result.reason == (
        f"status 503, expected 200: POST {server.base}/wake_up "
        'answered {"error": "the server is loading"}'
    )


def test_expect_status_may_be_another_code(server: Recorder, control: HttpControl) -> None:
    server.status = 204
    assert control.call(HttpCall(url=f"{server.base}/x", expect_status=204)).ok


def test_nobody_listening_is_a_refused_connection(control: HttpControl) -> None:
    result = control.call(HttpCall(url="http://127.0.0.1:9/sleep?level=1"))
    assert not result.ok
    assert result.status is None
    assert result.reason == "connection refused: POST http://127.0.0.1:9/sleep?level=1"


def test_a_slow_answer_times_out_with_the_request_named(
    server: Recorder, control: HttpControl
) -> None:
    server.slow = True
    result = control.call(HttpCall(url=f"{server.base}/free", timeout_s=0.2))
    assert not result.ok
    assert result.reason == f"timed out after 0.2s: POST {server.base}/free"


def test_close_twice_is_fine() -> None:
    http = HttpControl()
    http.close()
    http.close()


def test_the_fake_records_calls_and_answers_ok_by_default() -> None:
    fake = MemoryControl()
    call = HttpCall(url="http://127.0.0.1:1/sleep?level=1")
    assert fake.call(call) == CallResult(True, 200)
    assert fake.calls == [call]
    fake.close()


def test_the_fake_answers_from_its_function() -> None:
    fake = MemoryControl(lambda request: CallResult(False, 500, f"refused {request.url}"))
    result = fake.call(HttpCall(url="http://h:1/x"))
    assert (result.ok, result.reason) == (False, "refused http://h:1/x")
