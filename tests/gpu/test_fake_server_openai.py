"""The fake model server answers the request shapes of unmodified clients (issue 14).

Real processes, real HTTP on 127.0.0.1: OpenAI's /v1 endpoints (streamed as server-sent
events), Ollama's NDJSON streams and ComfyUI's /ws WebSocket.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from gpusm.gpu import SimGpu
from tests.gpu.sim_helpers import Spawner, free_port
from tests.support import eventually

FULL = 300
MODEL = "fake-llm"


@dataclass
class Served:
    proc: subprocess.Popen[str]
    port: int
    log: Path
    content_type: str = ""

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def post(self, path: str, doc: Any = None) -> httpx.Response:
        return httpx.post(self.url(path), json=doc, timeout=10.0, trust_env=False)

    def get(self, path: str) -> httpx.Response:
        return httpx.get(self.url(path), timeout=10.0, trust_env=False)

    def timed_lines(self, path: str, doc: Any) -> tuple[float, list[tuple[float, str]]]:
        """POST and read the streamed answer line by line: (sent at, [(received at, line)])."""
        got: list[tuple[float, str]] = []
        began = time.monotonic()
        with httpx.stream(
            "POST", self.url(path), json=doc, timeout=10.0, trust_env=False
        ) as response:
            assert response.status_code == 200, response.read()
            self.content_type = response.headers["content-type"]
            for line in response.iter_lines():
                if line:
                    got.append((time.monotonic(), line))
        return began, got


Start = Callable[..., tuple[Served, SimGpu]]


@pytest.fixture
def start(spawner: Spawner, sim_dir: Path, tmp_path: Path) -> Start:
    """Start ``gpusm sim service`` (FULL MiB, --model MODEL) with the given flags."""

    def _start(*flags: str, wait_ready: bool = True) -> tuple[Served, SimGpu]:
        sim = SimGpu(sim_dir, total_mib=1000, reclaim_lag_s=0.0)
        port = free_port()
        log = tmp_path / f"server-{port}.log"
        argv = [sys.executable, "-m", "gpusm", "sim", "service", "--sim-dir", str(sim_dir)]
        argv += ["--vram-mib", str(FULL), "--port", str(port), "--model", MODEL]
        argv += ["--wake-s", "0.2", *flags]
        with log.open("w") as out:
            proc = spawner.popen(argv, stdout=out, stderr=subprocess.STDOUT)
        served = Served(proc, port, log)

        def answering(status: int | None) -> Callable[[], bool]:
            def check() -> bool:
                assert proc.poll() is None, f"server exited with {proc.returncode}"
                try:
                    code = served.get("/health").status_code
                except httpx.TransportError:
                    return False
                return status is None or code == status

            return check

        what = "the fake server to be ready" if wait_ready else "the fake server to answer"
        eventually(answering(200 if wait_ready else None), timeout_s=20, what=what)
        return served, sim

    return _start


def tokens(n: int, model: str = MODEL) -> list[str]:
    return [f"{model}-{i} " for i in range(1, n + 1)]


def chat(stream: bool = False, **more: Any) -> dict[str, Any]:
    messages = [{"role": "user", "content": "say three words"}]
    return {"model": MODEL, "messages": messages, "stream": stream, **more}


def test_chat_completion_has_the_openai_shape_and_models_lists_the_model(start: Start) -> None:
    served, _ = start("--tokens-per-s", "0")
    answer = served.post("/v1/chat/completions", chat(max_tokens=5))
    assert answer.status_code == 200
    doc = answer.json()
    assert doc["id"].startswith("chatcmpl-")
    assert (doc["object"], doc["model"]) == ("chat.completion", MODEL)
    assert isinstance(doc["created"], int)
    (choice,) = doc["choices"]
    assert choice["index"] == 0
    assert choice["message"] == {"role": "assistant", "content": "".join(tokens(5))}
    assert choice["finish_reason"] == "length"  # stopped by max_tokens
    assert doc["usage"] == {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}
    # Without max_tokens: 16 tokens and a natural stop.
    default = served.post("/v1/chat/completions", chat()).json()
    assert default["choices"][0]["message"]["content"] == "".join(tokens(16))
    assert default["choices"][0]["finish_reason"] == "stop"

    legacy = served.post("/v1/completions", {"model": MODEL, "prompt": "a b", "max_tokens": 2})
    assert legacy.status_code == 200
    assert legacy.json()["object"] == "text_completion"
    assert legacy.json()["choices"][0]["text"] == "".join(tokens(2))

    models = served.get("/v1/models").json()
    assert models["object"] == "list"
    assert [(m["id"], m["object"]) for m in models["data"]] == [(MODEL, "model")]

    embedded = served.post("/v1/embeddings", {"model": MODEL, "input": ["a", "b"]}).json()
    assert [e["index"] for e in embedded["data"]] == [0, 1]
    assert embedded["data"][0]["embedding"] != embedded["data"][1]["embedding"]


def test_streamed_chat_chunks_arrive_as_they_are_produced_then_done(start: Start) -> None:
    served, _ = start("--tokens-per-s", "20")  # one token every 50 ms
    began, lines = served.timed_lines("/v1/chat/completions", chat(stream=True, max_tokens=8))
    assert served.content_type.startswith("text/event-stream")
    assert all(line.startswith("data: ") for _, line in lines)
    assert lines[-1][1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for _, line in lines[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({c["id"] for c in chunks}) == 1
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas[0]["role"] == "assistant"
    assert [d["content"] for d in deltas if "content" in d] == tokens(8)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    # Eight tokens take 0.4 s to produce; the first came through well before the last was
    # produced (a load can only delay the later ones, never bunch them up earlier).
    first = lines[0][0]
    last_token = lines[7][0]
    assert last_token - first >= 0.25, [round(t - began, 3) for t, _ in lines]


def test_streamed_legacy_completion_and_usage_chunk(start: Start) -> None:
    served, _ = start("--tokens-per-s", "0")
    doc = {
        "model": MODEL,
        "prompt": "hello",
        "stream": True,
        "max_tokens": 3,
        "stream_options": {"include_usage": True},
    }
    _, lines = served.timed_lines("/v1/completions", doc)
    assert lines[-1][1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for _, line in lines[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == "".join(tokens(3))
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == 3


def test_another_model_is_a_404_with_an_openai_error_body(start: Start) -> None:
    served, _ = start()
    for path, doc in [
        ("/v1/chat/completions", {**chat(), "model": "gpt-4o"}),
        ("/v1/completions", {"model": "gpt-4o", "prompt": "hi"}),
        ("/v1/embeddings", {"model": "gpt-4o", "input": "hi"}),
    ]:
        refused = served.post(path, doc)
        assert refused.status_code == 404, path
        error = refused.json()["error"]
        assert error["code"] == "model_not_found"
        assert error["type"] == "invalid_request_error"
        assert "gpt-4o" in error["message"]
    assert served.post("/v1/chat/completions", {"model": MODEL}).status_code == 400


def test_loading_is_503_and_a_parked_server_wakes_for_a_completion(start: Start) -> None:
    loading, _ = start("--load-s", "30", wait_ready=False)
    assert loading.post("/v1/chat/completions", chat()).status_code == 503
    assert loading.get("/v1/models").status_code == 503

    served, sim = start("--tokens-per-s", "0")
    assert served.post("/sleep").status_code == 200
    assert sim.holders().get(served.proc.pid, 0) == 0
    answer = served.post("/v1/chat/completions", chat(max_tokens=1))
    assert answer.status_code == 200
    assert sim.holders() == {served.proc.pid: FULL}
    assert served.get("/is_sleeping").json() == {"is_sleeping": False}


def test_ollama_chat_and_generate_stream_ndjson_by_default(start: Start) -> None:
    served, _ = start("--tokens-per-s", "40")
    doc = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    doc["options"] = {"num_predict": 4}
    _, lines = served.timed_lines("/api/chat", doc)
    assert served.content_type.startswith("application/x-ndjson")
    docs = [json.loads(line) for _, line in lines]
    assert [d["done"] for d in docs] == [False] * 4 + [True]
    assert [d["message"]["content"] for d in docs[:-1]] == tokens(4)
    assert {d["message"]["role"] for d in docs} == {"assistant"}
    assert (docs[-1]["done_reason"], docs[-1]["eval_count"]) == ("length", 4)
    assert lines[3][0] - lines[0][0] >= 0.05  # 3 intervals of 25 ms, spaced in time

    _, lines = served.timed_lines("/api/generate", {"model": MODEL, "prompt": "hi"})
    docs = [json.loads(line) for _, line in lines]
    assert [d["response"] for d in docs[:-1]] == tokens(16)
    assert docs[-1]["done"] is True
    assert docs[-1]["done_reason"] == "stop"

    whole = served.post("/api/chat", {**doc, "stream": False}).json()
    assert whole["message"]["content"] == "".join(tokens(4))
    assert whole["done"] is True
    # Unchanged: a generate with "stream": false gets fake_park's tiny answer.
    tiny = served.post("/api/generate", {"model": MODEL, "prompt": "hi", "stream": False})
    assert (tiny.json()["response"], tiny.json()["done_reason"]) == ("ok", "stop")
    assert served.post("/api/chat", {**doc, "model": "mistral"}).status_code == 404


def test_ollama_chat_without_messages_unloads_and_loads(start: Start) -> None:
    served, sim = start()
    unload = served.post("/api/chat", {"model": MODEL, "messages": [], "keep_alive": 0})
    assert unload.json()["done_reason"] == "unload"
    assert sim.holders().get(served.proc.pid, 0) == 0
    load = served.post("/api/chat", {"model": MODEL, "messages": []})
    assert load.json()["done_reason"] == "load"
    assert sim.holders() == {served.proc.pid: FULL}
    # A streamed answer with keep_alive 0 unloads once the last line is written.
    doc = {"model": MODEL, "prompt": "hi", "stream": True, "keep_alive": 0}
    _, lines = served.timed_lines("/api/generate", doc)
    assert json.loads(lines[-1][1])["done"] is True
    assert sim.holders().get(served.proc.pid, 0) == 0


def test_a_stop_ends_a_stream_in_progress_without_done(start: Start) -> None:
    served, _ = start("--tokens-per-s", "10")
    got: list[str] = []
    doc = chat(stream=True, max_tokens=100)  # ten seconds of tokens
    with httpx.stream(
        "POST", served.url("/v1/chat/completions"), json=doc, timeout=10.0, trust_env=False
    ) as response:
        for line in response.iter_lines():
            got.append(line)
            if len(got) == 1:
                served.proc.send_signal(signal.SIGTERM)
    assert served.proc.wait(timeout=10) == 0
    assert got[0].startswith("data: ")
    assert "data: [DONE]" not in got
    assert len([line for line in got if line]) < 20


# -------------------------------------------------------------- WebSocket


class WsClient:
    """A minimal RFC 6455 client on a raw socket (the venv has no WebSocket library)."""

    def __init__(self, port: int, path: str = "/ws?clientId=abc") -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            (
                f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        self.buffer = b""
        while b"\r\n\r\n" not in self.buffer:
            self.buffer += self.recv_some()
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        self.status_line = lines[0]
        self.headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])}
        guid = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
        self.expected_accept = base64.b64encode(hashlib.sha1((key + guid).encode()).digest())

    def recv_some(self) -> bytes:
        data = self.sock.recv(65536)
        assert data, "the server closed the connection"
        return data

    def read(self, n: int) -> bytes:
        while len(self.buffer) < n:
            self.buffer += self.recv_some()
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    def send(self, opcode: int, payload: bytes, fin: bool = True) -> None:
        mask = os.urandom(4)
        size = len(payload)
        first = (0x80 if fin else 0) | opcode
        if size < 126:
            head = struct.pack("!BB", first, 0x80 | size)
        elif size < 1 << 16:
            head = struct.pack("!BBH", first, 0x80 | 126, size)
        else:
            head = struct.pack("!BBQ", first, 0x80 | 127, size)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(head + mask + masked)

    def receive(self) -> tuple[int, bytes]:
        first, second = self.read(2)
        assert first & 0x80, "the server sends whole messages"
        assert not second & 0x80, "a server's frames are never masked"
        size = second & 0x7F
        if size == 126:
            (size,) = struct.unpack("!H", self.read(2))
        elif size == 127:
            (size,) = struct.unpack("!Q", self.read(8))
        return first & 0x0F, self.read(size)


def test_websocket_sends_a_comfyui_status_then_echoes(start: Start) -> None:
    served, _ = start()
    ws = WsClient(served.port)
    try:
        assert ws.status_line == "HTTP/1.1 101 Switching Protocols"
        assert ws.headers["upgrade"].lower() == "websocket"
        assert ws.headers["sec-websocket-accept"].encode() == ws.expected_accept
        opcode, payload = ws.receive()
        status = json.loads(payload)
        assert opcode == 0x1
        assert status["type"] == "status"
        assert status["data"]["sid"] == "abc"
        assert status["data"]["status"]["exec_info"]["queue_remaining"] == 0

        ws.send(0x1, b'{"hello": "world"}')
        assert ws.receive() == (0x1, b'{"hello": "world"}')
        big = os.urandom(70_000)  # a 64-bit length
        ws.send(0x2, big)
        assert ws.receive() == (0x2, big)
        ws.send(0x1, b"frag", fin=False)  # a fragmented message comes back whole
        ws.send(0x0, b"mented")
        assert ws.receive() == (0x1, b"fragmented")
        ws.send(0x9, b"are you there")
        assert ws.receive() == (0xA, b"are you there")
        ws.send(0x8, struct.pack("!H", 1000))
        assert ws.receive() == (0x8, struct.pack("!H", 1000))
        assert ws.sock.recv(1) == b""  # and the server hangs up
    finally:
        ws.sock.close()
    # A plain GET without the upgrade is refused, and the server still serves.
    assert served.get("/ws").status_code == 400
    assert served.get("/health").status_code == 200


# -------------------------------------------------------------- the official client


def test_the_official_openai_client_works_against_the_fake(start: Start) -> None:
    openai = pytest.importorskip(
        "openai", reason="the openai package is not installed in this venv (not a dependency)"
    )
    served, _ = start("--tokens-per-s", "0")
    client = openai.OpenAI(base_url=served.url("/v1"), api_key="unused", max_retries=0)
    answer = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3
    )
    assert answer.choices[0].message.content == "".join(tokens(3))
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3, stream=True
    )
    parts = [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content]
    assert parts == tokens(3)
    assert [m.id for m in client.models.list()] == [MODEL]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
