"""The proxy's HTTP/1.1 client (gpusm.api.upstream) against raw servers on 127.0.0.1
that answer exactly the bytes each test scripts: framing, reuse, stale connections,
streamed bodies, timeouts and bad answers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from gpusm.api import upstream
from gpusm.api.proxy_http import response_headers
from gpusm.api.upstream import UpstreamError, UpstreamPool

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _head(reader: asyncio.StreamReader) -> bytes:
    return await reader.readuntil(b"\r\n\r\n")


async def _serve(handler: Handler) -> tuple[asyncio.Server, str, list[int]]:
    """A server on a free port; the list counts its connections."""
    connections: list[int] = []

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        try:
            await handler(reader, writer)
        finally:
            writer.close()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}", connections


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), 20))


async def _answers(handler: Handler, *requests: tuple[str, str, Any]) -> list[tuple[int, bytes]]:
    server, base, _ = await _serve(handler)
    pool = UpstreamPool()
    out = []
    async with server:
        for method, target, body in requests:
            answer = await pool.send(method, base, target, [("accept", "*/*")], body)
            out.append((answer.status_code, await answer.read()))
        await pool.aclose()
    return out


def test_length_chunked_and_close_framed_bodies_are_read_whole() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
        await _head(reader)
        writer.write(b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n")
        writer.write(b"3\r\nabc\r\n4;ext=1\r\ndefg\r\n0\r\nX-Trailer: 1\r\n\r\n")
        await _head(reader)
        writer.write(b"HTTP/1.1 202 Accepted\r\nConnection: close\r\n\r\nuntil the end")
        await writer.drain()

    async def test() -> None:
        got = await _answers(handler, ("GET", "/a", None), ("GET", "/b", None), ("GET", "/c", None))
        assert got == [(200, b"hello"), (201, b"abcdefg"), (202, b"until the end")]

    run(test)


def test_a_connection_is_reused_and_a_stale_one_replaced_for_a_replayable_request() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(2):
            head = await _head(reader)
            assert head.startswith((b"GET /x/y?z=1 HTTP/1.1\r\nHost: 127.0.0.1:", b"POST"))
            if head.startswith(b"POST"):
                await reader.readexactly(4)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
        # Then the server closes the (idle, kept) connection.

    async def test() -> None:
        server, base, connections = await _serve(handler)
        pool = UpstreamPool()
        async with server:
            for method, body in (("GET", None), ("POST", b"data"), ("GET", None)):
                answer = await pool.send(method, base, "/x/y?z=1", [], body)
                assert await answer.read() == b"ok"
            # Two requests on the first connection, the third on a new one.
            assert len(connections) == 2
            await pool.aclose()

    run(test)


def test_a_streamed_body_without_a_length_is_sent_chunked() -> None:
    received: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await _head(reader)
        assert b"Transfer-Encoding: chunked" in head
        received.append(await reader.readuntil(b"0\r\n\r\n"))
        writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        await writer.drain()

    async def parts() -> AsyncIterator[bytes]:
        yield b"ab"
        yield b""
        yield b"cde"

    async def test() -> None:
        got = await _answers(handler, ("PUT", "/up", parts()))
        assert got == [(204, b"")]
        assert received == [b"2\r\nab\r\n3\r\ncde\r\n0\r\n\r\n"]

    run(test)


@pytest.mark.parametrize(
    ("answer", "says"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", "closed before the body"),
        (b"HTTP/1.1 200 OK\r\nBad Header\r\n\r\n", "malformed header"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "broke off"),
        (b"", "closed the connection without answering"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "negative Content-Length"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabXY", "not followed"),
    ],
)
def test_bad_answers_are_upstream_errors(answer: bytes, says: str) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _head(reader)
        writer.write(answer)
        await writer.drain()

    async def test() -> None:
        with pytest.raises(UpstreamError, match=says) as failed:
            await _answers(handler, ("GET", "/", None))
        assert not failed.value.timed_out

    run(test)


def test_an_upstream_that_does_not_answer_in_time_is_a_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(upstream, "READ_TIMEOUT_S", 0.2)
    gone = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _head(reader)
        await gone.wait()

    async def test() -> None:
        with pytest.raises(UpstreamError, match=r"no answer within 0\.2 s") as failed:
            await _answers(handler, ("GET", "/", None))
        assert failed.value.timed_out
        gone.set()

    run(test)


def test_nothing_listening_and_https_are_refused_clearly() -> None:
    async def test() -> None:
        server, base, _ = await _serve(lambda r, w: asyncio.sleep(0))
        server.close()
        await server.wait_closed()
        pool = UpstreamPool()
        with pytest.raises(UpstreamError, match="cannot connect"):
            await pool.send("GET", base, "/", [], None)
        with pytest.raises(UpstreamError, match="only http://"):
            await pool.send("GET", "https://127.0.0.1:1", "/", [], None)

    run(test)


def test_an_interim_answer_is_skipped_and_a_stand_in_length_is_not_relayed() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _head(reader)
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst")
        await _head(reader)
        # A 304 may carry the length of the 200 it stands for: there is no body.
        writer.write(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 1234\r\n\r\n")
        await _head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecond")
        await writer.drain()

    async def test() -> None:
        server, base, _ = await _serve(handler)
        pool = UpstreamPool()
        async with server:
            first = await pool.send("POST", base, "/", [], b"x")
            assert (first.status_code, await first.read()) == (200, b"first")
            assert response_headers(first) == [(b"content-length", b"5")]
            cached = await pool.send("GET", base, "/", [], None)
            assert (cached.status_code, await cached.read()) == (304, b"")
            assert response_headers(cached) == []
            second = await pool.send("GET", base, "/", [], None)
            assert await second.read() == b"second"  # the connection was not poisoned
            await pool.aclose()

    run(test)
