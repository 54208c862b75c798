"""How a webhook delivery is signed, and how a receiver checks it.

Every POST carries ``X-Gpusm-Timestamp: <unix seconds>`` and ``X-Gpusm-Signature:
sha256=<hex>``, where ``<hex>`` is HMAC-SHA256 keyed with the webhook's secret over the
bytes ``<timestamp>.<body>`` (the timestamp's decimal digits, a full stop, then the raw
body exactly as received). A receiver recomputes it, compares in constant time, and
refuses a timestamp too far from its own clock (a replay).
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Final

__all__ = ["SIGNATURE_HEADER", "TIMESTAMP_HEADER", "sign", "verify"]

TIMESTAMP_HEADER: Final = "X-Gpusm-Timestamp"
SIGNATURE_HEADER: Final = "X-Gpusm-Signature"
_SCHEME: Final = "sha256="


def sign(secret: bytes, timestamp: int, body: bytes) -> str:
    """The ``X-Gpusm-Signature`` value for ``body`` sent at ``timestamp`` (unix seconds)."""
    digest = hmac.new(secret, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return _SCHEME + digest


def verify(
    secret: bytes,
    body: bytes,
    timestamp: str | None,
    signature: str | None,
    *,
    now: float,
    tolerance_s: float = 300.0,
) -> bool:
    """Whether ``signature`` signs ``body`` at ``timestamp``, within ``tolerance_s`` of ``now``."""
    if timestamp is None or signature is None or not timestamp.isdigit():
        return False
    if abs(now - int(timestamp)) > tolerance_s:
        return False
    return hmac.compare_digest(sign(secret, int(timestamp), body), signature)
