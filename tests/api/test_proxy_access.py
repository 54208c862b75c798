"""The proxy's keys, listeners, ignored paths, WebSockets and form uploads (issue 14):
a real daemon, real fake model servers, real HTTP and WebSockets on 127.0.0.1."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from gpusm.api import proxy as proxy_module
from tests.api.api_helpers import TOKEN, free_port
from tests.api.test_proxy import AUTH, PROBLEM, Serve, no_leases, proxy_config, states, write_config
from tests.support import eventually

BATCH, VIP = "batch-token-0123456789", "vip-token-0123456789"


def keyed_config(tmp_path: Path, **proxy: Any) -> dict[str, Any]:
    """Two keys besides the daemon's own: ``batch`` (priority 5, ollama and vidi only)
    and ``vip`` (priority 200, above ComfyUI's 100)."""
    (tmp_path / "batch.key").write_text(BATCH + "\n")
    (tmp_path / "vip.key").write_text(VIP + "\n")
    doc = proxy_config(tmp_path, **proxy)
    doc["api"]["keys"] = [
        {"name": "batch", "token_file": "batch.key", "priority": 5, "services": ["ollama", "vidi"]},
        {"name": "vip", "token_file": "vip.key", "priority": 200},
    ]
    return doc


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_a_lower_priority_key_waits_then_gets_503_while_a_higher_phase_holds_the_gpu(
    serve: Serve, tmp_path: Path
) -> None:
    daemon = serve(write_config(tmp_path, keyed_config(tmp_path, wait_s=1.5)))
    with httpx.Client(base_url=daemon.url, timeout=60) as http:
        held = http.post("/gpu/phase", json={"phase": "video", "client": "worker"}, headers=AUTH)
        assert held.status_code == 200, held.text
        # ollama (18 GiB) does not fit beside ComfyUI (20 GiB, priority 100, held).
        answer = http.get("/svc/ollama/info", headers=bearer(BATCH))
        assert answer.status_code == 503, answer.text
        assert answer.headers["content-type"] == PROBLEM
        assert int(answer.headers["retry-after"]) >= 1
        assert answer.json()["blocked_by"] == ["comfyui"]
    with httpx.Client(base_url=daemon.url, headers=AUTH, timeout=60) as admin:
        assert states(admin)["comfyui"] == "healthy"


def test_a_higher_priority_key_preempts_the_phase(serve: Serve, tmp_path: Path) -> None:
    daemon = serve(write_config(tmp_path, keyed_config(tmp_path)))
    with httpx.Client(base_url=daemon.url, timeout=60) as http:
        held = http.post("/gpu/phase", json={"phase": "video", "client": "worker"}, headers=AUTH)
        assert held.status_code == 200, held.text
        answer = http.get("/svc/ollama/info", headers=bearer(VIP))
        assert answer.status_code == 200, answer.text
        events = http.get("/gpu/events", params={"service": "comfyui"}, headers=AUTH).json()
        preempted = [e for e in events["events"] if e["type"] == "Preempted"]
        assert preempted
        assert preempted[-1]["data"]["by"].startswith("proxy:vip:")


def test_keys_are_checked_and_confined_to_their_services(serve: Serve, tmp_path: Path) -> None:
    daemon = serve(write_config(tmp_path, keyed_config(tmp_path)))
    with httpx.Client(base_url=daemon.url, timeout=60) as http:
        assert http.get("/svc/vidi/info", headers=bearer("wrong")).status_code == 401
        forbidden = http.get("/svc/comfyui/info", headers=bearer(BATCH))
        assert forbidden.status_code == 403
        assert forbidden.json()["type"] == "urn:gpusm:forbidden"
        assert "may not use service 'comfyui'" in forbidden.json()["detail"]
        assert http.get("/svc/vidi/info", headers=bearer(BATCH)).status_code == 200
        # The daemon's own API is the admin token's alone.
        assert http.post("/gpu/services/vidi/stop", headers=bearer(BATCH)).status_code == 401


def listener_config(tmp_path: Path) -> tuple[dict[str, Any], int, int]:
    """ollama's own port taken by gpusm with no key needed, comfyui's needing one
    (and its /ws and /system_stats never starting it)."""
    doc = keyed_config(tmp_path)
    ollama_port, comfy_port = free_port(), free_port()
    doc["services"]["ollama"] |= {"listen": f"127.0.0.1:{ollama_port}", "auth": "none"}
    doc["services"]["comfyui"] |= {
        "listen": f"127.0.0.1:{comfy_port}",
        "ignore_paths": ["/ws", "/system_stats"],
    }
    return doc, ollama_port, comfy_port


def test_a_listener_with_auth_none_serves_an_unmodified_client(
    serve: Serve, tmp_path: Path
) -> None:
    doc, ollama_port, _ = listener_config(tmp_path)
    daemon = serve(write_config(tmp_path, doc))
    with httpx.Client(base_url=f"http://127.0.0.1:{ollama_port}", timeout=60) as plain:
        body = {"model": "fake-model", "prompt": "hi", "stream": False}
        answer = plain.post("/api/generate", json=body)
        assert answer.status_code == 200, answer.text
        assert answer.json()["response"] == "ok"
        # A DNS-rebinding page cannot use it: the Host check applies here too.
        assert plain.get("/info", headers={"Host": "evil.example"}).status_code == 421
    with httpx.Client(base_url=daemon.url, headers=AUTH, timeout=60) as http:
        assert states(http)["ollama"] == "healthy"
        no_leases(http)


def test_a_listener_needs_a_key_unless_auth_none(serve: Serve, tmp_path: Path) -> None:
    doc, _, comfy_port = listener_config(tmp_path)
    daemon = serve(write_config(tmp_path, doc))
    with httpx.Client(base_url=f"http://127.0.0.1:{comfy_port}", timeout=60) as plain:
        assert plain.get("/info").status_code == 401
        assert plain.get("/info", headers=bearer(BATCH)).status_code == 403
        assert plain.get("/info", headers=bearer(VIP)).status_code == 200
    with httpx.Client(base_url=daemon.url, headers=AUTH, timeout=60) as http:
        assert states(http)["comfyui"] == "healthy"


def test_an_ignored_path_never_starts_its_service(serve: Serve, tmp_path: Path) -> None:
    doc, _, comfy_port = listener_config(tmp_path)
    daemon = serve(write_config(tmp_path, doc))
    base = f"http://127.0.0.1:{comfy_port}"
    with httpx.Client(base_url=base, headers=bearer(TOKEN), timeout=60) as comfy:
        refused = comfy.get("/system_stats")
        assert refused.status_code == 503
        assert "ignore_paths" in refused.json()["detail"]
        assert int(refused.headers["retry-after"]) >= 1
        with pytest.raises(InvalidStatus):
            connect(f"ws://127.0.0.1:{comfy_port}/ws", additional_headers=bearer(TOKEN)).close()
    with httpx.Client(base_url=daemon.url, headers=AUTH, timeout=60) as http:
        assert states(http)["comfyui"] == "stopped"
        # Once it runs (started for another request), the ignored paths are relayed.
        assert http.get("/svc/comfyui/info").status_code == 200
        assert http.get("/svc/comfyui/system_stats").status_code in (200, 404)
        with connect(
            f"ws://127.0.0.1:{comfy_port}/ws?clientId=1", additional_headers=bearer(TOKEN)
        ) as ws:
            assert json.loads(ws.recv(timeout=10))["data"]["sid"] == "1"  # ComfyUI's hello
            ws.send("still there?")
            assert ws.recv(timeout=10) == "still there?"


def test_a_websocket_round_trip_through_svc_holds_a_lease_while_open(
    serve: Serve, tmp_path: Path
) -> None:
    daemon = serve(write_config(tmp_path, proxy_config(tmp_path)))
    url = daemon.url.replace("http://", "ws://") + "/svc/comfyui/ws?clientId=abc"
    with httpx.Client(base_url=daemon.url, headers=AUTH, timeout=60) as http:
        with connect(url, additional_headers=AUTH, open_timeout=30) as ws:
            assert json.loads(ws.recv(timeout=10))["type"] == "status"  # ComfyUI's hello
            ws.send("hello")
            assert ws.recv(timeout=10) == "hello"
            ws.send(b"\x00\x01binary")
            assert ws.recv(timeout=10) == b"\x00\x01binary"
            leases = http.get("/gpu/status").json()["leases"]
            assert [c for c in leases if c.startswith("proxy:admin:")]
        no_leases(http)
        with pytest.raises(InvalidStatus):
            connect(url, additional_headers=bearer("wrong")).close()


def test_a_multipart_upload_is_routed_by_its_model_field_and_streamed_whole(
    serve: Serve, tmp_path: Path
) -> None:
    daemon = serve(write_config(tmp_path, proxy_config(tmp_path)))
    audio = bytes(range(256)) * 12_000  # 3 MiB: more than the proxy ever reads
    with httpx.Client(base_url=daemon.url, headers=AUTH, timeout=60) as http:
        answer = http.post(
            "/v1/audio/transcriptions",
            data={"model": "tts-1"},
            files={"file": ("speech.wav", audio, "audio/wav")},
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["bytes"] > len(audio)  # the whole multipart body arrived
        assert states(http)["cosyvoice"] == "healthy"
        form = http.post("/v1/audio/transcriptions", data={"model": "fake-model", "x": "1"})
        assert form.status_code == 200, form.text
        assert states(http)["ollama"] == "healthy"
        # A file part before the model field: the upload is never searched.
        late = http.post(
            "/v1/audio/transcriptions",
            files=[("file", ("a.wav", b"RIFF", "audio/wav")), ("model", (None, b"tts-1"))],
        )
        assert late.status_code == 422
        assert "before the file" in late.json()["detail"]


def test_idle_ttl_counts_from_the_answers_last_byte(serve: Serve, tmp_path: Path) -> None:
    doc = proxy_config(tmp_path)
    doc["services"]["ollama"]["idle_ttl_s"] = 1.0
    daemon = serve(write_config(tmp_path, doc))
    with httpx.Client(base_url=daemon.url, headers=AUTH, timeout=60) as http:
        # 75 tokens at the fake's 50 per second: a stream longer than the idle TTL.
        body = {"model": "fake-model", "prompt": "hi", "stream": True}
        with http.stream(
            "POST", "/api/generate", json=body | {"options": {"num_predict": 75}}
        ) as answer:
            assert answer.status_code == 200
            began = time.time()
            answer.read()
        ended = time.time()
        assert ended - began > 1.0
        # Never idle while it streamed; idle for its TTL from the last byte, then stopped.
        eventually(lambda: states(http)["ollama"] == "stopped", 30, "ollama idle-stopped")
        query = {"service": "ollama", "type": "DrainRequested"}
        (drain,) = http.get("/gpu/events", params=query).json()["events"]
        assert "idle" in drain["data"]["reason"]
        drained_at = datetime.fromisoformat(drain["at"]).timestamp()
        assert drained_at - ended >= 0.9


def test_an_empty_post_to_a_cold_service_is_relayed_not_left_waiting(
    serve: Serve, tmp_path: Path
) -> None:
    daemon = serve(write_config(tmp_path, proxy_config(tmp_path)))
    with httpx.Client(base_url=daemon.url, headers=AUTH, timeout=30) as http:
        answer = http.post("/svc/vidi/generate", content=b"")  # Content-Length: 0
        assert answer.status_code == 404  # the fake's own answer: no such endpoint
        assert "no such endpoint" in answer.json()["error"]
        assert states(http)["vidi"] == "healthy"
        no_leases(http)


def test_a_websocket_for_an_unknown_service_is_refused_cleanly(
    serve: Serve, tmp_path: Path
) -> None:
    daemon = serve(write_config(tmp_path, proxy_config(tmp_path)))
    url = daemon.url.replace("http://", "ws://") + "/svc/nosuch/ws"
    with pytest.raises(InvalidStatus):
        connect(url, additional_headers=AUTH).close()
    with httpx.Client(base_url=daemon.url, headers=AUTH, timeout=30) as http:
        assert http.get("/healthz").json()["status"] == "ok"


def test_requests_beyond_the_proxys_waiting_threads_queue_for_one(
    serve: Serve, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One waiting thread for the whole proxy: three cold requests take turns in it.
    monkeypatch.setattr(proxy_module, "WAITERS", 1)
    daemon = serve(write_config(tmp_path, proxy_config(tmp_path)))
    with httpx.Client(base_url=daemon.url, headers=AUTH, timeout=60) as http:
        with ThreadPoolExecutor(3) as pool:
            pending = [pool.submit(http.get, "/svc/vidi/info") for _ in range(3)]
            # The daemon's own API does not wait in the proxy's threads.
            assert http.get("/gpu/status").status_code == 200
            answers = [future.result(timeout=60) for future in pending]
        assert [a.status_code for a in answers] == [200, 200, 200]
        events = http.get("/gpu/events", params={"service": "vidi", "type": "StartRequested"})
        assert len(events.json()["events"]) == 1
        no_leases(http)
