"""The dashboard's static routes (/ui), their security headers, and GET /gpu/timeline."""

from __future__ import annotations

import re
from datetime import datetime

import httpx

from gpusm.api.threaded import ThreadedServer
from gpusm.api.ui import CSP, static_files
from gpusm.wire import PROBLEM_MEDIA_TYPE


def _at(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def test_the_page_and_its_files_load_without_a_token_under_a_strict_csp(
    live: ThreadedServer,
) -> None:
    with httpx.Client(base_url=live.url) as anonymous:
        page = anonymous.get("/ui")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        assert page.headers["content-security-policy"] == CSP
        assert page.headers["x-content-type-options"] == "nosniff"
        assert page.headers["x-frame-options"] == "DENY"
        linked = re.findall(r'(?:src|href)="([^"]+)"', page.text)
        assert "/ui/static/app.js" in linked
        assert "/ui/static/vendor/uplot-1.6.32/uPlot.iife.min.js" in linked
        for url in linked:
            assert url.startswith("/ui/static/"), f"{url} is not served by the daemon"
            found = anonymous.get(url)
            assert found.status_code == 200, url
            assert found.headers["content-security-policy"] == CSP
        assert (
            anonymous.get("/ui/static/app.js").headers["content-type"].startswith("text/javascript")
        )
        assert anonymous.get("/ui/").text == page.text


def test_the_csp_allows_this_origin_only_and_no_inline_code() -> None:
    rules = dict(part.strip().split(" ", 1) for part in CSP.split(";"))
    assert rules["default-src"] == "'none'"
    for directive in ("script-src", "style-src", "connect-src", "img-src"):
        assert rules[directive] == "'self'", directive
    assert rules["frame-ancestors"] == "'none'"
    html = static_files()["index.html"][0].decode()
    assert not re.search(r"<script(?![^>]*\bsrc=)", html), "inline script"
    assert not re.search(r"<style|\sstyle=|\son[a-z]+=", html), "inline style or handler"
    for name, (content, _) in static_files().items():
        if name.endswith((".html", ".js", ".css")) and "vendor/" not in name:
            assert not re.search(rb"https?://", content), f"{name} names another origin"


def test_unknown_or_escaping_static_paths_are_404_problems(live: ThreadedServer) -> None:
    with httpx.Client(base_url=live.url) as anonymous:
        for path in ("/ui/static/nope.js", "/ui/static/../ui.py", "/ui/static/%2e%2e/ui.py"):
            found = anonymous.get(path)
            assert found.status_code == 404, path
            assert found.headers["content-type"] == PROBLEM_MEDIA_TYPE


def test_the_timeline_has_a_segment_per_start_and_stop_with_the_log_times(
    http: httpx.Client,
) -> None:
    http.post("/gpu/services/vidi/start", json={}).raise_for_status()
    http.post("/gpu/services/vidi/stop", json={}).raise_for_status()
    events = http.get("/gpu/events", params={"service": "vidi"}).json()["events"]
    started = next(e for e in events if e["type"] == "StartRequested")
    stopped = next(e for e in events if e["type"] == "Stopped")
    answer = http.get("/gpu/timeline").json()
    assert answer["head_seq"] >= stopped["seq"]
    timeline = answer["timeline"]
    assert timeline["devices"] == [{"index": 0, "total_mib": 24576}]
    (segment,) = [s for s in timeline["segments"] if s["service"] == "vidi"]
    assert _at(segment["start"]) == _at(started["at"])
    assert _at(segment["end"]) == _at(stopped["at"])
    assert (segment["end_type"], segment["open"]) == ("Stopped", False)
    assert {s["reserved_mib"] for s in segment["steps"]} == {4096}
    # A window after the stop holds nothing.
    later = http.get("/gpu/timeline", params={"since": stopped["at"], "device": 0}).json()
    assert [s for s in later["timeline"]["segments"] if s["service"] == "vidi"] == []


def test_bad_timeline_queries_are_clear_problems(http: httpx.Client) -> None:
    cases = {
        (("since", "yesterday"),): (422, "not an ISO 8601 time"),
        (("device", "7"),): (404, "unknown device '7'"),
        (("device", "-1"),): (422, "device"),
        (("until", "2026-01-01"), ("until", "2026-01-02")): (422, "at most once"),
    }
    for params, (status, words) in cases.items():
        found = http.get("/gpu/timeline", params=list(params))
        assert found.status_code == status, params
        assert found.headers["content-type"] == PROBLEM_MEDIA_TYPE
        assert words in found.json()["detail"], found.json()
    # Like GET /gpu/events: since after until is an empty window, not an error.
    reversed_window = {"since": "2026-02-01T00:00Z", "until": "2026-01-01T00:00Z"}
    empty = http.get("/gpu/timeline", params=reversed_window).json()["timeline"]
    assert (empty["segments"], empty["markers"]) == ([], [])
