"""One webhook's HTTP POSTs (httpx); every outcome is a :class:`PostResult`, never an exception."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

import httpx

__all__ = ["HttpSender", "PostResult"]

# How much of a refusing receiver's answer the status shows.
_EXCERPT = 200


@dataclass(frozen=True)
class PostResult:
    """How one POST went: ``ok`` for a 2xx answer, else ``error`` says why."""

    ok: bool
    status: int | None = None
    error: str | None = None
    elapsed_s: float = 0.0


class HttpSender:
    """POSTs to one receiver over a kept-alive connection; redirects are not followed
    (a receiver that moved is a failure naming its new address)."""

    def __init__(self, timeout_s: float) -> None:
        self._client = httpx.Client(timeout=timeout_s, follow_redirects=False)

    def post(self, url: str, body: bytes, headers: Mapping[str, str]) -> PostResult:
        """Send ``body``; a 2xx answer is success, anything else a failure with a reason."""
        began = time.monotonic()
        try:
            response = self._client.post(url, content=body, headers=dict(headers))
        except httpx.TimeoutException as exc:
            return PostResult(
                False, error=f"timed out ({type(exc).__name__})", elapsed_s=_since(began)
            )
        except httpx.HTTPError as exc:
            reason = str(exc) or type(exc).__name__
            return PostResult(
                False, error=f"cannot reach the receiver: {reason}", elapsed_s=_since(began)
            )
        except RuntimeError as exc:  # the client was closed under a POST (shutdown)
            return PostResult(False, error=f"not sent: {exc}", elapsed_s=_since(began))
        status = response.status_code
        if 200 <= status < 300:
            return PostResult(True, status, elapsed_s=_since(began))
        if 300 <= status < 400:
            where = response.headers.get("location", "?")
            why = f"HTTP {status}: redirects are not followed (to {where}); configure that URL"
        else:
            excerpt = " ".join(response.text[:_EXCERPT].split())
            why = f"HTTP {status}" + (f": {excerpt}" if excerpt else "")
        return PostResult(False, status, error=why, elapsed_s=_since(began))

    def close(self) -> None:
        """Close the connection pool; idempotent."""
        self._client.close()


def _since(began: float) -> float:
    return time.monotonic() - began
