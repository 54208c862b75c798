"""The fake model server's client endpoints: the request shapes unmodified clients send.

So that a proxy in front of a model server can be tested with real clients, the fake
server also answers, while serving (a parked server wakes first; loading or stopping:
503), with tokens produced at ``tokens_per_s`` (0: as fast as possible):

* OpenAI: ``POST /v1/chat/completions`` and ``POST /v1/completions`` (``{"model",
  "messages" | "prompt", "stream", "max_tokens"}``): a ``chat.completion`` /
  ``text_completion`` object, or with ``"stream": true`` server-sent events, one
  ``data: {chunk}`` per token as it is produced, a last chunk with the
  ``finish_reason`` (and a usage chunk when ``stream_options.include_usage``), then
  ``data: [DONE]``. ``POST /v1/embeddings`` answers small deterministic vectors, and
  ``GET /v1/models`` lists the model. Another model name: 404 with an OpenAI error body.
* Ollama: ``POST /api/chat`` and ``POST /api/generate`` with ``messages`` / a ``prompt``
  stream NDJSON lines (``"done": false`` per token, then one ``"done": true``) unless
  ``"stream": false``; Ollama streams by default, but a request that carries
  ``keep_alive`` and no ``stream`` (the park and wake shapes of :mod:`fake_park`) keeps
  its single JSON answer, as does a generate with ``"stream": false``. ``/api/chat``
  without messages loads or (``keep_alive`` 0) unloads, like ``/api/generate``.
* ComfyUI: ``GET /ws`` is a WebSocket (RFC 6455) that first sends a ``{"type":
  "status"}`` message, as ComfyUI does, then echoes every text or binary message; it
  answers pings and closes.

Token ``i`` (from 1) of a request for model ``M`` is ``"M-i "``, so a test can check
what came through; ``max_tokens`` (default 16; Ollama: ``options.num_predict``) sets
how many. The server keeps connections alive (HTTP/1.1), but the streams are
close-delimited (``Connection: close``): each chunk is written to the socket as soon as
it is produced.
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
import time
import uuid
from collections.abc import Callable, Iterator
from email.message import Message
from io import BufferedIOBase
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from gpusm.gpu.fake_park import SERVING, NotServing, ParkRoutes, Query, _now, _unloads

__all__ = ["CLIENT_GET_ROUTES", "CLIENT_POST_ROUTES", "DEFAULT_TOKENS", "ClientRoutes"]

DEFAULT_TOKENS = 16

_WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_WS_MAX_MESSAGE = 16 * 1024 * 1024
_EMBEDDING_DIM = 8


class _BadRequest(Exception):
    """A request the fake refuses with 400; the message is the error's."""


def token(model: str, i: int) -> str:
    """Token ``i`` (from 1) of an answer from ``model``."""
    return f"{model}-{i} "


def _words(value: Any) -> int:
    """A rough prompt token count: the words of a prompt, or of messages' contents."""
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, dict):  # a message, or a part of one: its text, not its role
        return _words(value.get("content")) + _words(value.get("text"))
    if isinstance(value, list):
        return sum(_words(v) for v in value)
    return 0


def _max_tokens(body: dict[str, Any]) -> tuple[int, bool]:
    """How many tokens to produce, and whether the client set the limit."""
    options = body.get("options")
    asked = body.get("max_completion_tokens", body.get("max_tokens"))
    if asked is None and isinstance(options, dict):
        asked = options.get("num_predict")
    if asked is None:
        return DEFAULT_TOKENS, False
    if isinstance(asked, bool) or not isinstance(asked, int) or asked < 0:
        raise _BadRequest(f"max_tokens must be a non-negative integer, not {asked!r}")
    return asked, True


def _openai_error(message: str, code: str | None = None) -> dict[str, Any]:
    kind = "invalid_request_error"
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


class ClientRoutes(ParkRoutes):
    """The client endpoints, mixed into the fake server's request handler before it."""

    if TYPE_CHECKING:  # the handler's (BaseHTTPRequestHandler's)
        rfile: BufferedIOBase
        wfile: BufferedIOBase
        headers: Message
        path: str
        close_connection: bool

        def send_response(self, code: int, message: str | None = None) -> None: ...
        def send_header(self, keyword: str, value: str) -> None: ...
        def end_headers(self) -> None: ...

    # -------------------------------------------------------------- helpers
    def tokens(self, count: int) -> Iterator[str]:
        """Produce ``count`` tokens at ``tokens_per_s``; NotServing if stopped meanwhile."""
        rate = self.fake.options.tokens_per_s
        for i in range(1, count + 1):
            if rate > 0 and self.fake.wait(1.0 / rate):
                raise NotServing("stopping")
            yield token(self.fake.options.model, i)

    def serve(self, how: str) -> None:
        """Wake a parked server before answering; NotServing while loading or stopping."""
        if self.fake.state not in SERVING:
            raise NotServing(self.fake.state)
        self.wake(how)

    def stream(self, content_type: str, chunks: Iterator[bytes]) -> None:
        """Answer 200 and write each chunk as it comes; the end closes the connection."""
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        try:
            for chunk in chunks:
                self.wfile.write(chunk)
                self.wfile.flush()
        except NotServing:
            return  # stopped mid-answer: the connection closes without the end
        except OSError:
            return  # the client went away

    def openai_model(self, body: dict[str, Any]) -> bool:
        """Whether ``body`` names the model; else answers 404 (or 400) and returns False."""
        name = body.get("model")
        if not isinstance(name, str) or not name:
            self.reply(400, _openai_error("you must provide a model"))
            return False
        if not self.is_model(name):
            message = f"The model `{name}` does not exist or you do not have access to it."
            self.reply(404, _openai_error(message, "model_not_found"))
            return False
        return True

    # -------------------------------------------------------------- OpenAI
    def openai_models(self) -> None:
        if self.fake.state not in SERVING:  # a GET route answers its own 503
            self.reply(503, _openai_error(f"the server is {self.fake.state}"))
            return
        model = {
            "id": self.fake.options.model,
            "object": "model",
            "created": int(time.time()),
            "owned_by": "gpusm-fake",
        }
        self.reply(200, {"object": "list", "data": [model]})

    def openai_chat(self, query: Query, body: dict[str, Any]) -> None:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            self.reply(400, _openai_error("messages must be a non-empty list"))
            return
        self.openai_complete(body, chat=True, prompt_tokens=_words(messages))

    def openai_completions(self, query: Query, body: dict[str, Any]) -> None:
        self.openai_complete(body, chat=False, prompt_tokens=_words(body.get("prompt")))

    def openai_complete(self, body: dict[str, Any], *, chat: bool, prompt_tokens: int) -> None:
        if not self.openai_model(body):
            return
        try:
            count, limited = _max_tokens(body)
        except _BadRequest as exc:
            self.reply(400, _openai_error(str(exc)))
            return
        self.serve("openai chat completions" if chat else "openai completions")
        model = body["model"]
        kind = "chat.completion" if chat else "text_completion"
        head = {
            "id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex,
            "object": kind,
            "created": int(time.time()),
            "model": model,
        }
        finish = "length" if limited else "stop"
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": count,
            "total_tokens": prompt_tokens + count,
        }
        if not body.get("stream"):
            text = "".join(self.tokens(count))
            if chat:
                choice: dict[str, Any] = {"message": {"role": "assistant", "content": text}}
            else:
                choice = {"text": text, "logprobs": None}
            choice = {"index": 0, **choice, "finish_reason": finish}
            self.reply(200, {**head, "choices": [choice], "usage": usage})
            return
        options = body.get("stream_options")
        with_usage = isinstance(options, dict) and bool(options.get("include_usage"))
        chunk_head = {**head, "object": "chat.completion.chunk" if chat else kind}

        def event(doc: dict[str, Any]) -> bytes:
            return b"data: " + json.dumps(doc).encode() + b"\n\n"

        def choice_of(text: str | None, first: bool, end: str | None) -> dict[str, Any]:
            if not chat:
                return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": end}
            delta: dict[str, Any] = {"role": "assistant"} if first else {}
            if text is not None:
                delta["content"] = text
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": end}

        def chunks() -> Iterator[bytes]:
            for i, text in enumerate(self.tokens(count)):
                yield event({**chunk_head, "choices": [choice_of(text, i == 0, None)]})
            yield event({**chunk_head, "choices": [choice_of(None, count == 0, finish)]})
            if with_usage:
                yield event({**chunk_head, "choices": [], "usage": usage})
            yield b"data: [DONE]\n\n"

        self.stream("text/event-stream", chunks())

    def openai_embeddings(self, query: Query, body: dict[str, Any]) -> None:
        if not self.openai_model(body):
            return
        inputs = body.get("input")
        items = inputs if isinstance(inputs, list) else [inputs]
        self.serve("openai embeddings")
        data = []
        for index, item in enumerate(items):
            digest = hashlib.sha256(json.dumps(item).encode()).digest()
            vector = [round(b / 255.0 - 0.5, 4) for b in digest[:_EMBEDDING_DIM]]
            data.append({"object": "embedding", "index": index, "embedding": vector})
        used = _words(items)
        self.reply(
            200,
            {
                "object": "list",
                "data": data,
                "model": body["model"],
                "usage": {"prompt_tokens": used, "total_tokens": used},
            },
        )

    # -------------------------------------------------------------- Ollama
    def ollama_generate_or_stream(self, query: Query, body: dict[str, Any]) -> None:
        streamed = body.get("stream", "keep_alive" not in body)
        if body.get("prompt") and streamed and self.is_model(body.get("model")):
            self.ollama_answer(body, chat=False, prompt_tokens=_words(body.get("prompt")))
        else:
            self.ollama_generate(query, body)  # fake_park's: park, wake, or a tiny answer

    def ollama_chat(self, query: Query, body: dict[str, Any]) -> None:
        name = body.get("model")
        if not self.is_model(name):
            self.reply(404, {"error": f"model '{name}' not found"})
            return
        messages = body.get("messages")
        if messages:
            self.ollama_answer(body, chat=True, prompt_tokens=_words(messages))
            return
        # No messages: Ollama's load (or, with keep_alive 0, unload) request.
        keep_alive = body.get("keep_alive")
        unload = _unloads(keep_alive)
        if unload:
            self.park("ollama chat keep_alive=0")
        else:
            self.wake(f"ollama chat keep_alive={keep_alive}")
        message = {"role": "assistant", "content": ""}
        answer = {"model": name, "created_at": _now(), "message": message, "done": True}
        self.reply(200, {**answer, "done_reason": "unload" if unload else "load"})

    def ollama_answer(self, body: dict[str, Any], *, chat: bool, prompt_tokens: int) -> None:
        try:
            count, limited = _max_tokens(body)
        except _BadRequest as exc:
            self.reply(400, {"error": str(exc)})
            return
        self.serve("ollama chat" if chat else "ollama generate")
        model = body["model"]
        unload = _unloads(body.get("keep_alive"))
        began = time.monotonic_ns()

        def piece(text: str) -> dict[str, Any]:
            key = "message" if chat else "response"
            value: Any = {"role": "assistant", "content": text} if chat else text
            return {"model": model, "created_at": _now(), key: value}

        def last(text: str) -> dict[str, Any]:
            if unload:
                self.park("ollama keep_alive=0 after answering")
            took = time.monotonic_ns() - began
            return {
                **piece(text),
                "done": True,
                "done_reason": "length" if limited else "stop",
                "total_duration": took,
                "load_duration": 0,
                "prompt_eval_count": prompt_tokens,
                "prompt_eval_duration": 0,
                "eval_count": count,
                "eval_duration": took,
            }

        if body.get("stream", True) is False:
            text = "".join(self.tokens(count))
            self.reply(200, last(text))
            return

        def lines() -> Iterator[bytes]:
            for text in self.tokens(count):
                yield json.dumps({**piece(text), "done": False}).encode() + b"\n"
            yield json.dumps(last("")).encode() + b"\n"

        self.stream("application/x-ndjson", lines())

    # -------------------------------------------------------------- ComfyUI WebSocket
    def comfyui_ws(self) -> None:
        key = self.headers.get("Sec-WebSocket-Key")
        upgrade = (self.headers.get("Upgrade") or "").lower()
        if upgrade != "websocket" or not key:
            self.reply(400, {"error": "GET /ws needs a WebSocket upgrade"})
            return
        digest = hashlib.sha1((key.strip() + _WS_GUID).encode()).digest()
        accept = base64.b64encode(digest).decode()
        # The 101 must say HTTP/1.1 whatever the server's protocol_version.
        self.wfile.write(
            (
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
            ).encode()
        )
        self.close_connection = True
        client_id = _query_value(self.path, "clientId") or uuid.uuid4().hex
        queue = {"exec_info": {"queue_remaining": 0}}
        status = {"type": "status", "data": {"status": queue, "sid": client_id}}
        try:
            self.wfile.write(ws_frame(0x1, json.dumps(status).encode()))
            _ws_echo(self.rfile, self.wfile)
        except OSError:
            return


def _query_value(path: str, name: str) -> str | None:
    values = parse_qs(path.partition("?")[2]).get(name)
    return values[0] if values else None


def ws_frame(opcode: int, payload: bytes) -> bytes:
    """One unmasked, final WebSocket frame (the server's side)."""
    size = len(payload)
    if size < 126:
        head = struct.pack("!BB", 0x80 | opcode, size)
    elif size < 1 << 16:
        head = struct.pack("!BBH", 0x80 | opcode, 126, size)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 127, size)
    return head + payload


def _read_exact(rfile: BufferedIOBase, size: int) -> bytes | None:
    data = rfile.read(size) if size else b""
    return data if data is not None and len(data) == size else None


class _WsProtocolError(Exception):
    """A frame the server refuses; args[0] is the close code to answer with."""


def _ws_read_frame(rfile: BufferedIOBase, pending: int) -> tuple[bool, int, bytes] | None:
    """The next client frame as (fin, opcode, unmasked payload); None when the client left.

    ``pending`` is the size of the fragmented message so far (for the size limit).
    """
    head = _read_exact(rfile, 2)
    if head is None:
        return None
    size = head[1] & 0x7F
    if size >= 126:
        extra = _read_exact(rfile, 2 if size == 126 else 8)
        if extra is None:
            return None
        size = struct.unpack("!H" if len(extra) == 2 else "!Q", extra)[0]
    if not head[1] & 0x80:  # RFC 6455 5.1: a client's frames are always masked
        raise _WsProtocolError(1002)
    if pending + size > _WS_MAX_MESSAGE:
        raise _WsProtocolError(1009)
    mask = _read_exact(rfile, 4)
    data = _read_exact(rfile, size)
    if mask is None or data is None:
        return None
    payload = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
    return bool(head[0] & 0x80), head[0] & 0x0F, payload


def _ws_echo(rfile: BufferedIOBase, wfile: BufferedIOBase) -> None:
    """Echo messages until the client closes (or breaks the protocol, or goes away)."""
    message = bytearray()
    message_opcode = 0  # the opcode of the fragmented message in progress; 0: none
    while True:
        try:
            frame = _ws_read_frame(rfile, len(message))
        except _WsProtocolError as exc:
            wfile.write(ws_frame(0x8, struct.pack("!H", exc.args[0])))
            return
        if frame is None:
            return
        fin, opcode, payload = frame
        if opcode == 0x8:  # close: answer with the same status code, then hang up
            wfile.write(ws_frame(0x8, payload[:2]))
            return
        if opcode == 0x9:
            wfile.write(ws_frame(0xA, payload))
            continue
        if opcode == 0xA:
            continue
        if opcode not in (0x1, 0x2) and not (opcode == 0x0 and message_opcode):
            wfile.write(ws_frame(0x8, struct.pack("!H", 1002)))
            return
        message_opcode = opcode or message_opcode
        message += payload
        if fin:
            wfile.write(ws_frame(message_opcode, bytes(message)))
            message.clear()
            message_opcode = 0


CLIENT_GET_ROUTES: dict[str, Callable[[ClientRoutes], None]] = {
    "/v1/models": ClientRoutes.openai_models,
    "/ws": ClientRoutes.comfyui_ws,
}

CLIENT_POST_ROUTES: dict[str, Callable[[ClientRoutes, Query, dict[str, Any]], None]] = {
    "/v1/chat/completions": ClientRoutes.openai_chat,
    "/v1/completions": ClientRoutes.openai_completions,
    "/v1/embeddings": ClientRoutes.openai_embeddings,
    "/api/generate": ClientRoutes.ollama_generate_or_stream,
    "/api/chat": ClientRoutes.ollama_chat,
}
