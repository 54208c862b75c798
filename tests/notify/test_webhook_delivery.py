"""Webhooks lose nothing: real HTTP on 127.0.0.1, a real SQLite log, the daemon's wiring.

The receiver refuses the first deliveries, then is down while events happen, then comes
back: every event of the webhook's types arrives, in ``seq`` order, signed.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from gpusm.config import Config, parse_config
from gpusm.domain.events import NewEvent
from gpusm.ports import EventStore, Notifier
from gpusm.store import SqlEventStore
from gpusm.wiring import open_notifier
from tests.notify.receiver import Receiver
from tests.support import eventually

SECRET = b"s3cret-for-tests"


def config_for(tmp_path: Path, *hooks: dict[str, Any]) -> Config:
    (tmp_path / "hook.secret").write_bytes(SECRET + b"\n")
    doc = {
        "state_dir": str(tmp_path / "state"),
        "notify": [
            {"secret_file": "hook.secret", "min_backoff_s": 0.01, "max_backoff_s": 0.05, **h}
            for h in hooks
        ],
    }
    return parse_config(doc, base=tmp_path)


class Log:
    """Appends events of a few services to the SQLite log, as the coordinator would."""

    def __init__(self, config: Config) -> None:
        self.store: EventStore = SqlEventStore(config.database_url)
        self.versions: dict[str, int] = {}

    def append(self, kind: str, stream: str = "tts") -> int:
        version = self.versions.get(stream, 0) + 1
        self.versions[stream] = version
        event = NewEvent(stream, version, kind, datetime.now(UTC), data={"n": version})
        return self.store.append([event])[0].seq

    def close(self) -> None:
        self.store.close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    found = Receiver(SECRET).up()
    yield found
    found.behaviour.hold = None
    found.down()


def start(config: Config) -> Notifier:
    notifier = open_notifier(config, poll_s=0.01)
    assert notifier is not None
    notifier.start()
    return notifier


def test_every_event_arrives_in_order_signed_after_refusals_and_an_outage(
    tmp_path: Path, receiver: Receiver
) -> None:
    config = config_for(tmp_path, {"url": receiver.url, "batch_size": 3})
    log = Log(config)
    before = log.append("Crashed")  # before the webhook existed: not sent
    notifier = start(config)
    try:
        receiver.behaviour.fail_next = 4
        sent = [log.append(kind) for kind in ("Evicted", "Crashed", "Preempted", "GaveUp")]
        eventually(lambda: receiver.accepted_seqs() == sent, 10, "the first events")
        assert [d.answered for d in receiver.deliveries[:4]] == [503] * 4
        assert all(d.signed for d in receiver.deliveries)

        receiver.down()
        sent += [log.append("Stopped", stream=f"svc{i % 3}") for i in range(20)]
        eventually(
            lambda: (
                notifier.status()[0].consecutive_failures >= 3
                and notifier.status()[0].pending == 20
            ),
            10,
            "failures while down, with every new event counted",
        )
        status = notifier.status()[0]
        assert status.pending == 20
        assert status.cursor_seq == sent[3]
        assert "cannot reach the receiver" in (status.last_error or "")
        sent += [log.append("Crashed")]

        receiver.up()
        eventually(lambda: receiver.accepted_seqs() == sent, 10, "the backlog")
    finally:
        notifier.close()
        log.close()
    assert before not in receiver.accepted_seqs()
    assert all(d.signed for d in receiver.deliveries), "every delivery verifies"
    assert all(len(d.seqs) <= 3 for d in receiver.deliveries)
    last = notifier.status()[0]
    assert (last.pending, last.consecutive_failures, last.cursor_seq) == (0, 0, sent[-1])
    assert last.delivered_events == len(sent)


def test_only_the_chosen_types_are_sent_with_the_event_log_shape(
    tmp_path: Path, receiver: Receiver
) -> None:
    config = config_for(tmp_path, {"url": receiver.url, "events": ["Crashed", "GaveUp"]})
    log = Log(config)
    notifier = start(config)
    try:
        seqs = {kind: log.append(kind) for kind in ("Evicted", "Crashed", "Stopped", "GaveUp")}
        eventually(
            lambda: receiver.accepted_seqs() == [seqs["Crashed"], seqs["GaveUp"]], 10, "2 events"
        )
    finally:
        notifier.close()
        log.close()
    first = receiver.accepted()[0]
    body = json.loads(first.body)
    assert body["webhook"] == f"http://127.0.0.1:{receiver.port}/hook"
    event = body["events"][0]
    assert set(event) == {
        "seq",
        "stream",
        "version",
        "type",
        "at",
        "from_state",
        "to_state",
        "data",
    }
    assert (event["type"], event["stream"], event["data"]) == ("Crashed", "tts", {"n": 2})
    assert first.headers["x-gpusm-delivery"] == f"{first.seqs[0]}-{first.seqs[-1]}"
    assert first.headers["x-gpusm-attempt"] == "1"
    assert first.headers["content-type"] == "application/json"


def test_a_restarted_notifier_resumes_after_its_cursor_and_a_refused_batch_is_resent_whole(
    tmp_path: Path, receiver: Receiver
) -> None:
    config = config_for(tmp_path, {"url": receiver.url, "name": "audit", "batch_size": 5})
    log = Log(config)
    notifier = start(config)
    try:
        first = [log.append("Evicted") for _ in range(2)]
        eventually(lambda: receiver.accepted_seqs() == first, 10, "the first two")
    finally:
        notifier.close()
    receiver.behaviour.fail_next = 2
    seen = len(receiver.deliveries)
    later = [log.append("Preempted") for _ in range(4)]  # while no notifier runs
    notifier = start(config)
    try:
        eventually(lambda: receiver.accepted_seqs() == first + later, 10, "the rest")
    finally:
        notifier.close()
        log.close()
    refused, retried = receiver.deliveries[seen : seen + 2], receiver.deliveries[seen + 2]
    assert [d.answered for d in refused] == [503, 503]
    assert retried.seqs == later, "the backlog in one batch"
    assert {d.body for d in refused} == {retried.body}, "the same events, resent whole"
    assert [d.headers["x-gpusm-attempt"] for d in [*refused, retried]] == ["1", "2", "3"]


def test_the_secret_appears_in_no_status(tmp_path: Path, receiver: Receiver) -> None:
    config = config_for(tmp_path, {"url": f"http://user:pw@127.0.0.1:{receiver.port}/h?k=v"})
    notifier = start(config)
    try:
        text = repr(notifier.status())
    finally:
        notifier.close()
    assert SECRET.decode() not in text
    assert "pw" not in text
    assert "k=v" not in text
    assert notifier.status()[0].url == f"http://127.0.0.1:{receiver.port}/h"
