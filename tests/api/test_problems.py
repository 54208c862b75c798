"""Problem details: every gpusm error maps to a status and back to the same error class."""

from __future__ import annotations

import json

import pytest

from gpusm.api.problems import HttpProblem, error_from_problem, problem_for_error, problem_type
from gpusm.errors import (
    ConcurrencyConflict,
    ConfigError,
    CoordinatorBusy,
    GpuProbeError,
    GpusmError,
    IllegalTransition,
    InsufficientVram,
    RequestTimeout,
    ServiceStartFailed,
    ServiceStopFailed,
    SimOutOfMemory,
    StoreError,
    UnknownName,
    VramNotReclaimed,
)

ROUND_TRIPS = [
    (UnknownName("phase", "x", ["a", "b"]), 404),
    (InsufficientVram(18432, 4096, 512, ["comfyui"]), 409),
    (IllegalTransition("tts", "drain", "stopped"), 409),
    (ConcurrencyConflict("tts", 7), 409),
    (RequestTimeout("tts not healthy in time"), 504),
    (VramNotReclaimed("tts", 5.0, {1234: 4096}, 100), 504),
    (ServiceStartFailed("tts", "exited with code 3"), 502),
    (ServiceStopFailed("tts", "survived SIGKILL"), 502),
    (GpuProbeError("NVML lost the GPU"), 503),
    (StoreError("disk full"), 500),
    (CoordinatorBusy("owned by pid 1"), 503),
    (GpusmError("the coordinator is closed"), 409),
]


@pytest.mark.parametrize(("error", "status"), ROUND_TRIPS, ids=lambda e: type(e).__name__)
def test_error_survives_the_round_trip_through_a_problem_document(
    error: GpusmError, status: int
) -> None:
    code, body = problem_for_error(error)
    assert code == status
    assert body["status"] == status
    assert body["detail"] == str(error)
    assert body["type"].startswith("urn:gpusm:")
    # What travels is JSON.
    back = error_from_problem(code, json.loads(json.dumps(body)))
    assert type(back) is type(error)
    assert str(back) == str(error)
    assert vars(back) == vars(error)


def test_non_request_errors_have_honest_status_codes() -> None:
    assert problem_for_error(ConfigError("f", "k", "bad", "fix"))[0] == 500
    assert problem_for_error(SimOutOfMemory(1, 10, 5))[0] == 503


def test_foreign_or_partial_problems_become_plain_gpusm_errors() -> None:
    generic = error_from_problem(418, {"type": "about:blank", "title": "I'm a teapot"})
    assert type(generic) is GpusmError
    assert "418" in str(generic)
    assert "teapot" in str(generic)
    odd = error_from_problem(
        409,
        {
            "type": problem_type("insufficient-vram"),
            "need_mib": "lots",
            "blocked_by": "x",
            "status": 409,
        },
    )
    assert isinstance(odd, InsufficientVram)
    assert odd.need_mib == 0
    assert odd.blocked_by == []
    holders = error_from_problem(504, {"type": problem_type("vram-not-reclaimed"), "holders": 3})
    assert isinstance(holders, VramNotReclaimed)
    assert holders.holders == {}


def test_http_problem_carries_headers_and_extra_fields() -> None:
    problem = HttpProblem(503, "recovering", "wait", {"Retry-After": "1"}, eta_s=2)
    assert problem.headers == {"Retry-After": "1"}
    assert problem.body() == {
        "type": "urn:gpusm:recovering",
        "title": "Recovering",
        "status": 503,
        "detail": "wait",
        "eta_s": 2,
    }
