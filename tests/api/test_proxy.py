"""The proxy on ``gpusm serve`` (issue 14): real daemon, real fake model servers, real HTTP.

A request through ``/svc/<service>/...``, ``/v1/...`` or ``/api/...`` makes the right
service run under a lease of its own, is forwarded to it, and leaves no lease behind.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
import yaml
from starlette.requests import Request

from gpusm.api.proxy_http import request_headers, response_headers, upstream_problem
from gpusm.api.proxy_models import model_in_body, model_list, names_model_in_body, route_model
from gpusm.api.threaded import ThreadedServer
from gpusm.api.upstream import UpstreamError, UpstreamPool, UpstreamResponse
from gpusm.gpu.sim import SimGpu
from tests.api.api_helpers import TOKEN, free_port, seed_config
from tests.support import eventually

Serve = Callable[..., ThreadedServer]
PROBLEM = "application/problem+json"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MODELS = {"fake-model": "ollama", "qwen*": "cosyvoice", "q*": "vidi", "tts-1": "cosyvoice"}


def proxy_config(tmp_path: Path, wait_s: float = 60.0, **overrides: Any) -> dict[str, Any]:
    """The API seed config without a pipeline (nothing prefetched behind the tests'
    backs), a model map, and cosyvoice's fake serving the model ``qwen-tts``."""
    doc = seed_config(tmp_path, pipeline=[], models=MODELS, proxy={"wait_s": wait_s})
    cosy = doc["services"]["cosyvoice"]
    cosy["command"] = [*cosy["command"], "--model", "qwen-tts"]
    doc.update(overrides)
    return doc


def write_config(tmp_path: Path, doc: dict[str, Any]) -> Path:
    """``doc`` as ``tmp_path/gpusm.yaml``, in its own key order (the model map's globs
    are tried in the order the file gives them)."""
    path = tmp_path / "gpusm.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def port_of(doc: dict[str, Any], service: str) -> int:
    command: list[str] = doc["services"][service]["command"]
    return int(command[command.index("--port") + 1])


@pytest.fixture
def doc(tmp_path: Path) -> dict[str, Any]:
    return proxy_config(tmp_path)


@pytest.fixture
def daemon(serve: Serve, tmp_path: Path, doc: dict[str, Any]) -> ThreadedServer:
    return serve(write_config(tmp_path, doc))


@pytest.fixture
def http(daemon: ThreadedServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=daemon.url, headers=AUTH, timeout=60) as client:
        yield client


def status(http: httpx.Client) -> dict[str, Any]:
    found: dict[str, Any] = http.get("/gpu/status").json()
    return found


def states(http: httpx.Client) -> dict[str, str]:
    return {s["name"]: s["state"] for s in status(http)["services"]}


def no_leases(http: httpx.Client) -> None:
    """Every proxied request's lease has ended (at once, or very soon after the answer)."""
    eventually(lambda: status(http)["leases"] == {}, 10, "the proxy's leases to end")


def starts(http: httpx.Client, service: str) -> int:
    params: dict[str, str | int] = {"type": "StartRequested", "service": service, "limit": 1000}
    return len(http.get("/gpu/events", params=params).json()["events"])


def generate(model: str, tokens: int = 1, stream: bool = False) -> dict[str, Any]:
    """An Ollama ``/api/generate`` body. The fake answers a streamed one token by token
    (token ``i`` is ``"<model>-i "``), else with one small JSON answer ("ok"); a model
    that is not its own is a 404."""
    return {"model": model, "prompt": "hi", "stream": stream, "options": {"num_predict": tokens}}


# ------------------------------------------------------------------ /svc/<service>/...
def test_a_cold_request_starts_the_service_and_gets_its_answer(
    http: httpx.Client, doc: dict[str, Any]
) -> None:
    assert states(http)["vidi"] == "stopped"
    answer = http.get("/svc/vidi/info", params={"x": "1"})
    assert answer.status_code == 200, answer.text
    info = answer.json()
    assert info["state"] == "ready"
    assert info["options"]["port"] == port_of(doc, "vidi")
    assert answer.headers["content-type"] == "application/json"
    assert states(http)["vidi"] == "healthy"
    assert starts(http, "vidi") == 1
    # A warm request starts nothing, and the lease of each ends with its answer.
    assert http.get("/svc/vidi/health").status_code == 200
    assert starts(http, "vidi") == 1
    no_leases(http)
    # A proxied request's lease is not logged (millions of them would drown the audit);
    # the cold one, which started vidi, is.
    assert http.get("/gpu/events", params={"type": "PhaseEntered"}).json()["events"] == []
    assert http.get("/gpu/events", params={"type": "LeaseReleased"}).json()["events"] == []
    audited = http.get("/gpu/events", params={"type": "ProxiedRequest"}).json()["events"]
    assert [e["data"]["started"] for e in audited] == [["vidi"]]
    assert audited[0]["data"]["client"].startswith("proxy:admin:")


def test_upstream_status_and_body_come_back_unchanged(
    http: httpx.Client, doc: dict[str, Any]
) -> None:
    # The fake answers 404 (with its info) for a path it does not know: not a gpusm 404.
    answer = http.get("/svc/cosyvoice/no/such/path")
    assert answer.status_code == 404
    assert answer.headers["content-type"] == "application/json"
    assert answer.json()["options"]["port"] == port_of(doc, "cosyvoice")
    # A POST body goes through as it came (the fake reads it by its Content-Length).
    generated = http.post("/svc/cosyvoice/api/generate", json=generate("qwen-tts"))
    assert generated.status_code == 200, generated.text
    assert generated.json()["response"] == "ok"
    no_leases(http)


def test_twenty_concurrent_requests_for_a_cold_model_start_it_once(http: httpx.Client) -> None:
    results: list[int] = []
    bodies: list[str] = []

    def one() -> None:
        with httpx.Client(base_url=str(http.base_url), headers=AUTH, timeout=60) as client:
            answer = client.post("/api/generate", json=generate("fake-model"))
            results.append(answer.status_code)
            if answer.status_code != 200:
                bodies.append(answer.text)

    threads = [threading.Thread(target=one) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(90)
    assert results == [200] * 20, bodies
    assert starts(http, "ollama") == 1
    no_leases(http)


def test_two_services_that_cannot_share_the_gpu_alternate_without_oom(
    http: httpx.Client, doc: dict[str, Any], tmp_path: Path
) -> None:
    # comfyui (20 GiB) and ollama (18 GiB) never fit together on the 24 GiB GPU.
    ports = {name: port_of(doc, name) for name in ("comfyui", "ollama")}
    for name in ["comfyui", "ollama", "comfyui", "ollama"]:
        answer = http.get(f"/svc/{name}/info")
        assert answer.status_code == 200, answer.text
        assert answer.json()["options"]["port"] == ports[name]
        assert states(http)[name] == "healthy"
    # Interleaved: two clients at once, each for its own service, three times each.
    seen: dict[str, list[tuple[int, int]]] = {"comfyui": [], "ollama": []}

    def client_of(name: str) -> None:
        with httpx.Client(base_url=str(http.base_url), headers=AUTH, timeout=90) as client:
            for _ in range(3):
                answer = client.get(f"/svc/{name}/info")
                port = answer.json()["options"]["port"] if answer.status_code == 200 else 0
                seen[name].append((answer.status_code, port))

    threads = [threading.Thread(target=client_of, args=(n,)) for n in seen]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    for name, answers in seen.items():
        assert answers == [(200, ports[name])] * 3, (name, answers)
    assert SimGpu(tmp_path / "state" / "simgpu").ooms() == []
    no_leases(http)


def test_a_service_that_cannot_fit_is_refused_503_with_retry_after(
    serve: Serve, tmp_path: Path
) -> None:
    daemon = serve(write_config(tmp_path, proxy_config(tmp_path, wait_s=1.5)))
    sim = SimGpu(tmp_path / "state" / "simgpu")
    # A foreign process holds all but 1 GiB: vidi's 4 GiB cannot fit until it leaves.
    sim.allocate(24576 - 1024, pid=os.getpid())
    try:
        with httpx.Client(base_url=daemon.url, headers=AUTH, timeout=60) as http:
            t0 = time.monotonic()
            answer = http.get("/svc/vidi/info")
            took = time.monotonic() - t0
            assert answer.status_code == 503, answer.text
            assert answer.headers["content-type"] == PROBLEM
            assert int(answer.headers["retry-after"]) >= 1
            problem = answer.json()
            assert problem["type"] == "urn:gpusm:service-unavailable"
            assert problem["service"] == "vidi"
            assert problem["need_mib"] == 4096
            assert problem["free_mib"] <= 1024
            assert took < 1.5 + 3.0
            assert states(http)["vidi"] == "stopped"
            no_leases(http)
    finally:
        sim.release(pid=os.getpid())


def test_an_upstream_that_refuses_connections_is_a_502(serve: Serve, tmp_path: Path) -> None:
    doc = proxy_config(tmp_path)
    doc["services"]["vidi"]["upstream"] = f"http://127.0.0.1:{free_port()}"
    daemon = serve(write_config(tmp_path, doc))
    with httpx.Client(base_url=daemon.url, headers=AUTH, timeout=60) as http:
        answer = http.get("/svc/vidi/info")
        assert answer.status_code == 502, answer.text
        assert answer.headers["content-type"] == PROBLEM
        assert answer.json()["type"] == "urn:gpusm:upstream-unreachable"
        # It was started (it is healthy: its health check answers), and is left idle.
        assert states(http)["vidi"] == "healthy"
        no_leases(http)


def test_a_client_that_hangs_up_while_its_service_starts_drains_that_start(
    http: httpx.Client,
) -> None:
    with (
        httpx.Client(base_url=str(http.base_url), headers=AUTH, timeout=0.1) as impatient,
        pytest.raises(httpx.ReadTimeout),
    ):
        impatient.get("/svc/comfyui/info")
    # Nobody else waits for it: the start is drained, and no lease is left.
    eventually(lambda: states(http)["comfyui"] == "stopped", 30, "comfyui drained")
    events = http.get("/gpu/events", params={"service": "comfyui"}).json()["events"]
    types = [e["type"] for e in events]
    assert types.index("StartRequested") < types.index("DrainRequested")
    drain = next(e for e in events if e["type"] == "DrainRequested")
    assert "stopped waiting before it was ready" in drain["data"]["reason"]
    assert drain["data"]["by"].startswith("proxy:admin:")
    no_leases(http)


def test_unknown_service_is_a_404_problem(http: httpx.Client) -> None:
    answer = http.get("/svc/nope/info")
    assert answer.status_code == 404
    assert answer.json()["type"] == "urn:gpusm:unknown-name"
    assert answer.json()["kind"] == "service"


# ------------------------------------------------------------------ /v1 and /api by model
def test_a_model_is_routed_to_its_service_through_ollamas_api(
    http: httpx.Client, doc: dict[str, Any]
) -> None:
    answer = http.post("/api/generate", json=generate("fake-model"))
    assert answer.status_code == 200, answer.text
    assert answer.json()["response"] == "ok"
    assert states(http)["ollama"] == "healthy"
    assert states(http)["cosyvoice"] == "stopped"
    # A glob: qwen* (cosyvoice) comes before q* (vidi) in the config.
    qwen = http.post("/api/generate", json=generate("qwen-tts"))
    assert qwen.status_code == 200, qwen.text
    assert qwen.json()["model"] == "qwen-tts"
    assert states(http)["cosyvoice"] == "healthy"
    assert states(http)["vidi"] == "stopped"
    # Without a body: ?model= (Ollama's GET /api/ps answers from the model's server).
    ps = http.get("/api/ps", params={"model": "fake-model"})
    assert ps.status_code == 200, ps.text
    assert [m["name"] for m in ps.json()["models"]] == ["fake-model"]
    no_leases(http)


def streaming_daemon(serve: Serve, tmp_path: Path, tokens_per_s: float) -> ThreadedServer:
    doc = proxy_config(tmp_path)
    ollama = doc["services"]["ollama"]
    ollama["command"] = [*ollama["command"], "--tokens-per-s", str(tokens_per_s)]
    return serve(write_config(tmp_path, doc))


def test_a_stream_arrives_chunk_by_chunk_under_a_lease_until_its_last_byte(
    serve: Serve, tmp_path: Path
) -> None:
    daemon = streaming_daemon(serve, tmp_path, tokens_per_s=10)
    with httpx.Client(base_url=daemon.url, headers=AUTH, timeout=60) as http:
        http.get("/svc/ollama/health")  # warm: the timings below are the stream's only
        arrivals: list[tuple[float, dict[str, Any]]] = []
        leases_meanwhile: list[dict[str, str]] = []
        body = generate("fake-model", tokens=5, stream=True)
        with http.stream("POST", "/api/generate", json=body) as answer:
            assert answer.status_code == 200
            assert answer.headers["content-type"] == "application/x-ndjson"
            assert answer.headers.get("connection") != "close"  # the upstream's, hop-by-hop
            for line in answer.iter_lines():
                arrivals.append((time.monotonic(), json.loads(line)))
                if len(arrivals) == 1:
                    leases_meanwhile.append(status(http)["leases"])
        texts = [doc.get("response") for _, doc in arrivals]
        assert texts == [f"fake-model-{i} " for i in range(1, 6)] + [""]
        assert arrivals[-1][1]["done"] is True
        # The first token reached the client while the others were still being produced.
        assert arrivals[-1][0] - arrivals[0][0] >= 0.3
        # While it streamed, the request held a lease of its own on ollama; not after.
        ((client, phase),) = leases_meanwhile[0].items()
        assert client.startswith("proxy:admin:")
        assert phase == "service:ollama"
        no_leases(http)


def test_a_client_that_hangs_up_mid_stream_ends_its_lease(serve: Serve, tmp_path: Path) -> None:
    daemon = streaming_daemon(serve, tmp_path, tokens_per_s=20)
    with httpx.Client(base_url=daemon.url, headers=AUTH, timeout=60) as http:
        body = generate("fake-model", tokens=10_000, stream=True)  # about 8 minutes
        with http.stream("POST", "/api/generate", json=body) as answer:
            lines = answer.iter_lines()
            assert json.loads(next(lines))["response"] == "fake-model-1 "
            assert len(status(http)["leases"]) == 1
        # Leaving the block closes the connection mid-answer.
        no_leases(http)
        assert states(http)["ollama"] == "healthy"


def test_a_preemption_waits_for_a_proxied_stream_to_finish(serve: Serve, tmp_path: Path) -> None:
    # ollama streams 8 tokens in about 0.8 s; its drain_timeout_s is 2 s.
    daemon = streaming_daemon(serve, tmp_path, tokens_per_s=10)
    with httpx.Client(base_url=daemon.url, headers=AUTH, timeout=60) as http:
        lines: list[dict[str, Any]] = []
        first = threading.Event()

        def stream() -> None:
            body = generate("fake-model", tokens=8, stream=True)
            with http.stream("POST", "/api/generate", json=body) as answer:
                for line in answer.iter_lines():
                    lines.append(json.loads(line))
                    first.set()

        reader = threading.Thread(target=stream)
        reader.start()
        assert first.wait(30)
        # comfyui (priority 100) needs ollama's room: ollama is drained, not cut off.
        entered = http.post("/gpu/phase", json={"phase": "video", "client": "w"})
        reader.join(30)
        assert entered.status_code == 200, entered.text
        assert [n["service"] for n in entered.json()["stopped"]] == ["ollama"]
        assert len(lines) == 9
        assert lines[-1]["done"] is True
        assert states(http)["ollama"] == "stopped"
        eventually(lambda: list(status(http)["leases"]) == ["w"], 10, "only w's lease")
        assert SimGpu(tmp_path / "state" / "simgpu").ooms() == []


def test_v1_models_lists_the_map_and_starts_nothing(http: httpx.Client) -> None:
    answer = http.get("/v1/models")
    assert answer.status_code == 200
    listed = answer.json()
    assert listed["object"] == "list"
    assert [(m["id"], m["owned_by"]) for m in listed["data"]] == [
        ("fake-model", "ollama"),
        ("tts-1", "cosyvoice"),
    ]
    assert listed["gpusm_patterns"] == [
        {"pattern": "qwen*", "service": "cosyvoice"},
        {"pattern": "q*", "service": "vidi"},
    ]
    assert set(states(http).values()) == {"stopped"}
    assert status(http)["leases"] == {}


def test_an_unknown_model_is_a_404_naming_the_known_ones(http: httpx.Client) -> None:
    answer = http.post("/v1/chat/completions", json={"model": "gpt-9", "messages": []})
    assert answer.status_code == 404
    assert answer.headers["content-type"] == PROBLEM
    problem = answer.json()
    assert problem["type"] == "urn:gpusm:unknown-name"
    assert problem["kind"] == "model"
    assert problem["name"] == "gpt-9"
    assert problem["known"] == list(MODELS)
    # A request that names no model at all says how to name one.
    bare = http.post("/v1/chat/completions", json={"messages": []})
    assert bare.status_code == 422
    assert "model" in bare.json()["detail"]
    assert set(states(http).values()) == {"stopped"}
    assert status(http)["leases"] == {}


def test_a_body_too_large_to_read_for_its_model_is_a_413(http: httpx.Client) -> None:
    big = b'{"model": "fake-model", "prompt": "' + b"x" * (1 << 20) + b'"}'
    answer = http.post("/api/generate", content=big, headers={"content-type": "application/json"})
    assert answer.status_code == 413
    assert answer.json()["type"] == "urn:gpusm:content-too-large"
    assert set(states(http).values()) == {"stopped"}


def test_the_proxy_needs_the_token(daemon: ThreadedServer) -> None:
    with httpx.Client(base_url=daemon.url, timeout=30) as anonymous:
        for method, path in [
            ("GET", "/svc/vidi/info"),
            ("POST", "/v1/chat/completions"),
            ("GET", "/v1/models"),
            ("POST", "/api/generate"),
            ("DELETE", "/svc/vidi/anything"),
        ]:
            answer = anonymous.request(method, path, json={"model": "fake-model"})
            assert answer.status_code == 401, (method, path)
            assert answer.headers["content-type"] == PROBLEM
            assert answer.headers["www-authenticate"].startswith("Bearer")
        wrong = anonymous.get("/svc/vidi/info", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        # and a foreign Host is refused before anything else, as on every route
        rebound = anonymous.get("/svc/vidi/info", headers={**AUTH, "Host": "evil.example"})
        assert rebound.status_code == 421
        states_now = {
            s["name"]: s["state"] for s in anonymous.get("/gpu/status").json()["services"]
        }
    assert set(states_now.values()) == {"stopped"}


# ------------------------------------------------------------------ the parts, in process
def test_exact_names_win_then_globs_in_config_order() -> None:
    models = {"q*": "a", "qwen*": "b", "qwen2.5:7b": "c", "llama3*": "d"}
    assert route_model(models, "qwen2.5:7b") == "c"
    assert route_model(models, "qwen3") == "a"  # q* comes first
    assert route_model(models, "llama3.1") == "d"
    assert route_model(models, "mistral") is None
    assert route_model(models, "q*") == "a"  # a pattern is never an exact name
    assert model_list(models)["data"] == [
        {"id": "qwen2.5:7b", "object": "model", "created": 0, "owned_by": "c"}
    ]


@pytest.mark.parametrize(
    ("body", "model"),
    [
        (b'{"model": "m1", "x": 1}', "m1"),
        (b'{"model": 3}', None),
        (b'["model"]', None),
        (b"not json", None),
        (b"", None),
        (b'{"model": ""}', None),
    ],
)
def test_the_model_comes_from_a_json_object_body(body: bytes, model: str | None) -> None:
    assert model_in_body(body) == model


def test_only_bodies_that_can_name_a_model_are_read() -> None:
    assert names_model_in_body(None)
    assert names_model_in_body("application/json; charset=utf-8")
    assert names_model_in_body("application/x-www-form-urlencoded")  # curl -d
    assert not names_model_in_body("multipart/form-data; boundary=x")
    assert not names_model_in_body("audio/wav")


def _request(headers: list[tuple[str, str]]) -> Request:
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/svc/a/b",
        "query_string": b"",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers],
        "client": ("127.0.0.9", 5000),
        "server": ("127.0.0.1", 7723),
        "scheme": "http",
    }
    return Request(scope)


def test_hop_by_hop_headers_and_the_credential_stay_behind() -> None:
    request = _request(
        [
            ("Host", "127.0.0.1:7723"),
            ("Authorization", f"Bearer {TOKEN}"),
            ("Connection", "keep-alive, X-Private"),
            ("X-Private", "1"),
            ("Keep-Alive", "timeout=5"),
            ("TE", "trailers"),
            ("Proxy-Authorization", "Basic x"),
            ("Upgrade", "h2c"),
            ("Content-Length", "12"),
            ("Content-Type", "application/json"),
            ("X-Forwarded-For", "10.0.0.1"),
            ("Accept", "text/event-stream"),
        ]
    )
    sent = request_headers(request, keep_length=True)
    assert sent == [
        ("content-type", "application/json"),
        ("accept", "text/event-stream"),
        ("content-length", "12"),
        ("x-forwarded-for", "10.0.0.1, 127.0.0.9"),
        ("x-forwarded-proto", "http"),
        ("x-forwarded-host", "127.0.0.1:7723"),
    ]
    read = request_headers(request, keep_length=False)
    assert "content-length" not in dict(read)
    upstream = UpstreamResponse(
        UpstreamPool(),
        ("127.0.0.1", 80),
        cast(Any, None),  # no connection: only the headers are read
        200,
        [
            (b"content-type", b"text/event-stream"),
            (b"transfer-encoding", b"chunked"),
            (b"connection", b"close"),
            (b"set-cookie", b"a=1"),
            (b"set-cookie", b"b=2"),
        ],
        ("chunked", 0),
        keep_alive=False,
    )
    assert response_headers(upstream) == [
        (b"content-type", b"text/event-stream"),
        (b"set-cookie", b"a=1"),
        (b"set-cookie", b"b=2"),
    ]


def test_upstream_failures_are_502_and_timeouts_504() -> None:
    refused = upstream_problem("s", "http://x", UpstreamError("cannot connect: refused"))
    assert (refused.status, refused.slug) == (502, "upstream-unreachable")
    slow = upstream_problem("s", "http://x", UpstreamError("no answer", timed_out=True))
    assert (slow.status, slow.slug) == (504, "upstream-timeout")
    assert "no answer" in slow.detail


# ------------------------------------------------------------------ an unmodified app
def test_the_official_openai_client_works_unchanged_through_v1(
    daemon: ThreadedServer, http: httpx.Client
) -> None:
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{daemon.url}/v1", api_key=TOKEN, max_retries=0)
    listed = [m.id for m in client.models.list().data]
    assert "fake-model" in listed
    assert states(http)["ollama"] == "stopped"  # listing starts nothing
    answer = client.chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": "hi"}], max_tokens=3
    )
    assert answer.choices[0].message.content == "fake-model-1 fake-model-2 fake-model-3 "
    # Streamed: the chunks arrive as the fake produces them, not all at the end.
    stamps: list[float] = []
    text = ""
    stream = client.chat.completions.create(
        model="fake-model",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=6,
        stream=True,
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            stamps.append(time.monotonic())
            text += chunk.choices[0].delta.content
    assert text == "".join(f"fake-model-{i} " for i in range(1, 7))
    assert stamps[-1] - stamps[0] > 0.05  # spaced at the fake's tokens per second
    assert starts(http, "ollama") == 1
    no_leases(http)


def test_a_cold_proxied_request_is_audited_and_counted(http: httpx.Client) -> None:
    chat = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}
    assert http.post("/v1/chat/completions", json=chat).status_code == 200
    assert http.get("/svc/ollama/health").status_code == 200  # warm: no audit event
    audited = http.get("/gpu/events", params={"type": "ProxiedRequest"}).json()["events"]
    assert len(audited) == 1
    data = audited[0]["data"]
    assert (data["route"], data["model"], data["service"]) == (
        "POST /v1/chat/completions",
        "fake-model",
        "ollama",
    )
    assert data["started"] == ["ollama"]
    assert data["client"].startswith("proxy:admin:")
    assert http.post("/v1/chat/completions", json={**chat, "messages": []}).status_code == 400
    no_leases(http)
    metrics = http.get("/metrics").text
    assert 'gpusm_proxy_requests_total{code="200",service="ollama"} 2.0' in metrics
    assert 'gpusm_proxy_requests_total{code="400",service="ollama"} 1.0' in metrics
    assert 'gpusm_proxy_wait_seconds_count{service="ollama"} 3.0' in metrics
    assert 'gpusm_proxy_inflight{service="ollama"} 0.0' in metrics
