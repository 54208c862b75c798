"""Choosing devices: binpack and spread over per-device plans, as a table."""

from __future__ import annotations

import pytest

from gpusm.domain.placement import choose
from gpusm.domain.policy import Plan, Victim


def plan(fits: bool, free_after: int, need: int = 1000, *victims: tuple[str, str]) -> Plan:
    return Plan(
        fits=fits,
        need_mib=need,
        free_before_mib=free_after,
        free_after_mib=free_after,
        to_start=("s",),
        already_running=(),
        victims=tuple(Victim(n, "evict", 1, "r", action) for n, action in victims),  # type: ignore[arg-type]
        blocked_by=(),
        reason="fits" if fits else "cannot fit: need 1000 MiB, 10 MiB free",
    )


@pytest.mark.parametrize(
    ("plans", "strategy", "count", "chosen"),
    [
        # binpack: the fullest device that fits without stopping anything
        ({0: plan(True, 5000), 1: plan(True, 9000)}, "binpack", 1, (0,)),
        # spread: the emptiest
        ({0: plan(True, 5000), 1: plan(True, 9000)}, "spread", 1, (1,)),
        # a device where nothing stops beats a fuller one that needs a stop, either way
        ({0: plan(True, 2000, 1000, ("x", "stop")), 1: plan(True, 9000)}, "binpack", 1, (1,)),
        ({0: plan(True, 9000, 1000, ("x", "stop")), 1: plan(True, 2000)}, "spread", 1, (1,)),
        # a park is cheaper than a stop
        (
            {0: plan(True, 2000, 1000, ("x", "stop")), 1: plan(True, 2000, 1000, ("y", "park"))},
            "binpack",
            1,
            (1,),
        ),
        # devices that do not fit are never chosen
        ({0: plan(False, 0), 1: plan(True, 9000), 2: plan(True, 1500)}, "binpack", 1, (2,)),
        # ties go to the lower index
        ({3: plan(True, 4000), 1: plan(True, 4000)}, "binpack", 1, (1,)),
        # spanning: the best `count` devices, reported in index order
        ({0: plan(True, 9000), 1: plan(True, 2000), 2: plan(True, 5000)}, "binpack", 2, (1, 2)),
        ({0: plan(True, 9000), 1: plan(True, 2000), 2: plan(True, 5000)}, "spread", 2, (0, 2)),
        # all or nothing
        ({0: plan(True, 9000), 1: plan(False, 0)}, "binpack", 2, ()),
        ({0: plan(False, 0)}, "binpack", 1, ()),
    ],
)
def test_choose(plans: dict[int, Plan], strategy: str, count: int, chosen: tuple[int, ...]) -> None:
    assert choose("s", count, plans, strategy).devices == chosen  # type: ignore[arg-type]


def test_the_notes_say_why_each_device_was_or_was_not_chosen() -> None:
    notes = choose(
        "vidi",
        1,
        {0: plan(True, 5000), 1: plan(True, 2000, 1000, ("tts", "park")), 2: plan(False, 0)},
    ).notes
    assert notes == (
        "vidi on device 0: chosen (binpack): fits without stopping anything, 4000 MiB left",
        "vidi on device 1: not chosen: fits after parking tts, 1000 MiB left",
        "vidi on device 2: does not fit: cannot fit: need 1000 MiB, 10 MiB free",
    )


def test_a_spanning_service_that_finds_too_few_devices_says_so() -> None:
    notes = choose("tp", 3, {0: plan(True, 9000), 1: plan(True, 9000), 2: plan(False, 0)}).notes
    assert notes[-1] == "tp needs 3 devices at once and only 2 fit: placed on none (all or nothing)"
