"""The proxy's WebSocket pass-through (ComfyUI's ``/ws``): one upstream connection per
client connection, messages relayed both ways as they come, closes passed on.

The client's handshake is answered only once the upstream accepted (with the
subprotocol it chose); an upstream that refuses or cannot be reached closes the
client's before it is accepted (the client sees the handshake fail).
"""

from __future__ import annotations

import logging
from contextlib import suppress

import anyio
from starlette.websockets import WebSocket, WebSocketDisconnect
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from gpusm.api.proxy_http import HOP_BY_HOP

__all__ = ["TRY_AGAIN_LATER", "relay_websocket", "websocket_url"]

_log = logging.getLogger("gpusm.api.proxy")

# RFC 6455 close codes: 1011 the upstream failed, 1013 try again later (not ready).
UPSTREAM_FAILED = 1011
TRY_AGAIN_LATER = 1013
# Codes that are reported, never sent (RFC 6455 7.4.1).
_NOT_SENDABLE = frozenset({1005, 1006, 1015})
# The handshake is the client library's to make; the credential is gpusm's.
_NOT_FORWARDED = HOP_BY_HOP | {
    "host",
    "authorization",
    "content-length",
    "sec-websocket-key",
    "sec-websocket-version",
    "sec-websocket-extensions",
    "sec-websocket-protocol",
    "sec-websocket-accept",
}


def websocket_url(base: str, path: str) -> str:
    """The upstream's WebSocket URL for an HTTP(S) ``base`` and a path with its query."""
    scheme, sep, rest = base.partition("://")
    return ("wss" if scheme == "https" else "ws") + sep + rest + path


async def relay_websocket(websocket: WebSocket, url: str, service: str) -> None:
    """Connect to ``url``, accept ``websocket``, relay until either side closes."""
    headers = [(k, v) for k, v in websocket.headers.items() if k.lower() not in _NOT_FORWARDED]
    offered = websocket.headers.get("sec-websocket-protocol", "")
    subprotocols = [p.strip() for p in offered.split(",") if p.strip()]
    try:
        upstream = await connect(
            url,
            additional_headers=headers,
            subprotocols=subprotocols or None,  # type: ignore[arg-type]
            open_timeout=10,
            max_size=None,
            proxy=None,
        )
    except (OSError, TimeoutError, InvalidHandshake, InvalidURI) as exc:
        _log.warning("service %s refused a WebSocket at %s: %s", service, url, exc)
        await websocket.close(UPSTREAM_FAILED)
        return
    async with upstream:
        await websocket.accept(subprotocol=upstream.subprotocol)
        async with anyio.create_task_group() as both:
            both.start_soon(_downstream, upstream, websocket, both.cancel_scope)
            both.start_soon(_upstream, websocket, upstream, both.cancel_scope)


async def _downstream(
    upstream: ClientConnection, websocket: WebSocket, done: anyio.CancelScope
) -> None:
    try:
        async for message in upstream:
            if isinstance(message, str):
                await websocket.send_text(message)
            else:
                await websocket.send_bytes(message)
    except ConnectionClosed:
        pass
    except (WebSocketDisconnect, RuntimeError, OSError):
        done.cancel()  # the client is gone: the other direction ends the upstream
        return
    code = upstream.close_code
    if code is None or code == 1006:
        code = UPSTREAM_FAILED  # it went away without a close: not a normal end
    with suppress(RuntimeError, OSError):  # the client may have closed first
        await websocket.close(1000 if code in _NOT_SENDABLE else code)
    done.cancel()


async def _upstream(
    websocket: WebSocket, upstream: ClientConnection, done: anyio.CancelScope
) -> None:
    code = 1000
    try:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                code = int(message.get("code") or 1000)
                break
            text, data = message.get("text"), message.get("bytes")
            if text is not None:
                await upstream.send(text)
            elif data is not None:
                await upstream.send(data)
    except ConnectionClosed:
        pass
    with anyio.CancelScope(shield=True):
        await upstream.close(1000 if code in _NOT_SENDABLE else code)
    done.cancel()
