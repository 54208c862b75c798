"""The wire shapes: every answer type survives JSON, and a wrong answer is a GpusmError.

(The error table is tested in ``tests/api/test_problems.py``; ``HOST:PORT`` parsing in
``tests/api/test_server.py``; that wire.py imports no framework, in
``tests/test_architecture.py``.)
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from gpusm.domain.events import RecordedEvent
from gpusm.domain.policy import Plan, Victim
from gpusm.errors import GpusmError
from gpusm.results import DeviceStatus, PhaseResult, ReloadResult, ServiceStatus, Status, StopNote
from gpusm.wire import (
    SHAPES,
    EventPage,
    Health,
    Released,
    ReleasedAll,
    Renewed,
    from_json,
    to_json,
)

NOTE = StopNote("comfyui", "evict", "idle for 30s")
SERVICE = ServiceStatus(
    name="tts",
    state="healthy",
    runtime="native",
    gpu=0,
    priority=5,
    vram_mib=4096,
    reservation_mib=4096,
    used_mib=3900,
    pid=1234,
    container_id=None,
    leased_by=("worker-1",),
    in_state_s=1.5,
)
EVENT = RecordedEvent(
    stream="tts",
    version=3,
    type="HealthPassed",
    at=datetime(2026, 1, 31, 12, 0, 0, 123456, tzinfo=UTC),
    from_state="starting",
    to_state="healthy",
    data={"waited_s": 1.25, "nested": {"list": [1, None, "x"]}},
    seq=42,
)
SAMPLES: list[Any] = [
    PhaseResult(
        phase="tts",
        client="worker-1",
        started=("tts",),
        kept=("llm",),
        stopped=(NOTE,),
        waited_s=2.5,
        free_before_mib=1000,
        free_after_mib=None,
        prefetching=("asr",),
    ),
    Status(
        recovered=True,
        devices=(DeviceStatus(0, "H200", 143000, 4000, 139000, 100, 138000),),
        services=(SERVICE,),
        leases={"worker-1": "tts"},
    ),
    SERVICE,
    NOTE,
    Plan(
        fits=False,
        need_mib=18432,
        free_before_mib=4096,
        free_after_mib=8192,
        to_start=("comfyui",),
        already_running=("tts",),
        victims=(Victim("llm", "preempt", 4096, "lower priority"),),
        blocked_by=("asr",),
        reason="asr is leased",
        foreign_mib=512,
    ),
    EventPage((EVENT,), 42),
    EventPage((), None),
    Health(status="ok", recovered=True, version="1.2.3"),
    Released("worker-1"),
    ReleasedAll((NOTE,)),
    Renewed("worker-1", True, 41.5),
    ReloadResult("a1b2c3d4e5f6", ("new",), ("old",), ("vidi",), ("tts",), True),
    Renewed("worker-2", False),
]


def test_every_shape_has_a_sample() -> None:
    assert {type(s) for s in SAMPLES} == set(SHAPES)


@pytest.mark.parametrize("value", SAMPLES, ids=lambda v: type(v).__name__)
def test_every_shape_survives_json(value: Any) -> None:
    text = to_json(value)
    assert from_json(type(value), json.loads(text)) == value
    assert from_json(type(value), text) == value


def test_events_keep_their_instant_and_data() -> None:
    found = json.loads(to_json(EventPage((EVENT,), None)))
    assert found["events"][0]["at"] == "2026-01-31T12:00:00.123456Z"
    back = from_json(EventPage, found).events[0]
    assert back.at == EVENT.at
    assert back.at.utcoffset() is not None
    assert back.data == EVENT.data


def test_health_names_the_service() -> None:
    assert json.loads(to_json(Health(status="recovering", recovered=False, version="1"))) == {
        "service": "gpusm",
        "status": "recovering",
        "recovered": False,
        "version": "1",
        "error": None,
    }


def test_an_answer_of_the_wrong_shape_is_a_gpusm_error() -> None:
    with pytest.raises(GpusmError, match="not a PhaseResult"):
        from_json(PhaseResult, {"phase": "tts"})
    with pytest.raises(GpusmError, match="not a Status"):
        from_json(Status, b"[1, 2]")
