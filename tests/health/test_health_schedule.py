"""The health poll schedule, as a pure function."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gpusm.health import MAX_INTERVAL_S, MIN_INTERVAL_S, next_interval


def test_configured_interval_wins() -> None:
    assert next_interval(0.0, 3.0) == 3.0
    assert next_interval(500.0, 0.05) == 0.05


def test_adaptive_interval_starts_fast_and_grows_with_time_since_start() -> None:
    assert next_interval(0.0, None) == MIN_INTERVAL_S
    assert next_interval(-5.0, None) == MIN_INTERVAL_S  # clock skew is not a reason to spin
    assert next_interval(10.0, None) == pytest.approx(0.1)
    assert next_interval(20.0, None) > next_interval(10.0, None)


def test_adaptive_interval_never_exceeds_one_second() -> None:
    assert next_interval(100.0, None) == MAX_INTERVAL_S == 1.0
    assert next_interval(3600.0, None) == 1.0


@given(load_s=st.floats(min_value=0.0, max_value=86_400.0))
def test_median_detection_latency_meets_the_goal(load_s: float) -> None:
    # Readiness at load_s lands, on average, half an interval before the next probe.
    median_latency = next_interval(load_s, None) / 2
    assert median_latency <= max(0.025, 0.02 * load_s)


@given(a=st.floats(0.0, 1e6), b=st.floats(0.0, 1e6))
def test_adaptive_interval_is_monotonic_and_bounded(a: float, b: float) -> None:
    lo, hi = sorted((a, b))
    assert MIN_INTERVAL_S <= next_interval(lo, None) <= next_interval(hi, None) <= MAX_INTERVAL_S
