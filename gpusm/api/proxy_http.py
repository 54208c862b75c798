"""The proxy's forwarding: one request to the upstream, its answer streamed back.

Nothing here knows about leases: :class:`Relay` calls ``on_close`` exactly once when
the answer's last byte has been sent, or when sending stopped for any reason (the client
hung up, the upstream broke, the server is stopping), and the caller releases there.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable
from contextlib import suppress

import anyio
from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from gpusm.api.problems import HttpProblem
from gpusm.api.upstream import Body, UpstreamError, UpstreamPool, UpstreamResponse

__all__ = [
    "HOP_BY_HOP",
    "Body",
    "SMALL_BODY",
    "Buffered",
    "Relay",
    "nothing",
    "open_upstream",
    "request_headers",
    "response_headers",
    "upstream_problem",
]

_log = logging.getLogger("gpusm.api.proxy")

# RFC 9110 7.6.1: meaningful for one connection only, never forwarded.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# The proxy's own: the host is the upstream's, the credential is gpusm's (never the
# upstream's business), the length is set again for a body that was read.
_NOT_FORWARDED = frozenset({"host", "authorization", "content-length", "expect"})


def _hop_by_hop(headers: Iterable[tuple[str, str]]) -> set[str]:
    """The hop-by-hop names: the fixed ones and those that ``Connection`` lists."""
    named = set(HOP_BY_HOP)
    for key, value in headers:
        if key.lower() == "connection":
            named |= {v.strip().lower() for v in value.split(",") if v.strip()}
    return named


def request_headers(request: Request, *, keep_length: bool) -> list[tuple[str, str]]:
    """What the upstream gets: the client's headers without hop-by-hop ones, the
    ``Host`` and the gpusm credential, plus ``X-Forwarded-For/Proto/Host``.

    ``keep_length``: the body is streamed as it came, so its ``Content-Length`` stays.
    """
    items = request.headers.items()
    drop = _hop_by_hop(items) | _NOT_FORWARDED
    drop |= {"x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"}
    out = [(k, v) for k, v in items if k.lower() not in drop]
    length = request.headers.get("content-length")
    if keep_length and length is not None:
        out.append(("content-length", length))
    peer = request.client.host if request.client else ""
    earlier = request.headers.get("x-forwarded-for")
    forwarded_for = ", ".join(p for p in (earlier, peer) if p)
    if forwarded_for:
        out.append(("x-forwarded-for", forwarded_for))
    out.append(("x-forwarded-proto", request.url.scheme))
    host = request.headers.get("host")
    if host:
        out.append(("x-forwarded-host", host))
    return out


def response_headers(upstream: UpstreamResponse) -> list[tuple[bytes, bytes]]:
    """The upstream's headers as sent back: raw (repeated ones such as ``Set-Cookie``
    kept), without hop-by-hop ones. ``Content-Length`` and ``Content-Encoding`` stay:
    the body goes back as the bytes it came as (its chunked framing taken off)."""
    raw = upstream.raw_headers
    drop = _hop_by_hop((k.decode("latin-1"), v.decode("latin-1")) for k, v in raw)
    if not upstream.length_is_true:
        drop.add("content-length")
    return [(k, v) for k, v in raw if k.decode("latin-1") not in drop]


def upstream_problem(service: str, url: str, exc: UpstreamError) -> HttpProblem:
    """The problem for an upstream that could not be reached or broke the protocol
    (502), or did not answer in time (504)."""
    if exc.timed_out:
        return HttpProblem(
            "upstream-timeout",
            f"service {service!r} did not answer in time at {url} ({exc})",
            service=service,
        )
    return HttpProblem(
        "upstream-unreachable",
        f"service {service!r} is running but its upstream {url} failed: {exc}",
        service=service,
    )


async def open_upstream(
    pool: UpstreamPool,
    request: Request,
    base: str,
    target: str,
    service: str,
    body: Body,
) -> UpstreamResponse:
    """Send ``request`` to ``base`` + ``target`` and return once the upstream's headers
    are in (the body is still to be read). ``body``: see
    :data:`~gpusm.api.upstream.Body`; None streams the client's body through as it
    arrives. An HttpProblem (502/504) when that fails."""
    length = request.headers.get("content-length")
    streams = "transfer-encoding" in request.headers or length not in (None, "0")
    content: Body = body
    if content is None:
        # An empty body is sent as such: never read again from the client.
        content = request.stream() if streams else (b"" if length == "0" else None)
    headers = request_headers(request, keep_length=not isinstance(body, bytes))
    try:
        return await pool.send(request.method, base, target, headers, content)
    except UpstreamError as exc:
        raise upstream_problem(service, base + target, exc) from exc


async def _chunks(upstream: UpstreamResponse, service: str) -> AsyncGenerator[bytes, None]:
    try:
        async for chunk in upstream.aiter_raw():
            yield chunk
    except UpstreamError as exc:
        # The status line is gone already: all that is left is to cut the answer short,
        # so the client sees a broken body rather than a complete one.
        _log.warning("service %s broke off its answer: %s", service, exc)
        raise


# An answer this small (with its length said) is read whole and sent in one piece:
# streaming it would cost more than waiting for it.
SMALL_BODY = 1 << 16


async def read_small(upstream: UpstreamResponse, service: str) -> bytes | None:
    """The whole body when the upstream said it is at most :data:`SMALL_BODY` bytes;
    None (stream it) otherwise. An HttpProblem (502/504) when reading fails."""
    length = upstream.length
    if length is None or length > SMALL_BODY:
        return None
    try:
        return await upstream.read()  # closes its connection when it fails
    except UpstreamError as exc:
        raise upstream_problem(service, "its answer", exc) from exc


async def _send_then(sending: Awaitable[None], then: Callable[[], Awaitable[None]]) -> None:
    """Send a response, then ``then()`` — shielded from cancellation, however the
    sending ends (sent, the client gone, the server stopping)."""
    try:
        await sending
    finally:
        with anyio.CancelScope(shield=True):
            await then()


class Buffered(Response):
    """A small upstream answer, whole; ``on_close`` is awaited once, shielded, however
    the sending ends."""

    def __init__(
        self,
        upstream: UpstreamResponse,
        body: bytes,
        on_close: Callable[[], Awaitable[None]],
    ) -> None:
        # Not Response.__init__: the headers are the upstream's, nothing to work out.
        self.status_code = upstream.status_code
        self.body = body
        self.background = None
        self.raw_headers = response_headers(upstream)
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _send_then(super().__call__(scope, receive, send), self._on_close)


class Relay(StreamingResponse):
    """The upstream's answer, chunk by chunk as it arrives; ``on_close`` is awaited once,
    shielded from cancellation, however the sending ends."""

    def __init__(
        self,
        upstream: UpstreamResponse,
        service: str,
        on_close: Callable[[], Awaitable[None]],
    ) -> None:
        self._body = _chunks(upstream, service)
        super().__init__(self._body, status_code=upstream.status_code)
        self.raw_headers = response_headers(upstream)
        self._upstream = upstream
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _send_then(super().__call__(scope, receive, send), self.close)

    async def close(self) -> None:
        """Close the upstream answer, then ``on_close`` (once; also when never sent)."""
        on_close, self._on_close = self._on_close, nothing
        try:
            with suppress(Exception):
                await self._body.aclose()
            with suppress(Exception):
                await self._upstream.aclose()
        finally:
            await on_close()


async def nothing() -> None:
    """An ``on_close`` with nothing to do (a relay under no lease)."""
    return
