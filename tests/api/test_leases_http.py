"""Leases over HTTP: taken with the daemon's ``api.lease_ttl_s``, renewed by any call."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from gpusm.api.threaded import ThreadedServer
from tests.api.api_helpers import TOKEN, seed_config, write_config
from tests.support import eventually


def test_a_phase_over_http_takes_a_lease_with_the_configured_ttl_and_renew_restarts_it(
    serve: Callable[..., ThreadedServer], tmp_path: Path
) -> None:
    doc = seed_config(tmp_path)
    doc["api"]["lease_ttl_s"] = 45
    server = serve(write_config(tmp_path, doc))
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=server.url, headers=headers, timeout=60) as http:
        answer = http.post("/gpu/phase", json={"phase": "tts", "client": "w1"})
        assert answer.status_code == 200, answer.text
        status = http.get("/gpu/status").json()
        assert status["leases"] == {"w1": "tts"}
        assert 0 < status["lease_expires_s"]["w1"] <= 45

        renewed = http.post("/gpu/leases/renew", json={"client": "w1"})
        assert renewed.status_code == 200, renewed.text
        assert renewed.json()["renewed"] is True
        assert 44 < renewed.json()["expires_in_s"] <= 45

        unknown = http.post("/gpu/leases/renew", json={"client": "nobody"}).json()
        assert unknown == {"client": "nobody", "renewed": False, "expires_in_s": None}
        # Renewing changes state: like every write, it needs the token.
        refused = httpx.post(f"{server.url}/gpu/leases/renew", json={"client": "w1"})
        assert refused.status_code == 401


WORKER = """
import sys, time
from gpusm import Client
client = Client(sys.argv[1], token=sys.argv[2], renew_every_s=0.2)
client.enter_phase("tts", client="killed-worker")
print("holding", flush=True)
time.sleep(120)
"""


def test_a_worker_renews_its_lease_while_alive_and_loses_it_within_the_ttl_when_killed(
    serve: Callable[..., ThreadedServer], tmp_path: Path
) -> None:
    doc = seed_config(tmp_path)
    # Ten renewals per TTL: a loaded 2-core box may stall the worker for a second.
    doc["api"]["lease_ttl_s"] = 2.0
    server = serve(write_config(tmp_path, doc))
    worker = subprocess.Popen(
        [sys.executable, "-c", WORKER, server.url, TOKEN], stdout=subprocess.PIPE, text=True
    )
    try:
        assert worker.stdout is not None
        assert worker.stdout.readline().strip() == "holding"
        headers = {"Authorization": f"Bearer {TOKEN}"}
        with httpx.Client(base_url=server.url, headers=headers, timeout=30) as http:
            # Two TTLs later the busy worker still holds its phase: it renews.
            began = time.monotonic()
            while time.monotonic() - began < 4.0:
                assert http.get("/gpu/status").json()["leases"] == {"killed-worker": "tts"}
                time.sleep(0.25)
            worker.kill()  # SIGKILL: no release, no goodbye
            killed = time.monotonic()
            eventually(
                lambda: http.get("/gpu/status").json()["leases"] == {}, 10, "the lease to expire"
            )
            assert time.monotonic() - killed < 2.0 + 1.0  # the TTL, plus a monitor tick or two
            expired = http.get("/gpu/events", params={"type": "LeaseExpired"}).json()
            assert [e["data"]["client"] for e in expired["events"]] == ["killed-worker"]
    finally:
        worker.kill()
        worker.communicate(timeout=10)  # reaps it and closes its pipe
