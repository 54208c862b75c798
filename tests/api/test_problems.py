"""Problem details: every gpusm error maps to a status and back to the same error class.

The table is :data:`gpusm.wire.PROBLEMS`; the API encodes with it and the client decodes.
"""

from __future__ import annotations

import json

import pytest

from gpusm.api.problems import HttpProblem
from gpusm.errors import (
    ConcurrencyConflict,
    ConfigError,
    CoordinatorBusy,
    GpuProbeError,
    GpusmError,
    IllegalTransition,
    InsufficientVram,
    ReloadRefused,
    RequestTimeout,
    ServiceRuntimeError,
    ServiceStartFailed,
    ServiceStopFailed,
    SimOutOfMemory,
    StoreError,
    UnknownName,
    VramNotReclaimed,
)
from gpusm.wire import (
    PROBLEM_MEDIA_TYPE,
    PROBLEMS,
    error_from_problem,
    problem_for_error,
    problem_type,
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
    (ReloadRefused("the new config changes api.listen: that needs a restart"), 422),
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


# One instance of every error class the table names (the client raises exactly these).
SAMPLES: dict[type[GpusmError], GpusmError] = {type(e): e for e, _ in ROUND_TRIPS}


def test_every_error_class_of_the_table_round_trips() -> None:
    classes = {row.error for row in PROBLEMS.values() if row.error is not None}
    assert classes == set(SAMPLES)
    for slug, row in PROBLEMS.items():
        assert row.uri == problem_type(slug)
        if row.error is None:
            continue
        error = SAMPLES[row.error]
        status, body = problem_for_error(error)
        assert (status, body["type"], body["status"]) == (row.status, row.uri, row.status)
        assert body["title"] == row.title
        back = error_from_problem(status, json.loads(json.dumps(body)))
        assert type(back) is row.error, slug
        assert str(back) == str(error)


def test_problem_documents_keep_their_documented_form() -> None:
    _, body = problem_for_error(InsufficientVram(18432, 4096, 512, ["comfyui"]))
    assert json.dumps(body) == (
        '{"type": "urn:gpusm:insufficient-vram", "title": "Insufficient VRAM", "status": 409, '
        '"detail": "need 18432 MiB, 4096 MiB free for admission, 512 MiB held by processes '
        'gpusm does not own; blocked by: comfyui", "need_mib": 18432, "free_mib": 4096, '
        '"foreign_mib": 512, "blocked_by": ["comfyui"]}'
    )
    _, unknown = problem_for_error(UnknownName("phase", "x", ["a"]))
    assert (unknown["status"], unknown["known"], unknown["kind"]) == (404, ["a"], "phase")
    assert PROBLEM_MEDIA_TYPE == "application/problem+json"


def test_errors_without_a_type_of_their_own_use_their_parents() -> None:
    assert problem_for_error(ConfigError("f", "k", "bad", "fix"))[0] == 500
    assert problem_for_error(SimOutOfMemory(1, 10, 5))[0] == 503
    status, body = problem_for_error(ServiceRuntimeError("tts", "engine refused"))
    assert (status, body["type"]) == (502, problem_type("service-start-failed"))
    assert body["reason"] == "engine refused"
    assert type(error_from_problem(status, body)) is ServiceStartFailed

    class Odd(GpusmError):
        pass

    status, body = problem_for_error(Odd("closing"))
    assert (status, body["type"]) == (409, problem_type("operation-refused"))


@pytest.mark.parametrize("slug", [s for s, row in PROBLEMS.items() if row.error is None])
def test_problems_without_an_error_class_decode_to_gpusm_errors_naming_the_status(
    slug: str,
) -> None:
    row = PROBLEMS[slug]
    back = error_from_problem(row.status, {"type": row.uri, "status": row.status, "detail": "d"})
    assert type(back) is GpusmError
    assert str(back) == f"gpusm daemon answered {row.status}: d"


def test_foreign_or_partial_problems_become_plain_gpusm_errors() -> None:
    generic = error_from_problem(418, {"type": "about:blank", "title": "I'm a teapot"})
    assert type(generic) is GpusmError
    assert "418" in str(generic)
    assert "teapot" in str(generic)
    unknown = error_from_problem(
        499, {"type": problem_type("from-the-future"), "status": 499, "detail": "new"}
    )
    assert type(unknown) is GpusmError
    assert str(unknown) == "gpusm daemon answered 499: new"
    assert str(error_from_problem(500, {})) == "gpusm daemon answered 500: HTTP 500"
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
    problem = HttpProblem("recovering", "wait", {"Retry-After": "1"}, eta_s=2)
    assert problem.status == 503
    assert problem.headers == {"Retry-After": "1"}
    assert problem.body() == {
        "type": "urn:gpusm:recovering",
        "title": "Recovering",
        "status": 503,
        "detail": "wait",
        "eta_s": 2,
    }
