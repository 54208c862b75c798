"""Health checks: the real checker (HTTP, TCP, exec) and its in-memory fake.

``Health`` lives in :mod:`gpusm.health.checks`; ``MemoryHealth``, the fake that tests
drive with verdicts and a manual clock, in :mod:`gpusm.health.memory`. Both share one
wait loop and the poll schedule :func:`next_interval`.
"""

from gpusm.health.checks import (
    ADAPTIVE_FACTOR,
    MAX_INTERVAL_S,
    MIN_INTERVAL_S,
    Health,
    next_interval,
)
from gpusm.health.control import HttpControl, MemoryControl
from gpusm.health.memory import MemoryHealth

__all__ = [
    "ADAPTIVE_FACTOR",
    "MAX_INTERVAL_S",
    "MIN_INTERVAL_S",
    "Health",
    "HttpControl",
    "MemoryControl",
    "MemoryHealth",
    "next_interval",
]
