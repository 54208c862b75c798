"""The proxy's HTTP/1.1 client to the model servers: kept-alive connections, bodies
streamed both ways, nothing else.

Why not httpx (which :mod:`gpusm.health` and the client use): on the proxy's hot path
its connection pool checks every idle connection on every request, and its layers cost
about a millisecond per request — more than the proxy's whole budget. Upstreams are
this machine's own services over plain HTTP/1.1, so the client needs little:

* one pool of idle connections per origin (last in, first out; at most
  :data:`MAX_IDLE` kept; an idle one the server closed is dropped when it is taken);
* a request body of bytes (with its length), or an async iterator — with the client's
  ``Content-Length`` when it sent one, else sent chunked;
* the answer's body decoded from its framing (``Content-Length``, chunked, or up to the
  connection's end) and handed over as it arrives; a connection goes back to the pool
  only once its answer was read to the end and the server keeps it alive;
* a request on a reused connection that the server had closed meanwhile is sent again,
  once, on a new one — when its body can be sent again (bytes or none);
* timeouts: :data:`CONNECT_TIMEOUT_S` to connect, :data:`READ_TIMEOUT_S` between
  two reads (a generation may pause that long between tokens).

Failures are :class:`UpstreamError` (``timed_out`` tells a 504 from a 502).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar
from urllib.parse import urlsplit

__all__ = [
    "CONNECT_TIMEOUT_S",
    "MAX_IDLE",
    "READ_TIMEOUT_S",
    "Body",
    "UpstreamError",
    "UpstreamPool",
    "UpstreamResponse",
]

_T = TypeVar("_T")

# A request body as the proxy holds it: None (none), all of it, or an async iterator.
Body = bytes | AsyncIterator[bytes] | None

CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 600.0
MAX_IDLE = 256
_HEAD_LIMIT = 1 << 16
_NO_BODY_STATUS = frozenset({204, 304})


class UpstreamError(Exception):
    """The upstream could not be reached, broke the protocol, or did not answer in time."""

    def __init__(self, message: str, *, timed_out: bool = False) -> None:
        super().__init__(message)
        self.timed_out = timed_out


class _Stale(Exception):
    """A reused connection was closed by the server before it answered."""


_Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class UpstreamResponse:
    """An answer whose status and headers are in; the body is read with :meth:`aiter_raw`."""

    def __init__(
        self,
        pool: UpstreamPool,
        origin: tuple[str, int],
        conn: _Conn,
        status_code: int,
        raw_headers: list[tuple[bytes, bytes]],
        framing: tuple[str, int],
        keep_alive: bool,
        length_is_true: bool = False,
    ) -> None:
        self.status_code = status_code
        # As the server sent them (repeated names kept), names lower-cased.
        self.raw_headers = raw_headers
        self._pool = pool
        self._origin = origin
        self._conn: _Conn | None = conn
        self._framing = framing
        self._keep_alive = keep_alive
        # Whether the Content-Length the upstream sent is the length of the body that
        # will be relayed (not for a chunked body, or a 304's stand-in length).
        self.length_is_true = length_is_true

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        """The body's bytes as they arrive (the framing taken off); UpstreamError when
        the connection breaks before the end."""
        conn = self._conn
        if conn is None:
            return
        reader = conn[0]
        kind, length = self._framing
        try:
            if kind == "length":
                left = length
                while left > 0:
                    chunk = await _read(reader.read(min(left, 1 << 16)))
                    if not chunk:
                        raise UpstreamError("the connection closed before the body's end")
                    left -= len(chunk)
                    yield chunk
            elif kind == "chunked":
                async for chunk in _dechunk(reader):
                    yield chunk
            elif kind == "close":
                while chunk := await _read(reader.read(1 << 16)):
                    yield chunk
                self._keep_alive = False
        except UpstreamError:
            await self.aclose()
            raise
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
            await self.aclose()
            raise UpstreamError(f"the answer broke off: {exc or type(exc).__name__}") from exc
        self._finished(conn)

    def _finished(self, conn: _Conn) -> None:
        """The body was read to its end: the connection can serve the next request."""
        self._conn = None
        if self._keep_alive:
            self._pool.give_back(self._origin, conn)
        else:
            conn[1].close()

    @property
    def length(self) -> int | None:
        """The body's length when the upstream said it (``Content-Length``, or none)."""
        kind, length = self._framing
        return length if kind == "length" else None

    async def read(self) -> bytes:
        """The whole body (for one whose :attr:`length` is small)."""
        conn = self._conn
        kind, length = self._framing
        if conn is None or kind != "length":
            return b"".join([chunk async for chunk in self.aiter_raw()])
        # The common small answer: one read, no generator.
        try:
            body = await _read(conn[0].readexactly(length)) if length else b""
        except UpstreamError:
            await self.aclose()
            raise
        except (OSError, asyncio.IncompleteReadError) as exc:
            await self.aclose()
            raise UpstreamError("the connection closed before the body's end") from exc
        self._finished(conn)
        return body

    async def aclose(self) -> None:
        """Drop the connection unless the body was read to its end; idempotent."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn[1].close()


class UpstreamPool:
    """Kept-alive connections per origin; see the module docstring."""

    def __init__(self) -> None:
        self._idle: dict[tuple[str, int], deque[_Conn]] = {}
        self._bases: dict[str, tuple[tuple[str, int], str, str]] = {}
        self._closed = False

    async def send(
        self, method: str, base: str, target: str, headers: list[tuple[str, str]], body: Body
    ) -> UpstreamResponse:
        """Send a request and return once the answer's status and headers are in.

        ``base``: ``http://host:port`` (perhaps with a path prefix); ``target``: the
        path and query as the client sent them; ``headers`` are sent as given, plus
        ``Host`` and the body's framing.
        """
        origin, host, prefix = self._parse(base)
        head, chunked = _request_head(method, prefix + target, host, headers, body)
        replayable = not isinstance(body, AsyncIterator)
        conn = self._take(origin)
        if conn is not None:
            try:
                return await self._exchange(origin, conn, method, head, body, chunked)
            except _Stale:
                if not replayable:
                    raise UpstreamError(
                        "the kept-alive connection closed before the upstream answered"
                    ) from None
        conn = await self._connect(origin)
        try:
            return await self._exchange(origin, conn, method, head, body, chunked)
        except _Stale:
            raise UpstreamError("the upstream closed the connection without answering") from None

    def _parse(self, base: str) -> tuple[tuple[str, int], str, str]:
        """(host, port), the Host header and the path prefix of ``base``; parsed once."""
        found = self._bases.get(base)
        if found is None:
            parts = urlsplit(base)
            if parts.scheme != "http" or not parts.hostname:
                raise UpstreamError(f"only http:// upstreams are supported, not {base!r}")
            found = ((parts.hostname, parts.port or 80), parts.netloc, parts.path.rstrip("/"))
            self._bases[base] = found
        return found

    def give_back(self, origin: tuple[str, int], conn: _Conn) -> None:
        """Keep ``conn`` for the next request to ``origin`` (closed if the pool is full)."""
        idle = self._idle.setdefault(origin, deque())
        if self._closed or len(idle) >= MAX_IDLE:
            conn[1].close()
            return
        idle.append(conn)

    async def aclose(self) -> None:
        """Close every idle connection; later answers' connections are closed, not kept."""
        self._closed = True
        for idle in self._idle.values():
            while idle:
                idle.pop()[1].close()

    def _take(self, origin: tuple[str, int]) -> _Conn | None:
        idle = self._idle.get(origin)
        while idle:
            conn = idle.pop()
            if conn[0].at_eof() or conn[1].is_closing():
                conn[1].close()  # the server closed it while it was idle
                continue
            return conn
        return None

    async def _connect(self, origin: tuple[str, int]) -> _Conn:
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                return await asyncio.open_connection(*origin, limit=_HEAD_LIMIT)
        except TimeoutError as exc:
            raise UpstreamError(f"no connection within {CONNECT_TIMEOUT_S:g} s") from exc
        except OSError as exc:
            raise UpstreamError(f"cannot connect: {exc.strerror or exc}") from exc

    async def _exchange(
        self,
        origin: tuple[str, int],
        conn: _Conn,
        method: str,
        head: bytes,
        body: Body,
        chunked: bool,
    ) -> UpstreamResponse:
        reader, writer = conn
        fresh = True
        try:
            writer.write(head)
            if isinstance(body, bytes):
                writer.write(body)
            elif body is not None:
                await self._send_stream(writer, body, chunked=chunked)
            await _read(writer.drain())
            try:
                raw = await _read(reader.readuntil(b"\r\n\r\n"))
            except asyncio.IncompleteReadError as exc:
                if not exc.partial:
                    raise _Stale from exc
                raise
            fresh = False
            # An interim answer (100 Continue, 103 Early Hints) is followed by the
            # real one on the same connection: skip to it (101 is final).
            while raw[9:10] == b"1" and raw[9:12] != b"101":
                raw = await _read(reader.readuntil(b"\r\n\r\n"))
            return _response(self, origin, conn, method, raw)
        except _Stale:
            writer.close()
            raise
        except (ConnectionResetError, BrokenPipeError) as exc:
            writer.close()
            if fresh:
                raise _Stale from exc
            raise UpstreamError(f"the connection broke: {exc}") from exc
        except UpstreamError:
            writer.close()
            raise
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
            writer.close()
            raise UpstreamError(f"a bad answer: {exc or type(exc).__name__}") from exc
        except BaseException:
            # The client's body failed mid-way (it hung up), or the request was
            # cancelled: the upstream has half a request, so the connection is done.
            writer.close()
            raise

    @staticmethod
    async def _send_stream(
        writer: asyncio.StreamWriter, body: AsyncIterator[bytes], *, chunked: bool
    ) -> None:
        async for chunk in body:
            if not chunk:
                continue
            if chunked:
                writer.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
            else:
                writer.write(chunk)
            await _read(writer.drain())
        if chunked:
            writer.write(b"0\r\n\r\n")


def _request_head(
    method: str, target: str, host: str, headers: list[tuple[str, str]], body: Body
) -> tuple[bytes, bool]:
    """The request line and headers, and whether the body goes chunked."""
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}"]
    lines += [f"{k}: {v}" for k, v in headers if k.lower() not in ("host", "content-length")]
    length = next((v for k, v in headers if k.lower() == "content-length"), None)
    chunked = False
    if isinstance(body, bytes):
        if body or method not in ("GET", "HEAD", "DELETE", "OPTIONS"):
            lines.append(f"Content-Length: {len(body)}")
    elif body is not None:
        chunked = not length
        lines.append("Transfer-Encoding: chunked" if chunked else f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"), chunked


def _response(
    pool: UpstreamPool, origin: tuple[str, int], conn: _Conn, method: str, raw: bytes
) -> UpstreamResponse:
    lines = raw[:-4].split(b"\r\n")
    version, _, rest = lines[0].partition(b" ")
    status = int(rest[:3])
    headers: list[tuple[bytes, bytes]] = []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip():
            raise ValueError(f"a malformed header line {line[:80]!r}")
        headers.append((name.lower(), value.strip()))
    fields = dict(headers)
    connection = fields.get(b"connection", b"").lower()
    keep_alive = version == b"HTTP/1.1" and b"close" not in connection
    framing: tuple[str, int]
    if method == "HEAD" or status in _NO_BODY_STATUS or 100 <= status < 200:
        framing = ("length", 0)
    elif b"chunked" in fields.get(b"transfer-encoding", b"").lower():
        framing = ("chunked", 0)
    elif b"content-length" in fields:
        length = int(fields[b"content-length"])
        if length < 0:
            raise ValueError(f"a negative Content-Length ({length})")
        framing = ("length", length)
    else:
        framing = ("close", 0)
    said = fields.get(b"content-length")
    true_length = method == "HEAD" or (framing[0] == "length" and said == str(framing[1]).encode())
    return UpstreamResponse(
        pool, origin, conn, status, headers, framing, keep_alive, length_is_true=true_length
    )


async def _dechunk(reader: asyncio.StreamReader) -> AsyncIterator[bytes]:
    while True:
        size_line = await _read(reader.readuntil(b"\r\n"))
        size = int(size_line.split(b";", 1)[0].strip(), 16)
        if size == 0:
            # Trailers (rarely sent) up to the empty line end the body.
            while (await _read(reader.readuntil(b"\r\n"))) != b"\r\n":
                pass
            return
        chunk = await _read(reader.readexactly(size + 2))
        if not chunk.endswith(b"\r\n"):
            raise ValueError("a chunk not followed by CRLF")
        yield chunk[:-2]


async def _read(pending: Awaitable[_T]) -> _T:
    """``pending``, bounded by :data:`READ_TIMEOUT_S` (read when called, so a test can
    shorten it)."""
    limit = READ_TIMEOUT_S
    try:
        async with asyncio.timeout(limit):
            return await pending
    except TimeoutError as exc:
        raise UpstreamError(f"no answer within {limit:g} s", timed_out=True) from exc
