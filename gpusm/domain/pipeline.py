"""Pipeline hints for the eviction policy: when is a service needed next, what does it cost.

With a ``pipeline:`` the coordinator knows the future: the phases come round in a fixed
cycle. ``policy.plan_admission(..., pipeline=True)`` uses that to choose idle victims by
Belady's rule: the service whose next use is farthest away goes first (one that the
pipeline never needs goes before any), then the one that is cheaper to start again.
With services of equal size and one service per phase this gives the fewest cold starts
that any eviction order can give.

This module holds the pure arithmetic behind it, in plain values: the sort key, the
limits of a prefetch, the words of a victim's reason, and the helpers the engine uses to
fill ``ServiceView.next_use`` and ``ServiceView.load_cost_s``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

__all__ = [
    "PrefetchLimits",
    "belady_key",
    "describe_next_use",
    "next_uses",
    "prefetch_protection",
    "typical_load_s",
]


def _check_cost(owner: str, value: float) -> None:
    # `not >=` also refuses NaN, which would make every comparison false.
    if not value >= 0:
        raise ValueError(f"{owner} must be >= 0, got {value}")


@dataclass(frozen=True)
class PrefetchLimits:
    """What a prefetch may evict (see ``policy.plan_admission(prefetch=...)``).

    ``distance``: how many phases after the requester's phase the prefetched phase comes
    (1 = the very next phase). ``saving_s``: the load time the prefetch would hide. A
    prefetch never evicts a service needed at or before the phase it prefetches
    (``next_use <= distance``), nor one that costs more to start again than the prefetch
    saves (``load_cost_s > saving_s``).
    """

    distance: int
    saving_s: float

    def __post_init__(self) -> None:
        if self.distance < 1:
            raise ValueError(f"prefetch distance must be >= 1, got {self.distance}")
        _check_cost("prefetch saving_s", self.saving_s)


def belady_key(next_use: int | None, load_cost_s: float) -> tuple[int, int, float]:
    """Sort key of an idle victim under pipeline information: smaller goes first.

    Never needed (None) before any number, then the farthest next use, then the lower
    load cost.
    """
    if next_use is None:
        return (0, 0, load_cost_s)
    return (1, -next_use, load_cost_s)


def prefetch_protection(
    next_use: int | None, load_cost_s: float, limits: PrefetchLimits
) -> str | None:
    """Why a prefetch may not evict this service, or None when it may."""
    if next_use is not None and next_use <= limits.distance:
        return f"{describe_next_use(next_use)} <= prefetch distance {limits.distance}"
    if load_cost_s > limits.saving_s:
        return f"load ~{load_cost_s:.1f} s > prefetch saving ~{limits.saving_s:.1f} s"
    return None


def describe_next_use(next_use: int | None) -> str:
    """``never needed in the pipeline``, ``next needed in 1 phase``, ``… in 3 phases``."""
    if next_use is None:
        return "never needed in the pipeline"
    return f"next needed in {next_use} phase{'' if next_use == 1 else 's'}"


def next_uses(
    pipeline: Sequence[str], phase_services: Mapping[str, Sequence[str]], phase: str
) -> dict[str, int]:
    """Service -> how many phases after ``phase`` the cyclic pipeline next needs it.

    1 is the very next phase; a service needed only by ``phase`` itself gets
    ``len(pipeline)`` (the next round). Services no phase of the pipeline needs are left
    out (their ``next_use`` is None), and so is everything when ``phase`` is not in the
    pipeline (the future is unknown).
    """
    if phase not in pipeline:
        return {}
    start = pipeline.index(phase)
    found: dict[str, int] = {}
    for step in range(1, len(pipeline) + 1):
        for name in phase_services.get(pipeline[(start + step) % len(pipeline)], ()):
            found.setdefault(name, step)
    return found


def typical_load_s(samples: Iterable[float], hint: float | None = None) -> float:
    """What starting a service typically costs: the median of its learned load times
    (time to healthy), else the declared ``hint``, else 0."""
    ordered = sorted(samples)
    if not ordered:
        return 0.0 if hint is None else hint
    middle = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[middle]
    return (ordered[middle - 1] + ordered[middle]) / 2
