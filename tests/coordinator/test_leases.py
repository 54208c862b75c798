"""Leases have a life: revoked with the service they hold, expired with a silent client.

Real processes on the simulated GPU (the seed's services). The drain of a preempted
service waits ``drain_timeout_s`` (2 s here) for holders to let go.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from gpusm import Coordinator
from gpusm.clock import ManualClock
from gpusm.ports import EventQuery
from tests.coordinator.fakes_helpers import fake_config, fake_service, open_world
from tests.seed_helpers import seed_config, write_config

Open = Callable[..., Coordinator]


def test_a_preempted_clients_lease_is_revoked_and_the_next_eviction_does_not_wait(
    tmp_path: Path, open_coordinator: Open
) -> None:
    coordinator = open_coordinator(write_config(tmp_path, seed_config(tmp_path, pipeline=[])))
    coordinator.enter_phase("chat", client="low")  # ollama, priority 10; low never lets go
    high = coordinator.enter_phase("video", client="high", timeout=60)
    assert [(s.service, s.kind) for s in high.stopped] == [("ollama", "preempt")]

    revoked = coordinator.events(EventQuery(types=["LeaseRevoked"]))
    assert [(e.data["client"], e.data["service"]) for e in revoked] == [("low", "ollama")]
    assert "preempted" in revoked[0].data["reason"]
    assert "low" not in coordinator.status().leases
    assert coordinator.renew("low") is False  # nothing left to keep alive

    # ollama runs again for nobody; high releases video. The next eviction of ollama
    # finds it idle: no lease of low's makes it wait out the drain timeout again.
    coordinator.release("high")
    coordinator.start_service("ollama", by="test")
    again = coordinator.enter_phase("video", client="high", timeout=60)
    assert [(s.service, s.kind) for s in again.stopped] == [("ollama", "evict")]
    assert again.waited_s < 2.0, again

    # low's next call hears why its lease went.
    coordinator.release("high")
    back = coordinator.enter_phase("chat", client="low", timeout=60)
    assert back.lease_revoked is not None
    assert "ollama was preempted" in back.lease_revoked


def test_a_stopped_service_revokes_the_leases_holding_it(
    tmp_path: Path, open_coordinator: Open
) -> None:
    coordinator = open_coordinator(write_config(tmp_path, seed_config(tmp_path, pipeline=[])))
    coordinator.enter_phase("tts", client="w")
    coordinator.stop_service("cosyvoice", by="operator")
    revoked = coordinator.events(EventQuery(types=["LeaseRevoked"]))
    assert revoked[-1].data == {
        "client": "w",
        "phase": "tts",
        "service": "cosyvoice",
        "reason": "cosyvoice was stopped by operator",
    }
    assert coordinator.status().leases == {}


def test_a_silent_clients_lease_expires_after_its_ttl_and_renewing_keeps_it(
    tmp_path: Path,
) -> None:
    clock = ManualClock()
    world = open_world(fake_config(tmp_path, {"a": fake_service(2048)}), clock=clock)
    try:
        world.coordinator.enter_phase("pa", client="w", lease_ttl_s=30)
        assert world.coordinator.status().lease_expires_s == {"w": 30.0}
        clock.advance(20)
        world.tick()
        assert world.coordinator.renew("w") is True
        clock.advance(20)
        world.tick()
        assert world.coordinator.status().leases == {"w": "pa"}  # renewed 20 s ago
        clock.advance(11)
        world.tick()
        assert world.coordinator.status().leases == {}
        expired = world.last("coordinator", "LeaseExpired")
        assert expired["client"] == "w"
        assert expired["ttl_s"] == 30
        assert expired["silent_s"] >= 30
        assert world.coordinator.renew("w") is False
    finally:
        world.coordinator.close()


def test_a_lease_without_a_ttl_never_expires(tmp_path: Path) -> None:
    clock = ManualClock()
    world = open_world(fake_config(tmp_path, {"a": fake_service(2048)}), clock=clock)
    try:
        world.coordinator.enter_phase("pa", client="w")
        clock.advance(10_000)
        world.tick()
        assert world.coordinator.status().leases == {"w": "pa"}
        assert world.coordinator.status().lease_expires_s == {}
    finally:
        world.coordinator.close()


def test_one_off_clients_leave_nothing_behind_once_ended(tmp_path: Path) -> None:
    # A proxy makes one client per request: a daemon serving millions must keep none.
    world = open_world(fake_config(tmp_path, {"a": fake_service(1000)}))
    try:
        for i in range(50):
            world.coordinator.ensure_service("a", client=f"proxy:admin:{i}")
            with world.engine.cond:
                world.engine.revoke("a", "a stop revoked it")  # a note left for the client
            world.coordinator.end_client(f"proxy:admin:{i}")
        assert world.coordinator.status().leases == {}
        assert world.coordinator._client_locks == {}  # the memory at stake
        assert world.engine.leases.take_revocation("proxy:admin:49") is None
    finally:
        world.coordinator.close()
