"""Load on loopback: 100 concurrent /gpu/status readers while a worker switches phases.

The duration is ``$GPUSM_LOAD_S`` seconds (default 5). p50/p99 latencies are printed
(run with ``-s`` to see them). No request may fail.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpusm.client import Client, daemon_url
from tests.api.api_helpers import TOKEN, seed_config, write_config
from tests.api.daemon_proc import Daemon

READERS = 100


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    doc = seed_config(tmp_path)
    proc = Daemon(write_config(tmp_path, doc), daemon_url(doc["api"]["listen"]), TOKEN)
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


async def get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str) -> int:
    """One keep-alive HTTP/1.1 GET; returns the status code (body read and checked)."""
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    await writer.drain()
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    length = next(int(h.split(":")[1]) for h in head if h.lower().startswith("content-length:"))
    body = await reader.readexactly(length)
    assert body.startswith(b"{")
    return int(head[0].split()[1])


async def read_status(url: str, until: float, latencies: list[float], errors: list[str]) -> None:
    # A bare asyncio client: httpx's async pool, not the daemon, limits 100 connections.
    host, _, port = url.removeprefix("http://").rpartition(":")

    async def reader() -> None:
        stream, writer = await asyncio.open_connection(host, int(port))
        try:
            while time.monotonic() < until:
                t0 = time.monotonic()
                try:
                    code = await get(stream, writer, "/gpu/status")
                except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                    errors.append(repr(exc))
                    return
                latencies.append(time.monotonic() - t0)
                if code != 200:
                    errors.append(f"HTTP {code}")
        finally:
            writer.close()
            await writer.wait_closed()

    await asyncio.gather(*(reader() for _ in range(READERS)))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_hundred_status_readers_see_no_errors_while_a_worker_switches_phases(
    daemon: Daemon,
) -> None:
    duration = float(os.environ.get("GPUSM_LOAD_S", "5"))
    until = time.monotonic() + duration
    switches: list[str] = []
    worker_errors: list[BaseException] = []

    def worker() -> None:
        phases = ["analysis", "tts", "video", "render"]
        with Client(daemon.url, token=TOKEN) as client:
            while time.monotonic() < until:
                try:
                    client.enter_phase(phases[len(switches) % len(phases)], client="loader")
                except BaseException as exc:  # reported below
                    worker_errors.append(exc)
                    return
                switches.append("ok")

    switcher = threading.Thread(target=worker)
    switcher.start()
    latencies: list[float] = []
    errors: list[str] = []
    asyncio.run(read_status(daemon.url, until, latencies, errors))
    switcher.join(120)
    assert not switcher.is_alive()
    assert errors == []
    assert worker_errors == []
    assert len(switches) >= 2
    cuts = statistics.quantiles(latencies, n=100)
    print(
        f"\nload: {READERS} readers for {duration:.0f}s: {len(latencies)} requests "
        f"({len(latencies) / duration:.0f}/s), p50 {cuts[49] * 1000:.1f} ms, "
        f"p99 {cuts[98] * 1000:.1f} ms, max {max(latencies) * 1000:.1f} ms; "
        f"{len(switches)} phase switches"
    )
    # Generous: a loaded 2-core box must still answer a status read within seconds.
    assert cuts[98] < 10.0
