"""Two clients with conflicting phases: the higher priority wins after a drain, the lower waits."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from gpusm import Coordinator
from gpusm.errors import InsufficientVram
from gpusm.ports import EventQuery
from gpusm.results import PhaseResult
from tests.seed_helpers import seed_config, write_config
from tests.support import eventually, state_of

Open = Callable[..., Coordinator]


def test_higher_priority_preempts_after_draining_and_the_lower_waits_then_runs(
    tmp_path: Path, open_coordinator: Open
) -> None:
    coordinator = open_coordinator(write_config(tmp_path, seed_config(tmp_path, pipeline=[])))
    # The low-priority client holds ollama (18 GiB, priority 10).
    coordinator.enter_phase("chat", client="low")

    high: list[PhaseResult] = []
    high_thread = threading.Thread(
        target=lambda: high.append(coordinator.enter_phase("video", client="high", timeout=30))
    )
    high_thread.start()
    # The preemption waits for low's lease; low finishing its work releases it.
    eventually(lambda: state_of(coordinator, "ollama") == "draining", 20, "ollama draining")
    coordinator.release("low")
    high_thread.join(timeout=30)
    assert high
    assert high[0].started == ("comfyui",)
    assert [(s.service, s.kind) for s in high[0].stopped] == [("ollama", "preempt")]

    # Low comes back for chat while high still holds video: it must wait, not fail.
    low: list[PhaseResult] = []
    errors: list[BaseException] = []

    def low_again() -> None:
        try:
            low.append(coordinator.enter_phase("chat", client="low", timeout=30))
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)

    low_thread = threading.Thread(target=low_again)
    low_thread.start()
    # It queues for room (it cannot preempt priority 100) instead of failing.
    eventually(lambda: coordinator.queued() > 0, 20, "chat queued for room")
    assert low_thread.is_alive(), "the lower-priority request must wait while video is in use"
    assert errors == []
    assert state_of(coordinator, "comfyui") == "healthy"

    coordinator.release("high")  # comfyui is now idle: low may evict it
    low_thread.join(timeout=30)
    assert errors == []
    assert low
    assert low[0].started == ("ollama",)
    assert [(s.service, s.kind) for s in low[0].stopped] == [("comfyui", "evict")]
    preempted = coordinator.events(EventQuery(stream="ollama", types=["Preempted"]))
    assert "in use by low at priority 10 < 100" in preempted[0].data["reason"]


def test_equal_priority_in_use_is_never_preempted(tmp_path: Path, open_coordinator: Open) -> None:
    doc = seed_config(tmp_path, pipeline=[])
    doc["services"]["ollama"]["priority"] = 100
    coordinator = open_coordinator(write_config(tmp_path, doc))
    coordinator.enter_phase("chat", client="a")
    with pytest.raises(InsufficientVram, match="blocked by: ollama") as info:
        coordinator.enter_phase("video", client="b", timeout=1.0)
    assert info.value.blocked_by == ["ollama"]
    assert state_of(coordinator, "ollama") == "healthy"
