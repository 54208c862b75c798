"""Checks of figure 10's scenario and its replay of ``Admission.plan`` (not timings)."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import placement as fig
from benchmarks.common import Ctx, ProcessGuard
from gpusm.domain import policy


def _per_device(sc: fig.Scenario) -> dict[int, policy.Plan]:
    return {
        d: policy.plan_admission(
            [sc.service], sc.views[d], sc.leases, sc.gpus[d], sc.priority, pipeline=True
        )
        for d in range(fig.DEVICES)
    }


def test_scenario_is_8_devices_of_4_services_with_every_kind_of_outcome() -> None:
    sc = fig.scenario()
    assert sorted(sc.views) == list(range(fig.DEVICES))
    for on in sc.views.values():
        assert len(on) == 5  # its 4 services and the one to place
        assert sc.service in on
    assert len(sc.every) == 4 * fig.DEVICES + 1
    plans = _per_device(sc)
    as_is = [d for d, p in plans.items() if p.fits and not p.victims]
    evicting = [d for d, p in plans.items() if p.fits and p.victims]
    refused = [d for d, p in plans.items() if not p.fits]
    assert as_is
    assert evicting
    assert refused
    actions = {(v.kind, v.action) for p in plans.values() for v in p.victims}
    assert {("evict", "stop"), ("evict", "park"), ("preempt", "stop")} <= actions


def test_place_chooses_binpack_and_replans_the_chosen_device() -> None:
    sc = fig.scenario()
    plans = _per_device(sc)
    decision = fig.place(sc)
    (chosen,) = decision.devices[sc.service]
    fitting_as_is = [d for d, p in plans.items() if p.fits and not p.victims]
    left = {d: plans[d].free_after_mib - plans[d].need_mib for d in fitting_as_is}
    assert chosen == min(fitting_as_is, key=lambda d: (left[d], d))
    assert decision.fits
    assert decision.reason == plans[chosen].reason
    assert len(decision.placement) == fig.DEVICES


def test_pinned_plan_stops_one_and_parks_one() -> None:
    sc = fig.scenario()
    plan = fig.pinned(sc)
    assert plan.fits
    assert plan.devices == {sc.service: (fig.PINNED_DEVICE,)}
    assert sorted(v.action for v in plan.victims) == ["park", "stop"]


def test_run_reports_one_row_against_the_goal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fig, "_blocks", lambda ctx: (1, 5))
    ctx = Ctx(quick=True, work=tmp_path, guard=ProcessGuard(), log=lambda _: None)
    (row,) = fig.run(ctx)
    assert row.figure.startswith("10. Placement decision, 8 devices x 32 services")
    assert row.details["samples"] == 5
    assert row.details["plan_admission_calls"] == 9
    assert row.ratio is not None
    assert row.ratio > 0
    assert row.met == (row.details["placement"]["median_s"] <= fig.GOAL_MEDIAN_S)
