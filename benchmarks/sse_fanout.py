"""Figure 12: the event stream's fan-out (``GET /gpu/events/stream``) to 50 subscribers.

``gpusm serve`` runs as its own process on a simulated GPU with two fake model servers
that cannot both fit, so a worker (:class:`gpusm.Client` in a thread) switching between
their phases makes the daemon start, evict and stop services, several events a switch.
Meanwhile 50 subscribers (one asyncio event loop, one httpx streaming connection each,
all from the newest seq at the start) read the stream. Afterwards the log is read with
``GET /gpu/events``: every subscriber must have received exactly those events, in
``seq`` order, each once.

Delay is from the event's ``at`` (stamped just before its append commits, so the
figure includes the commit's fsync and is an upper bound on commit-to-delivery) to the
moment the subscriber has parsed it; both clocks are this machine's wall clock. The
daemon's resident memory is read (psutil) before the subscribers connect and once every
event has reached them.

Baseline, in the same run and the same daemon: one subscriber alone, under the same
worker. The ratio is p99 delay with 50 subscribers over p99 with one.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import psutil

from benchmarks.common import (
    PY,
    Ctx,
    Row,
    fake_service_entry,
    free_port,
    ms,
    percentile,
    write_config,
)
from benchmarks.status_api import start_logged, wait_until

__all__ = [
    "GOAL_P99_S",
    "GOAL_RSS_MIB",
    "SUBSCRIBERS",
    "Subscriber",
    "config_doc",
    "parse_sse",
    "run",
    "summarize",
]

SUBSCRIBERS = 50
GOAL_P99_S = 0.050
GOAL_RSS_MIB = 10.0
MIB = 1024 * 1024
PHASES = ("draw", "speak")


def config_doc(folder: Path, port: int) -> dict[str, Any]:
    """Two services that cannot share the simulated 24 GiB GPU, one phase each."""
    services = {
        "painter": fake_service_entry(16384, 10, 0.05, 0.02, free_port()),
        "speaker": fake_service_entry(16384, 10, 0.05, 0.02, free_port()),
    }
    return {
        "state_dir": str(folder / "state"),
        "gpu": {
            "backend": "sim",
            "reserve_mib": 0,
            "sim": {"total_mib": 24576, "reclaim_lag_s": 0.01},
        },
        "services": services,
        "phases": {"draw": ["painter"], "speak": ["speaker"]},
        "api": {"listen": f"127.0.0.1:{port}"},
    }


def parse_sse(lines: Iterable[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    """(id, decoded data) of each SSE message in ``lines`` (comments and retry skipped)."""
    seq: int | None = None
    data: list[str] = []
    for line in lines:
        if line == "":
            if seq is not None and data:
                yield seq, json.loads("\n".join(data))
            seq, data = None, []
        elif line.startswith("id:"):
            seq = int(line[3:].strip())
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))


@dataclass
class Subscriber:
    """What one subscriber received: (seq, delay in seconds) per event, in arrival order."""

    got: list[tuple[int, float]] = field(default_factory=list)
    connected: bool = False

    def seqs(self) -> list[int]:
        return [seq for seq, _ in self.got]


async def _subscribe(url: str, after: int, into: Subscriber) -> None:
    # A minimal HTTP/1.1 SSE reader: with httpx's streaming, the subscribers' own parsing
    # (50 streams in one Python process, on the daemon's cores) dominated the delays.
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(
            f"GET /gpu/events/stream?after_seq={after} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            "Accept: text/event-stream\r\n\r\n".encode()
        )
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").lower()
        if not head.startswith("http/1.1 200"):
            raise RuntimeError(f"the stream answered {head.splitlines()[0]!r}")
        into.connected = True
        chunked = "transfer-encoding: chunked" in head
        buffer = b""
        while True:
            if chunked:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    return
                buffer += (await reader.readexactly(size + 2))[:-2]
            else:
                data = await reader.read(65536)
                if not data:
                    return
                buffer += data
            *messages, buffer = buffer.split(b"\n\n")
            if messages:
                now = time.time()
                lines = [*"\n\n".join(m.decode() for m in messages).split("\n"), ""]
                for seq, event in parse_sse(lines):
                    into.got.append((seq, now - datetime.fromisoformat(event["at"]).timestamp()))
    finally:
        writer.close()


def _worker(url: str, token: str, seconds: float, errors: list[BaseException]) -> None:
    from gpusm.client import Client

    try:
        with Client(url, token=token, timeout=30) as client:
            deadline = time.monotonic() + seconds
            turn = 0
            while time.monotonic() < deadline:
                client.enter_phase(PHASES[turn % 2], client="worker", timeout=60)
                turn += 1
    except BaseException as exc:  # reported by the caller
        errors.append(exc)


def _logged_seqs(url: str, after: int) -> list[int]:
    seqs: list[int] = []
    with httpx.Client(trust_env=False, timeout=30) as http:
        while True:
            page = http.get(f"{url}/gpu/events", params={"after_seq": after, "limit": 1000}).json()
            seqs += [int(e["seq"]) for e in page["events"]]
            if page["next_after_seq"] is None:
                return seqs
            after = int(page["next_after_seq"])


async def _round(url: str, token: str, count: int, seconds: float, pid: int) -> dict[str, Any]:
    """``count`` subscribers while the worker switches phases for ``seconds``."""
    after = _logged_seqs(url, 0)[-1]
    subs = [Subscriber() for _ in range(count)]
    rss_before = psutil.Process(pid).memory_info().rss
    tasks = [asyncio.create_task(_subscribe(url, after, s)) for s in subs]
    opened = time.monotonic() + 30
    while not all(s.connected for s in subs):  # every stream open before the first event
        if time.monotonic() > opened or any(t.done() for t in tasks):
            raise RuntimeError(f"{sum(not s.connected for s in subs)} streams did not open")
        await asyncio.sleep(0.02)
    errors: list[BaseException] = []
    thread = threading.Thread(target=_worker, args=(url, token, seconds, errors))
    thread.start()
    await asyncio.to_thread(thread.join)
    if errors:
        raise RuntimeError(f"the worker failed: {errors[0]!r}")
    expected = await asyncio.to_thread(_logged_seqs, url, after)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(len(s.got) < len(expected) for s in subs):
        await asyncio.sleep(0.05)
    rss_after = psutil.Process(pid).memory_info().rss
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return summarize(subs, expected) | {"rss_before": rss_before, "rss_after": rss_after}


def summarize(subs: list[Subscriber], expected: list[int]) -> dict[str, Any]:
    """Whether every subscriber got exactly ``expected`` in order, and the delay percentiles."""
    complete = sum(1 for s in subs if s.seqs() == expected)
    delays = [delay for s in subs for _, delay in s.got]
    return {
        "subscribers": len(subs),
        "events": len(expected),
        "complete": complete,
        "received": sum(len(s.got) for s in subs),
        "p50_s": percentile(delays, 50),
        "p99_s": percentile(delays, 99),
        "max_s": max(delays, default=float("nan")),
    }


def run(ctx: Ctx) -> list[Row]:
    """One subscriber, then 50, against one daemon under the same phase-switching worker."""
    seconds = 3.0 if ctx.quick else 10.0
    folder = ctx.folder("sse")
    port = free_port()
    token = secrets.token_urlsafe(24)
    path = write_config(folder, config_doc(folder, port))
    url = f"http://127.0.0.1:{port}"
    log = folder / "serve.log"
    env = {**os.environ, "GPUSM_TOKEN": token}
    daemon = start_logged(
        ctx, [PY, "-m", "gpusm", "serve", "-c", str(path), "--stop-on-exit"], log, env
    )
    try:
        ready = lambda r: r.status_code == 200 and r.json().get("status") == "ok"  # noqa: E731
        wait_until(f"{url}/healthz", ready, 60, daemon, log)
        errors: list[BaseException] = []
        _worker(url, token, 1.0, errors)  # warm: both services started once, code paths hot
        if errors:
            raise RuntimeError(f"warm-up failed: {errors[0]!r}")
        one = asyncio.run(_round(url, token, 1, seconds, daemon.pid))
        ctx.log(f"figure 12: 1 subscriber: {one}")
        many = asyncio.run(_round(url, token, SUBSCRIBERS, seconds, daemon.pid))
        ctx.log(f"figure 12: {SUBSCRIBERS} subscribers: {many}")
    finally:
        ctx.guard.stop(daemon)
    growth = (many["rss_after"] - many["rss_before"]) / MIB
    growth_one = (one["rss_after"] - one["rss_before"]) / MIB
    all_got = many["complete"] == SUBSCRIBERS and one["complete"] == 1
    return [
        Row(
            figure=f"12. Event stream to {SUBSCRIBERS} subscribers while phases switch: all events",
            gpusm=(
                f"{many['complete']}/{SUBSCRIBERS} got all {many['events']} events in order, once"
            ),
            baseline=f"1 subscriber: {one['complete']}/1 got all {one['events']}",
            ratio=None,
            goal="every subscriber, every event",
            met=all_got,
            details={"fifty": many, "one": one, "worker_s": seconds},
        ),
        Row(
            figure=f"12. Event stream, {SUBSCRIBERS} subscribers: delay from commit to delivery",
            gpusm=f"p50 {ms(many['p50_s'])}, p99 {ms(many['p99_s'])}, max {ms(many['max_s'])}",
            baseline=f"1 subscriber: p50 {ms(one['p50_s'])}, p99 {ms(one['p99_s'])}",
            ratio=many["p99_s"] / one["p99_s"],
            goal=f"p99 ≤ {ms(GOAL_P99_S, 0)}",
            met=many["p99_s"] <= GOAL_P99_S,
            details={"fifty_delays": many, "one_delays": one},
        ),
        Row(
            figure=f"12. Event stream, {SUBSCRIBERS} subscribers: daemon memory growth",
            gpusm=f"{growth:+.1f} MiB (RSS {many['rss_after'] / MIB:.0f} MiB)",
            baseline=f"1 subscriber: {growth_one:+.1f} MiB",
            ratio=None,
            goal=f"≤ {GOAL_RSS_MIB:.0f} MiB",
            met=growth <= GOAL_RSS_MIB,
            details={
                "rss_fifty": [many["rss_before"], many["rss_after"]],
                "rss_one": [one["rss_before"], one["rss_after"]],
            },
        ),
    ]
