"""Fixtures for the dashboard's browser tests: Debian's Chromium driven by Playwright.

The browser is the system's ``/usr/bin/chromium`` (or ``$GPUSM_CHROMIUM``); Playwright
never downloads one. Without it (or without the ``playwright`` package) the tests skip
with the reason, except in CI (``CI=true``), where that is a failure.

One daemon (``gpusm serve`` as a real subprocess, on the simulated GPU with the fake
model servers) and one browser serve every test of a module: starting them is most of
the cost.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.api.api_helpers import TOKEN, seed_config, write_config
from tests.api.daemon_proc import Daemon

CHROMIUM = os.environ.get("GPUSM_CHROMIUM", "/usr/bin/chromium")


def _missing(why: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI needs a browser for the dashboard tests: {why}")
    pytest.skip(f"{why}; to run the browser tests: apt-get install chromium")


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    """A headless Chromium browser (Playwright's ``Browser``)."""
    if shutil.which(CHROMIUM) is None:
        _missing(f"no Chromium at {CHROMIUM}")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("the playwright package is not installed (pip install -e '.[dev]')")
    with sync_playwright() as driver:
        browser = driver.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"], headless=True
        )
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """``gpusm serve`` on the seed config (a simulated 24 GiB GPU, four fake servers)."""
    folder = tmp_path_factory.mktemp("ui")
    doc = seed_config(folder)
    path = write_config(folder, doc)
    served = Daemon(path, f"http://{doc['api']['listen']}", TOKEN)
    try:
        served.wait_ready()
        yield served
    finally:
        served.stop()


@pytest.fixture(scope="module")
def api(daemon: Daemon) -> Iterator[httpx.Client]:
    """An HTTP client for the daemon that sends the token."""
    with httpx.Client(
        base_url=daemon.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60
    ) as client:
        yield client


def _screenshot_dir() -> Path | None:
    found = os.environ.get("GPUSM_SCREENSHOT_DIR")
    return Path(found) if found else None


@pytest.fixture
def screenshot_dir(tmp_path: Path) -> Path:
    """Where a test writes its screenshots: ``$GPUSM_SCREENSHOT_DIR`` (e.g. ``docs``, to
    refresh the README's picture) or the test's own folder."""
    return _screenshot_dir() or tmp_path
