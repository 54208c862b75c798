"""POST /gpu/reload: the daemon reads its file again; a bad file changes nothing."""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable
from pathlib import Path

import httpx

from gpusm.api.threaded import ThreadedServer
from tests.api.api_helpers import TOKEN, seed_config, write_config


def test_reload_over_http_applies_a_valid_file_and_refuses_a_bad_one(
    serve: Callable[..., ThreadedServer], tmp_path: Path
) -> None:
    doc = seed_config(tmp_path)
    path = write_config(tmp_path, doc)
    server = serve(path)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=server.url, headers=headers, timeout=60) as http:
        before = http.get("/gpu/status").json()["config_hash"]
        assert len(before) == 12

        path.write_text("services:\n  vidi: {vram_mib: [oops]\n")
        bad = http.post("/gpu/reload")
        assert bad.status_code == 422, bad.text
        assert bad.json()["type"].endswith("reload-refused")
        assert "YAML syntax error" in bad.json()["detail"]
        assert http.get("/gpu/status").json()["config_hash"] == before

        new = copy.deepcopy(doc)
        new["services"]["vidi"]["priority"] = 41
        new["api"]["lease_ttl_s"] = 5
        write_config(tmp_path, new)
        good = http.post("/gpu/reload", json={"by": "ops"})
        assert good.status_code == 200, good.text
        assert good.json()["changed"] == ["vidi"]
        after = http.get("/gpu/status").json()
        assert after["config_hash"] == good.json()["config_hash"] != before
        # The API's own settings follow the file: new leases get the new TTL.
        http.post("/gpu/phase", json={"phase": "tts", "client": "w"}).raise_for_status()
        assert http.get("/gpu/status").json()["lease_expires_s"]["w"] <= 5

        assert httpx.post(f"{server.url}/gpu/reload").status_code == 401


def test_the_daemon_keeps_answering_100_status_readers_through_a_reload(
    serve: Callable[..., ThreadedServer], tmp_path: Path
) -> None:
    doc = seed_config(tmp_path)
    path = write_config(tmp_path, doc)
    server = serve(path)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=server.url, headers=headers, timeout=60) as http:
        http.post("/gpu/phase", json={"phase": "tts", "client": "w"}).raise_for_status()
        pid = _pid(http, "cosyvoice")
    start = threading.Barrier(101)
    answers: list[int] = []
    errors: list[BaseException] = []

    def reader() -> None:
        try:
            with httpx.Client(base_url=server.url, timeout=30) as client:
                start.wait(timeout=30)
                for _ in range(5):  # bounded: 500 reads in all
                    answers.append(client.get("/gpu/status").status_code)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    readers = [threading.Thread(target=reader) for _ in range(100)]
    for thread in readers:
        thread.start()
    new = copy.deepcopy(doc)
    new["services"]["vidi"]["priority"] = 39
    write_config(tmp_path, new)
    start.wait(timeout=30)
    with httpx.Client(base_url=server.url, headers=headers, timeout=60) as http:
        reloaded = http.post("/gpu/reload")
        for thread in readers:
            thread.join(timeout=60)
        assert reloaded.status_code == 200, reloaded.text
        assert errors == []
        assert answers == [200] * 500
        assert _pid(http, "cosyvoice") == pid  # unchanged: the same process


def _pid(http: httpx.Client, name: str) -> int:
    services = http.get("/gpu/status").json()["services"]
    found: int = next(s["pid"] for s in services if s["name"] == name)
    return found
