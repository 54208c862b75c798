"""The proxy on ``gpusm serve``: a program that knows only a model server's URL makes
gpusm run the right service.

* ``/svc/{service}/{path}`` (any method) goes to the service's upstream
  (``services.NAME.upstream``, default the origin of its HTTP health check) + ``/{path}``
  + the query.
* ``/v1/{path}`` (OpenAI) and ``/api/{path}`` (Ollama) go to the service that serves the
  model the request names (:mod:`gpusm.api.proxy_models`); the path is kept as it is.
  ``GET /v1/models`` lists the configured models and starts nothing.

Each request takes a lease of its own (client ``proxy:<key>:<request id>``) through
:meth:`~gpusm.engine.coordinator.Coordinator.ensure_service`: the same admission,
queue and preemption as a phase, waiting at most ``proxy.wait_s``; a refusal is a 503
problem with ``Retry-After``. The lease is held until the answer's last byte has been
sent (a preemption drains it, up to ``drain_timeout_s``, rather than cutting it off) and
released however the request ends. Every route needs the daemon's bearer token (the
``admin`` key).
"""

from __future__ import annotations

import itertools
import logging
import math
import secrets
import threading
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager, suppress
from functools import partial
from typing import Any

import anyio.to_thread
from fastapi import Request, WebSocket
from fastapi.responses import Response
from starlette.requests import HTTPConnection

from gpusm.api.problems import HttpProblem
from gpusm.api.proxy_http import Buffered, Relay, nothing, open_upstream, read_small
from gpusm.api.proxy_keys import Caller, KeyRing
from gpusm.api.proxy_models import (
    model_in_body,
    model_in_form,
    model_in_multipart,
    multipart_boundary,
    names_model_in_body,
    route_model,
)
from gpusm.api.proxy_ws import TRY_AGAIN_LATER, relay_websocket, websocket_url
from gpusm.api.state import ApiState
from gpusm.api.upstream import Body, UpstreamPool
from gpusm.config import Config, ServiceConfig
from gpusm.domain.states import State
from gpusm.engine.coordinator import Coordinator
from gpusm.errors import (
    GpusmError,
    InsufficientVram,
    RequestCancelled,
    RequestTimeout,
    UnknownName,
)
from gpusm.results import PhaseResult

__all__ = ["CLIENT_GONE", "MODEL_BODY_LIMIT", "WAITERS", "Proxy", "rest_of_path", "route_by_model"]

_log = logging.getLogger("gpusm.api.proxy")

# A body read to find its model is held in memory: no bigger than this.
MODEL_BODY_LIMIT = 1 << 20
# Retry-After when the service could not be made ready: about one more load's worth.
_RETRY_MIN_S = 1
_RETRY_MAX_S = 60
# Worker threads proxied requests may wait in at once (of the daemon's 256); more
# wait for one of them, within their proxy.wait_s.
WAITERS = 128
# The status a request whose client hung up is counted under (nginx's; nobody reads it).
CLIENT_GONE = 499


def _coordinator(state: ApiState) -> Coordinator:
    found = state.coordinator
    if found is None:
        raise state.unavailable()
    return found


def _retry_after(coordinator: Coordinator, service: str) -> str:
    load = coordinator.config.services[service].load_s or 0.0
    return str(min(_RETRY_MAX_S, max(_RETRY_MIN_S, math.ceil(load))))


class _Meters:
    """The proxy's metric children, labelled once per service (and status code):
    ``labels()`` costs more than the proxy can spend on every request."""

    def __init__(self, metrics: Any) -> None:
        self._metrics = metrics
        self._children: dict[tuple[str, str, str], Any] = {}

    def _child(self, family: str, service: str, code: str = "") -> Any:
        key = (family, service, code)
        child = self._children.get(key)
        if child is None:
            metric = getattr(self._metrics, family)
            child = metric.labels(service, code) if code else metric.labels(service)
            self._children[key] = child
        return child

    def requests(self, service: str, code: str) -> Any:
        """``gpusm_proxy_requests_total{service,code}``."""
        return self._child("proxy_requests", service, code)

    def inflight(self, service: str) -> Any:
        """``gpusm_proxy_inflight{service}``."""
        return self._child("proxy_inflight", service)

    def wait(self, service: str) -> Any:
        """``gpusm_proxy_wait_seconds{service}``."""
        return self._child("proxy_wait", service)


class Proxy:
    """The proxy's shared part: the upstream client, the keys, leases, forwarding.

    One per app: the routes on the API's port and the services' own listeners
    (:mod:`gpusm.api.proxy_listen`) use the same one.
    """

    def __init__(self, state: ApiState) -> None:
        self.state = state
        self.http: UpstreamPool | None = None
        self.keys = KeyRing()
        self.meters = _Meters(state.metrics)
        # service -> (the config it was worked out for, its upstream's base URL)
        self._bases: dict[str, tuple[ServiceConfig, str]] = {}
        self._id_prefix = secrets.token_hex(3)
        self._ids = itertools.count(1)
        self._waiting: anyio.CapacityLimiter | None = None

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """The upstream connections' lifetime: the app's."""
        # No pooled connection outlives the server.
        self.http = UpstreamPool()
        try:
            yield
        finally:
            http, self.http = self.http, None
            await http.aclose()

    def _waiters(self) -> anyio.CapacityLimiter:
        """The worker threads proxied requests may wait in: at most :data:`WAITERS`, so
        that a crowd waiting for a stopped model leaves the rest of the daemon's threads
        (status, phases, reloads) free."""
        if self._waiting is None:
            self._waiting = anyio.CapacityLimiter(WAITERS)
        return self._waiting

    def _request_id(self) -> str:
        """Unique in this daemon's life (and unlike another daemon's): a random prefix
        and a count, which costs no system call per request."""
        return f"{self._id_prefix}{next(self._ids):x}"

    def config(self) -> Config:
        """The running config (503 while recovering)."""
        return _coordinator(self.state).config

    def caller(self, connection: HTTPConnection) -> Caller:
        """The key a request (or WebSocket) authenticated with; 401 when none."""
        config = _coordinator(self.state).config
        authorization = connection.headers.get("authorization")
        return self.keys.caller(config, self.state.token, authorization)

    async def forward(
        self,
        request: Request,
        caller: Caller,
        service: str,
        path: str,
        body: Body,
        model: str | None = None,
    ) -> Response:
        """Ensure ``service`` under a lease of this request's own, then relay ``request``
        to its upstream + ``path``; the lease ends with the answer. Counted in the
        ``gpusm_proxy_*`` metrics; one that started, woke or stopped something is an
        audit event. A path in the service's ``ignore_paths`` never starts it: it is
        relayed (under no lease) while the service is healthy, else refused (503)."""
        coordinator = _coordinator(self.state)
        caller.check(service)
        config, base = self._upstream(coordinator, service)
        http = self.http
        if http is None:
            raise self.state.unavailable()
        query = request.scope.get("query_string", b"")
        target = path + ("?" + query.decode("latin-1") if query else "")
        if config.ignores(path):
            return await self._pass_through(request, coordinator, service, base, target, body)
        client = f"proxy:{caller.key}:{self._request_id()}"
        inflight = self.meters.inflight(service)
        inflight.inc()
        released = False

        async def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            inflight.dec()
            # On the loop when the engine's lock is free (the common case), else in a
            # worker thread, which may wait for it.
            with suppress(GpusmError):
                if not coordinator.try_end_client(client, True):
                    await anyio.to_thread.run_sync(partial(coordinator.end_client, client, True))

        try:
            # The client can be watched for hanging up only once nothing of its body is
            # left unread (the watcher reads what the connection sends next).
            watch = isinstance(body, bytes) or not _has_body(request)
            # A healthy service is held at once, on the loop (no thread, no wait).
            result = coordinator.try_hold(service, client, caller.priority)
            if result is None:
                result = await self._ensure_watching(
                    request, coordinator, service, client, caller, watch
                )
            if result is None:
                self.meters.requests(service, str(CLIENT_GONE)).inc()
                with anyio.CancelScope(shield=True):
                    await release()
                return Response(status_code=CLIENT_GONE)
            self.meters.wait(service).observe(result.waited_s)
            if result.started or result.stopped:
                route = f"{request.method} {request.url.path}"
                await anyio.to_thread.run_sync(
                    coordinator.note_proxied, _audit(route, model, client, service, result)
                )
            upstream = await open_upstream(http, request, base, target, service, body)
            whole = await read_small(upstream, service)
        except BaseException as exc:
            code = str(exc.status) if isinstance(exc, HttpProblem) else "error"
            self.meters.requests(service, code).inc()
            with anyio.CancelScope(shield=True):
                await release()
            raise
        self.meters.requests(service, str(upstream.status_code)).inc()
        if whole is not None:
            return Buffered(upstream, whole, release)
        return Relay(upstream, service, release)

    async def forward_websocket(
        self, websocket: WebSocket, caller: Caller, service: str, path: str
    ) -> None:
        """Like :meth:`forward`, for a WebSocket: its lease lasts as long as the
        connection (an ignored path takes none, and needs the service healthy). A
        refusal closes the handshake: 1008 for a key that may not use the service,
        1013 (try again later) when the service could not be made ready."""
        coordinator = _coordinator(self.state)
        try:
            caller.check(service)
            config, base = self._upstream(coordinator, service)
        except HttpProblem as problem:
            # Not this key's (1008), or a service with no upstream (1011).
            await websocket.close(1011 if problem.slug == "config-error" else 1008)
            return
        except GpusmError:
            await websocket.close(1008)  # no such service
            return
        url = websocket_url(base, path)
        if config.ignores(path.partition("?")[0]):
            if coordinator.service_state(service) is State.HEALTHY:
                await relay_websocket(websocket, url, service)
            else:
                await websocket.close(TRY_AGAIN_LATER)
            return
        client = f"proxy:{caller.key}:{self._request_id()}"
        try:
            await self._ensure(coordinator, service, client, caller, threading.Event())
            await relay_websocket(websocket, url, service)
        except (HttpProblem, GpusmError) as exc:
            _log.info("WebSocket for %s refused: %s", service, exc)
            await websocket.close(TRY_AGAIN_LATER)
        finally:
            with anyio.CancelScope(shield=True), suppress(GpusmError):
                await anyio.to_thread.run_sync(partial(coordinator.end_client, client, True))

    def _upstream(self, coordinator: Coordinator, service: str) -> tuple[ServiceConfig, str]:
        """The service's config and its upstream's base URL (worked out once per config)."""
        config = coordinator.config.service(service)
        known = self._bases.get(service)
        if known is not None and known[0] is config:
            return config, known[1]
        base = config.upstream_url()
        if base is None:
            raise HttpProblem(
                "config-error",
                f"service {service!r} has no upstream to proxy to: set "
                f"services.{service}.upstream, or give it an HTTP health check",
            )
        self._bases[service] = (config, base)
        return config, base

    async def _pass_through(
        self,
        request: Request,
        coordinator: Coordinator,
        service: str,
        base: str,
        target: str,
        body: Body,
    ) -> Response:
        """A request on an ignored path: relayed only while the service is healthy."""
        state = coordinator.service_state(service)
        if state is not State.HEALTHY:
            self.meters.requests(service, "503").inc()
            raise HttpProblem(
                "service-unavailable",
                f"service {service!r} is {state.value}, and {request.url.path} is one of its "
                "ignore_paths, which never start it",
                {"Retry-After": _retry_after(coordinator, service)},
                service=service,
            )
        assert self.http is not None
        upstream = await open_upstream(self.http, request, base, target, service, body)
        self.meters.requests(service, str(upstream.status_code)).inc()
        return Relay(upstream, service, nothing)

    async def _ensure_watching(
        self,
        request: Request,
        coordinator: Coordinator,
        service: str,
        client: str,
        caller: Caller,
        watch: bool,
    ) -> PhaseResult | None:
        """:meth:`_ensure`, while watching the client: None when it hung up first (its
        wait is cancelled, and a start that nobody else waits for is drained)."""
        cancelled = threading.Event()
        if not watch:
            return await self._ensure(coordinator, service, client, caller, cancelled)

        async def hang_up() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass  # the (empty or already read) body's last message
            coordinator.cancel(cancelled)  # never blocks: no worker thread needed

        result: PhaseResult | None = None
        refused: Exception | None = None
        async with anyio.create_task_group() as watchers:
            watchers.start_soon(hang_up)
            try:
                result = await self._ensure(coordinator, service, client, caller, cancelled)
            except RequestCancelled:
                result = None
            except Exception as exc:
                refused = exc  # raised as itself, not in the task group's ExceptionGroup
            finally:
                watchers.cancel_scope.cancel()
        if refused is not None:
            raise refused
        return result

    async def _ensure(
        self,
        coordinator: Coordinator,
        service: str,
        client: str,
        caller: Caller,
        cancelled: threading.Event,
    ) -> PhaseResult:
        """Until ``service`` is healthy under ``client``'s lease; 503 after ``proxy.wait_s``.

        A lease revoked while it waited (a higher-priority request took the GPU) waits
        again, in the time that is left: to the client it is one queue.
        """
        wait_s = coordinator.config.proxy.wait_s
        deadline = time.monotonic() + wait_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise self._refusal(coordinator, service, wait_s, "its lease was revoked")

            def ensure() -> PhaseResult:
                # The time left is taken when a thread is free: waiting for one counts.
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RequestTimeout(f"no worker thread was free within {wait_s:g} s")
                return coordinator.ensure_service(
                    service,
                    client,
                    left,
                    None,
                    quiet=True,
                    priority=caller.priority,
                    cancelled=cancelled,
                )

            try:
                result = await anyio.to_thread.run_sync(ensure, limiter=self._waiters())
            except RequestCancelled:
                raise
            except (InsufficientVram, RequestTimeout) as exc:
                raise self._refusal(coordinator, service, wait_s, str(exc), exc) from exc
            if result.lease_revoked is None:
                return result
            _log.info("proxy lease %s revoked while waiting: %s", client, result.lease_revoked)

    @staticmethod
    def _refusal(
        coordinator: Coordinator,
        service: str,
        wait_s: float,
        why: str,
        exc: GpusmError | None = None,
    ) -> HttpProblem:
        extra: dict[str, Any] = {"service": service, "wait_s": wait_s}
        if isinstance(exc, InsufficientVram):
            extra |= {
                "need_mib": exc.need_mib,
                "free_mib": exc.free_mib,
                "foreign_mib": exc.foreign_mib,
                "blocked_by": list(exc.blocked_by),
            }
        return HttpProblem(
            "service-unavailable",
            f"service {service!r} could not be made ready within proxy.wait_s ({wait_s:g} s): "
            f"{why}",
            {"Retry-After": _retry_after(coordinator, service)},
            **extra,
        )


async def _read_bounded(request: Request) -> bytes:
    """The whole body, refused (413) beyond :data:`MODEL_BODY_LIMIT`."""
    too_large = HttpProblem(
        "content-too-large",
        f"the body is read to find its model, and may be at most {MODEL_BODY_LIMIT} bytes; "
        "send ?model= to have a larger body streamed unread",
        limit_bytes=MODEL_BODY_LIMIT,
    )
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > MODEL_BODY_LIMIT:
        raise too_large
    parts: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MODEL_BODY_LIMIT:
            raise too_large
        parts.append(chunk)
    return b"".join(parts)


def _has_body(request: Request) -> bool:
    length = request.headers.get("content-length")
    return "transfer-encoding" in request.headers or (length is not None and length != "0")


async def route_by_model(config: Config, request: Request) -> tuple[str, Body, str]:
    """The service the request's model maps to, the body as far as it was read for that
    (bytes, or what was read followed by the rest still streaming), and the model."""
    models = config.models
    body: Body = None
    model: str | None = None
    content_type = request.headers.get("content-type")
    boundary = multipart_boundary(content_type)
    if _has_body(request) and boundary is not None:
        model, body = await _peek_multipart(request, boundary)
    elif _has_body(request) and names_model_in_body(content_type):
        body = await _read_bounded(request)
        model = model_in_body(body) or model_in_form(body)
    model = model or request.query_params.get("model")
    if not model:
        raise HttpProblem(
            "invalid-request",
            'the request names no model: send it as "model" in a JSON body, as ?model=, '
            "or as a form field model (in a multipart upload, before the file)",
            known=list(models),
        )
    service = route_model(models, model)
    if service is None:
        raise UnknownName("model", model, list(models))
    return service, body, model


async def _peek_multipart(request: Request, boundary: bytes) -> tuple[str | None, Body]:
    """Read a multipart body only until its ``model`` field is known (at most
    :data:`MODEL_BODY_LIMIT` bytes); the upload after it streams through unread."""
    chunks = request.stream().__aiter__()
    head = b""
    model: str | None = None
    delimiter = b"--" + boundary
    async for chunk in chunks:
        # Parsed again only when a part may have ended (a delimiter arrived), so a body
        # sent in tiny pieces costs no more than one sent at once.
        seen = len(head)
        head += chunk
        if delimiter not in head[max(0, seen - len(delimiter)) :]:
            if len(head) > MODEL_BODY_LIMIT:
                break
            continue
        model, decided = model_in_multipart(head, boundary)
        if decided or len(head) > MODEL_BODY_LIMIT:
            break

    async def whole() -> AsyncIterator[bytes]:
        yield head
        async for rest in chunks:
            yield rest

    return model, whole()


def _audit(
    route: str, model: str | None, client: str, service: str, result: PhaseResult
) -> dict[str, object]:
    """What the audit keeps of a proxied request that changed what runs."""
    return {
        "route": route,
        "model": model,
        "client": client,
        "service": service,
        "waited_s": result.waited_s,
        "started": list(result.started),
        "stopped": [
            {"service": s.service, "kind": s.kind, "action": s.action} for s in result.stopped
        ],
    }


def rest_of_path(scope: Mapping[str, Any], skip: int) -> str:
    """The request's raw path (the bytes the client sent, query included) less its
    first ``skip`` segments: what the upstream gets."""
    raw = scope.get("raw_path") or str(scope["path"]).encode()
    path = raw.decode("latin-1")
    query = scope.get("query_string") or b""
    if "?" not in path and query:
        path += "?" + query.decode("latin-1")
    rest = path.split("/", skip + 1)
    return "/" + (rest[skip + 1] if len(rest) > skip + 1 else "")
