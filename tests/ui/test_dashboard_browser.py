"""The dashboard at /ui in a real browser (headless Chromium) against a real daemon.

The daemon runs on the simulated GPU with the fake model servers; the page is driven
as a person would (typing the token, clicking start) and read back from the DOM.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from gpusm.domain.states import ACTIVE_STATES
from tests.api.api_helpers import TOKEN
from tests.api.daemon_proc import Daemon
from tests.seed_helpers import SEED
from tests.support import eventually

ACTIVE = {s.value for s in ACTIVE_STATES}
# How late the row may turn healthy after the HealthPassed event is recorded.
MAX_LAG_S = 2.0


@dataclass
class Watched:
    """A page, and what it said on its console and asked for."""

    page: Any
    errors: list[str] = field(default_factory=list)
    urls: list[str] = field(default_factory=list)


@pytest.fixture
def dashboard(chromium: Any, daemon: Daemon) -> Iterator[Watched]:
    """The dashboard, loaded and ready, in a fresh browser context."""
    context = chromium.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    watched = Watched(page)
    page.on(
        "console",
        lambda m: watched.errors.append(m.text) if m.type in ("error", "warning") else None,
    )
    page.on("pageerror", lambda e: watched.errors.append(f"uncaught: {e}"))
    page.on("requestfailed", lambda r: watched.errors.append(f"failed: {r.url} {r.failure}"))
    page.on("request", lambda r: watched.urls.append(r.url))
    response = page.goto(f"{daemon.url}/ui")
    assert response is not None
    assert response.status == 200
    assert "script-src 'self'" in response.headers["content-security-policy"]
    page.wait_for_selector("body[data-ready=true]", timeout=15_000)
    page.wait_for_selector("#conn[data-state=live]", timeout=15_000)
    try:
        yield watched
    finally:
        context.close()


def _events(api: httpx.Client, service: str | None = None) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    after = 0
    while True:
        params: dict[str, Any] = {"after_seq": after, "limit": 1000}
        if service:
            params["service"] = service
        page = api.get("/gpu/events", params=params).json()
        found += page["events"]
        if page["next_after_seq"] is None:
            return found
        after = page["next_after_seq"]


def _at(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def _log_segments(events: list[dict[str, Any]]) -> set[tuple[str, datetime, datetime | None]]:
    """(service, start, stop or None while running) of every instance, from the log."""
    started: dict[str, datetime] = {}
    found: set[tuple[str, datetime, datetime | None]] = set()
    for event in events:
        name, before, after = event["stream"], event["from_state"], event["to_state"]
        if name == "coordinator" or after is None:
            continue
        if after in ACTIVE and before not in ACTIVE:
            started[name] = _at(event["at"])
        elif after not in ACTIVE and before in ACTIVE and name in started:
            found.add((name, started.pop(name), _at(event["at"])))
    found |= {(name, start, None) for name, start in started.items()}
    return found


def _page_segments(page: Any) -> set[tuple[str, datetime, datetime | None]]:
    bars = page.eval_on_selector_all(
        ".timeline .segment",
        "bs => bs.map(b => [b.dataset.service, b.dataset.start, b.dataset.end, b.dataset.open])",
    )
    return {
        (name, _at(start), None if is_open == "true" else _at(end))
        for name, start, end, is_open in bars
    }


def _row_state(page: Any, name: str) -> str:
    return str(page.get_attribute(f'#services tr[data-service="{name}"]', "data-state"))


def test_page_loads_without_console_errors_and_shows_every_service(dashboard: Watched) -> None:
    page = dashboard.page
    for name in SEED:
        page.wait_for_selector(f'#services tr[data-service="{name}"]')
        assert _row_state(page, name) == "stopped"
    assert page.locator("#devices .device").count() == 1
    assert "total 24,576 MiB" in page.inner_text("#devices")
    assert page.locator(".timeline[data-device='0'] .uplot").count() == 1
    assert page.inner_text("#message") == ""
    assert dashboard.errors == []


def test_start_click_turns_the_row_healthy_within_2s_of_the_health_event(
    dashboard: Watched, api: httpx.Client
) -> None:
    page = dashboard.page
    page.fill("#token", TOKEN)
    page.click("#token-save")
    assert page.evaluate("sessionStorage.getItem('gpusm.token')") == TOKEN
    assert page.input_value("#token") == ""  # not left in the page
    # The moment (browser clock, epoch ms) the row first says healthy.
    page.evaluate(
        """() => {
        const row = document.querySelector('#services tr[data-service="vidi"]');
        new MutationObserver(() => {
            if (row.dataset.state === 'healthy' && !window.healthyAt) window.healthyAt = Date.now();
        }).observe(row, {attributes: true, attributeFilter: ['data-state']});
    }"""
    )
    page.click('#services tr[data-service="vidi"] button.start')
    page.wait_for_function("() => window.healthyAt", timeout=30_000)
    healthy_at = page.evaluate("window.healthyAt") / 1000
    passed = [e for e in _events(api, "vidi") if e["type"] == "HealthPassed"]
    assert passed, "no HealthPassed event for vidi"
    lag = healthy_at - _at(passed[-1]["at"]).timestamp()
    assert lag <= MAX_LAG_S, f"the row turned healthy {lag:.3f}s after the event"
    services = {s["name"]: s for s in api.get("/gpu/status").json()["services"]}
    assert services["vidi"]["state"] == "healthy"
    # The token travels in a header only, never in a URL.
    assert not [u for u in dashboard.urls if TOKEN in u]
    assert dashboard.errors == []


def test_timeline_segments_match_the_event_log_start_and_stop_times(
    dashboard: Watched, api: httpx.Client
) -> None:
    page = dashboard.page
    # Three phases: the last one evicts (a marker), one service stays running.
    for phase in ("analysis", "video", "chat", "tts"):
        api.post("/gpu/phase", json={"phase": phase, "client": "ui-test"}).raise_for_status()
    api.post("/gpu/services/cosyvoice/stop", json={}).raise_for_status()
    # The page follows the event stream: wait until its timeline has caught up with
    # the log (which may still grow: the pipeline prefetches the next phase's service).
    try:
        eventually(lambda: _page_segments(page) == _log_segments(_events(api)), 15, "the timeline")
    except AssertionError:
        assert _page_segments(page) == _log_segments(_events(api))  # says what differs
    events = _events(api)
    expected = _log_segments(events)
    assert {name for name, _, _ in expected} >= {"vidi", "comfyui", "ollama", "cosyvoice"}
    evictions = [e for e in events if e["type"] in ("Evicted", "Preempted")]
    assert evictions
    for event in evictions:
        marker = page.locator(f'.marker[data-seq="{event["seq"]}"]')
        assert marker.count() == 1
        assert event["data"]["reason"] in str(marker.get_attribute("aria-label"))
    # Hovering a marker shows its event's reason.
    last = evictions[-1]
    page.hover(f'.marker[data-seq="{last["seq"]}"]')
    assert page.is_visible("#tooltip")
    assert last["data"]["reason"] in page.inner_text("#tooltip")
    assert dashboard.errors == []


def test_a_screenshot_of_the_dashboard_is_written(
    dashboard: Watched, api: httpx.Client, screenshot_dir: Path
) -> None:
    page = dashboard.page
    api.post("/gpu/phase", json={"phase": "analysis", "client": "ui-test"}).raise_for_status()
    page.wait_for_function(
        """() => document.querySelector('#services tr[data-service="vidi"]').dataset.state
            === 'healthy'""",
        timeout=15_000,
    )
    page.wait_for_timeout(700)  # the timeline's refresh after the last event
    markers = page.locator(".marker")
    if markers.count():
        markers.last.hover()  # its reason, in the picture
    path = screenshot_dir / "dashboard.png"
    page.screenshot(path=str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 20_000
    assert dashboard.errors == []


def test_the_event_table_follows_the_stream_and_filters(
    dashboard: Watched, api: httpx.Client
) -> None:
    page = dashboard.page
    api.post("/gpu/phase", json={"phase": "crawl", "client": "ui-table"}).raise_for_status()
    newest = _events(api)[-1]
    page.wait_for_selector(f'#events tr[data-seq="{newest["seq"]}"]', timeout=5_000)
    streams = "() => [...document.querySelectorAll('#events tbody tr')].map(r => r.dataset.stream)"
    page.select_option("#filter-service", "vidi")
    assert set(page.evaluate(streams)) == {"vidi"}
    page.select_option("#filter-service", "")
    page.select_option("#filter-type", "PhaseEntered")
    types = "() => [...document.querySelectorAll('#events tbody tr')].map(r => r.dataset.type)"
    assert set(page.evaluate(types)) == {"PhaseEntered"}
    page.fill("#filter-text", "ui-table")
    assert len(page.evaluate(types)) == 1
    assert dashboard.errors == []
