"""Webhooks of a running daemon: failures in /gpu/status and /metrics, and kill -9 mid-delivery.

Real daemons (in a thread, and as a subprocess killed with SIGKILL), real HTTP on
127.0.0.1, the simulated GPU with fake model servers.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from gpusm.api.threaded import ThreadedServer
from gpusm.client import daemon_url
from gpusm.config import load_config
from gpusm.ports import EventQuery
from gpusm.store import SqlEventStore
from tests.api.api_helpers import TOKEN, seed_config, write_config
from tests.api.daemon_proc import Daemon
from tests.notify.receiver import Receiver
from tests.support import eventually

SECRET = b"daemon-webhook-secret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    found = Receiver(SECRET).up()
    yield found
    if found.behaviour.hold is not None:
        found.behaviour.hold.set()
    found.down()


def hooked_config(tmp_path: Path, receiver: Receiver, *, quiet: bool = False, **hook: Any) -> Path:
    """The seed config with one webhook; ``quiet``: no pipeline, so nothing is prefetched
    (no events are logged after a phase request has returned)."""
    (tmp_path / "hook.secret").write_bytes(SECRET)
    entry = {"url": receiver.url, "secret_file": "hook.secret", "name": "ops", **hook}
    extra: dict[str, Any] = {"pipeline": []} if quiet else {}
    return write_config(tmp_path, seed_config(tmp_path, notify=[entry], **extra))


def metric(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    raise AssertionError(f"no sample {name}{labels}")


def logged_seqs(config: Path) -> list[int]:
    store = SqlEventStore(load_config(config).database_url)
    try:
        return [e.seq for e in store.read(EventQuery())]
    finally:
        store.close()


def test_a_failing_receiver_shows_in_status_and_metrics_until_it_recovers(
    tmp_path: Path, receiver: Receiver
) -> None:
    receiver.down()
    path = hooked_config(tmp_path, receiver, quiet=True, min_backoff_s=0.05, max_backoff_s=0.2)
    server = ThreadedServer(load_config(path), token=TOKEN, stop_services_on_exit=True)
    server.start()
    try:
        server.wait_recovered()
        with httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as http:

            def failing() -> dict[str, Any] | None:
                hooks = http.get("/gpu/status").json()["webhooks"]
                return hooks[0] if hooks and hooks[0]["consecutive_failures"] >= 2 else None

            hook = eventually(failing, 20, "the webhook's failures in /gpu/status")
            assert hook is not None
            assert hook["name"] == "ops"
            assert hook["url"] == receiver.url
            assert hook["events"] == ["*"]
            assert hook["pending"] >= 1, "recovery's events wait"
            assert "cannot reach the receiver" in hook["last_error"]
            assert 0 <= hook["next_attempt_in_s"] <= 0.2
            text = http.get("/metrics").text
            assert (
                metric(text, "gpusm_webhook_deliveries_total", webhook="ops", result="failed") >= 2
            )
            assert metric(text, "gpusm_webhook_pending_events", webhook="ops") >= 1
            assert metric(text, "gpusm_webhook_consecutive_failures", webhook="ops") >= 2
            assert SECRET.decode() not in text + http.get("/gpu/status").text

            receiver.up()
            http.post("/gpu/phase", json={"phase": "crawl", "client": "w"}).raise_for_status()

            newest = http.get("/gpu/events", params={"limit": 1000}).json()["events"][-1]["seq"]

            def caught_up() -> dict[str, Any] | None:
                hook = http.get("/gpu/status").json()["webhooks"][0]
                return hook if hook["pending"] == 0 and hook["cursor_seq"] == newest else None

            hook = eventually(caught_up, 20, "the webhook to catch up")
            assert hook is not None
            assert (hook["consecutive_failures"], hook["next_attempt_in_s"]) == (0, None)
            assert hook["last_success_at"] is not None
            text = http.get("/metrics").text
            assert metric(text, "gpusm_webhook_pending_events", webhook="ops") == 0
            delivered = metric(text, "gpusm_webhook_events_delivered_total", webhook="ops")
            assert delivered == hook["delivered_events"] == len(set(receiver.accepted_seqs()))
    finally:
        server.stop()
    assert receiver.accepted_seqs() == sorted(set(receiver.accepted_seqs()))
    assert all(d.signed for d in receiver.deliveries)


class KillableDaemon(Daemon):
    """A ``gpusm serve`` child that can be killed outright (its services keep running)."""

    def kill_9(self) -> None:
        self.proc.kill()
        self.proc.wait(10)
        self._out.close()
        self.log.rename(self.log.with_name("serve-killed.log"))


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_kill_9_mid_delivery_loses_nothing_and_resends_only_the_unacknowledged_batch(
    tmp_path: Path, receiver: Receiver
) -> None:
    path = hooked_config(tmp_path, receiver, batch_size=4, min_backoff_s=0.05, max_backoff_s=0.5)
    url = daemon_url(load_config(path).api.listen)
    daemon = KillableDaemon(path, url, TOKEN)
    try:
        daemon.wait_ready()
        http = httpx.Client(base_url=url, headers=AUTH, timeout=60)
        http.post("/gpu/phase", json={"phase": "analysis", "client": "w"}).raise_for_status()
        eventually(lambda: receiver.accepted_seqs()[-1:] == logged_seqs(path)[-1:], 20, "first")
        # The next delivery reaches the receiver, which holds its answer: kill -9 then.
        receiver.behaviour.hold = threading.Event()
        http.post("/gpu/phase", json={"phase": "tts", "client": "w"}).raise_for_status()
        assert receiver.behaviour.held.wait(20), "no delivery after the phase switch"
        held = receiver.deliveries[-1].seqs
        daemon.kill_9()
        http.close()
        receiver.behaviour.hold.set()
        receiver.behaviour.hold = None

        daemon = KillableDaemon(path, url, TOKEN)
        daemon.wait_ready()
        with httpx.Client(base_url=url, headers=AUTH, timeout=60) as again:
            again.post("/gpu/phase", json={"phase": "video", "client": "w"}).raise_for_status()
            logged = logged_seqs(path)
            eventually(
                lambda: set(logged) <= set(receiver.accepted_seqs()), 30, "every logged event"
            )
    finally:
        daemon.stop()
    received = receiver.accepted_seqs()
    first_seen = list(dict.fromkeys(received))
    assert first_seen[: len(logged)] == logged, "every event, in seq order"
    duplicates = len(received) - len(first_seen)
    twice = {seq: n for seq, n in Counter(received).items() if n > 1}
    assert twice == dict.fromkeys(held, 2), "only the batch in flight was sent again"
    assert all(d.signed for d in receiver.deliveries)
    print(f"\n{len(first_seen)} events delivered, {duplicates} duplicates (batch {held})")


def test_serve_refuses_a_missing_secret_with_one_clear_line(
    tmp_path: Path, receiver: Receiver
) -> None:
    path = hooked_config(tmp_path, receiver)
    (tmp_path / "hook.secret").unlink()
    daemon = Daemon(path, daemon_url(load_config(path).api.listen), TOKEN)
    try:
        daemon.proc.wait(60)
    finally:
        daemon.stop()
    log = daemon.log.read_text()
    assert daemon.proc.returncode != 0
    assert "notify[0].secret_file: cannot read the webhook secret" in log
    assert "Traceback" not in log


def test_a_reload_replaces_the_webhooks_and_a_kept_name_keeps_its_cursor(
    tmp_path: Path, receiver: Receiver
) -> None:
    path = hooked_config(tmp_path, receiver, quiet=True, min_backoff_s=0.05, max_backoff_s=0.2)
    moved = Receiver(SECRET).up()
    server = ThreadedServer(load_config(path), token=TOKEN, stop_services_on_exit=True)
    server.start()
    try:
        server.wait_recovered()
        with httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as http:
            http.post("/gpu/phase", json={"phase": "crawl", "client": "w"}).raise_for_status()

            def crawl_delivered() -> bool:
                types = [e["type"] for d in receiver.accepted() for e in d.events]
                return "PhaseEntered" in types and server.state.webhooks()[0].pending == 0

            eventually(crawl_delivered, 20, "the crawl phase's delivery")
            cursor = server.state.webhooks()[0].cursor_seq
            doc = yaml.safe_load(path.read_text())
            doc["notify"][0] |= {"url": moved.url, "events": ["PhaseEntered"]}
            path.write_text(yaml.safe_dump(doc))
            server.state.reload("test")
            (hook,) = server.state.webhooks()
            assert (hook.url, hook.events) == (moved.url, ("PhaseEntered",))
            # Kept, not reset (the monitor may have logged and delivered more meanwhile).
            assert hook.cursor_seq >= cursor
            http.post("/gpu/phase", json={"phase": "render", "client": "w"}).raise_for_status()
            eventually(lambda: moved.accepted(), 20, "a delivery to the new URL")
    finally:
        server.stop()
        moved.down()
    assert [e["type"] for d in moved.accepted() for e in d.events] == ["PhaseEntered"]
    assert min(moved.accepted_seqs()) > cursor, "nothing the old URL acknowledged"
