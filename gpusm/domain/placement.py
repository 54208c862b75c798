"""Which device(s) a service that may use several goes to: binpack or spread.

The caller plans the request once per candidate device (with :func:`plan_admission`,
the services already placed on that device included) and hands the plans here;
:func:`choose` picks the device(s) by the strategy and says why the others were not
chosen. Pure: no GPU, no clock.

Among the devices whose plan fits, the order is:

1. fewest services stopped (evicted or preempted), then fewest parked — the cheapest
   room first, on both strategies;
2. ``binpack``: least room left after the start (fill a device, so big services keep
   room elsewhere); ``spread``: most room left (even out the load);
3. the lower index.

A service spanning ``count`` devices takes the first ``count`` of that order, all or
nothing: with fewer fitting devices it is not placed at all.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from gpusm.domain.policy import Plan

__all__ = ["Choice", "Strategy", "choose"]

Strategy = Literal["binpack", "spread"]


@dataclass(frozen=True)
class Choice:
    """The chosen devices (empty: none fits) and one line per device saying why."""

    devices: tuple[int, ...]
    notes: tuple[str, ...]


def choose(
    service: str, count: int, plans: Mapping[int, Plan], strategy: Strategy = "binpack"
) -> Choice:
    """The ``count`` device(s) for ``service`` among ``plans`` (device -> its plan)."""
    fitting = [d for d, plan in plans.items() if plan.fits]
    ranked = sorted(fitting, key=lambda d: _rank(plans[d], d, strategy))
    chosen = tuple(sorted(ranked[:count])) if len(ranked) >= count else ()
    notes = []
    for device in sorted(plans):
        plan = plans[device]
        if device in chosen:
            why = f"chosen ({strategy}): {_cost(plan)}, {_left(plan)} MiB left"
        elif plan.fits:
            why = f"not chosen: {_cost(plan)}, {_left(plan)} MiB left"
        else:
            why = f"does not fit: {plan.reason}"
        notes.append(f"{service} on device {device}: {why}")
    if not chosen and fitting:
        notes.append(
            f"{service} needs {count} devices at once and only {len(fitting)} fit: "
            "placed on none (all or nothing)"
        )
    return Choice(chosen, tuple(notes))


def _rank(plan: Plan, device: int, strategy: Strategy) -> tuple[int, int, int, int]:
    stops = sum(1 for v in plan.victims if v.action == "stop")
    parks = len(plan.victims) - stops
    left = _left(plan)
    return stops, parks, left if strategy == "binpack" else -left, device


def _left(plan: Plan) -> int:
    return plan.free_after_mib - plan.need_mib


def _cost(plan: Plan) -> str:
    if not plan.victims:
        return "fits without stopping anything"
    verbs = {"park": "parking", "preempt": "preempting", "evict": "stopping"}
    parts = [f"{verbs['park' if v.action == 'park' else v.kind]} {v.name}" for v in plan.victims]
    return "fits after " + ", ".join(parts)
