"""Sending a service its park and wake requests over HTTP.

:class:`HttpControl` is the real :class:`~gpusm.ports.ServiceControl`; :class:`MemoryControl`
is its in-memory fake, which answers from a function a test gives it. Neither raises:
every failure is a :class:`~gpusm.ports.CallResult` whose ``reason`` a person can read.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import httpx

from gpusm.park_config import HttpCall
from gpusm.ports import CallResult

__all__ = ["HttpControl", "MemoryControl"]

# How much of an unexpected answer's body goes into the reason.
_BODY_TAIL = 200


class HttpControl:
    """Implements :class:`gpusm.ports.ServiceControl` with one pooled HTTP client."""

    def __init__(self) -> None:
        # Park and wake requests go to model servers on loopback: no proxy applies.
        self._client = httpx.Client(trust_env=False)
        self._lock = threading.Lock()
        self._closed = False

    def call(self, request: HttpCall) -> CallResult:
        """Send ``request``; ok when it answers ``expect_status`` within its timeout."""
        began = time.monotonic()
        kwargs = {} if request.body is None else {"json": request.body}
        try:
            answer = self._client.request(
                request.method, request.url, timeout=request.timeout_s, **kwargs
            )
        except httpx.TimeoutException:
            return _failed(f"timed out after {request.timeout_s:g}s: {request.describe()}", began)
        except httpx.HTTPError as exc:
            return _failed(f"{_error_text(exc)}: {request.describe()}", began)
        elapsed = time.monotonic() - began
        if answer.status_code != request.expect_status:
            body = answer.text.strip()[:_BODY_TAIL]
            reason = (
                f"status {answer.status_code}, expected {request.expect_status}: "
                f"{request.describe()}" + (f" answered {body}" if body else "")
            )
            return CallResult(False, answer.status_code, reason, elapsed)
        return CallResult(True, answer.status_code, "", elapsed)

    def close(self) -> None:
        """Close the client; idempotent."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._client.close()


class MemoryControl:
    """A fake :class:`gpusm.ports.ServiceControl`: ``answer(request)`` decides each call.

    Without ``answer`` every call succeeds with status 200. ``calls`` lists the requests
    sent, oldest first.
    """

    def __init__(self, answer: Callable[[HttpCall], CallResult] | None = None) -> None:
        self.answer = answer
        self.calls: list[HttpCall] = []
        self._lock = threading.Lock()

    def call(self, request: HttpCall) -> CallResult:
        """Record ``request`` and answer it."""
        with self._lock:
            self.calls.append(request)
        if self.answer is None:
            return CallResult(True, 200)
        return self.answer(request)

    def close(self) -> None:
        """Nothing to release; idempotent."""


def _failed(reason: str, began: float) -> CallResult:
    return CallResult(False, None, reason, time.monotonic() - began)


def _error_text(exc: httpx.HTTPError) -> str:
    if isinstance(exc, httpx.ConnectError):
        return "connection refused"
    return f"{type(exc).__name__}: {exc}"
