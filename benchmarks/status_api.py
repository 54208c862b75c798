"""Figure 7: the daemon's ``GET /gpu/status`` under load, and its memory after a pipeline.

``gpusm serve`` runs as its own process on a simulated GPU with the original plan's
services (loads and work scaled down); a worker first runs a few pipeline items
through it with :class:`gpusm.Client`, then the daemon's resident memory is read.
Then 50 concurrent loopback clients (one asyncio event loop, one keep-alive
connection each, a minimal HTTP/1.1 client)
read ``/gpu/status`` for a few seconds; throughput counts answers completed in the
window, latency is per request. One reader alone is timed too: the daemon computes one
status for all readers that arrive while it is computing one, so only a lone reader
shows what one status costs.

Baseline, in the same run, alternating with gpusm: bare FastAPI + uvicorn with the same
settings answering the same JSON body from memory (:mod:`benchmarks.baseline_app`),
and its resident memory. Reported as n/a while ``gpusm.api`` does not exist.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import secrets
import subprocess
import time
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
    median,
    ms,
    percentile,
    write_config,
)
from benchmarks.pipeline import PIPELINE, SERVICES

__all__ = ["GOAL_LONE_P50_S", "api_missing", "load_test", "run", "start_logged", "wait_until"]

CLIENTS = 50
SCALE = 0.1
MIB = 1024 * 1024
GOAL_LONE_P50_S = 0.001


def api_missing() -> str | None:
    """Why the daemon's API cannot be benchmarked (a missing module), or None."""
    for module in ("gpusm.api.app", "gpusm.client"):
        try:
            importlib.import_module(module)
        except ImportError as exc:
            return f"{module}: {exc}"
    return None


async def _get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> int:
    """One keep-alive HTTP/1.1 GET on an open connection; returns the status code."""
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    await reader.readexactly(length)
    return status


async def _load(url: str, clients: int, warm_s: float, measure_s: float) -> dict[str, Any]:
    # A minimal HTTP/1.1 client: httpx's async pool, not the servers, was the bottleneck
    # at 50 connections (throughput fell fourfold from 1 to 50 clients against any server).
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    request = f"GET {parts.path} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()
    latencies: list[float] = []
    errors = 0
    start = time.perf_counter() + warm_s
    stop = start + measure_s

    async def reader() -> None:
        nonlocal errors
        conn_reader, writer = await asyncio.open_connection(host, port)
        try:
            while (now := time.perf_counter()) < stop:
                status = await _get(conn_reader, writer, request)
                done = time.perf_counter()
                if status != 200:
                    errors += 1
                elif start <= done <= stop:
                    latencies.append(done - now)
        finally:
            writer.close()
            await writer.wait_closed()

    await asyncio.gather(*(reader() for _ in range(clients)))
    return {
        "per_s": len(latencies) / measure_s,
        "p50_s": median(latencies),
        "p99_s": percentile(latencies, 99),
        "answers": len(latencies),
        "errors": errors,
    }


def load_test(url: str, clients: int, warm_s: float, measure_s: float) -> dict[str, Any]:
    """``clients`` concurrent readers of ``url``: answers per second, p50 and p99 latency."""
    return asyncio.run(_load(url, clients, warm_s, measure_s))


def wait_until(
    url: str, ok: Any, timeout_s: float, proc: subprocess.Popen[bytes], log: Path
) -> None:
    """Poll ``url`` every 50 ms until ``ok(response)``; fail if ``proc`` exits first."""
    deadline = time.perf_counter() + timeout_s
    with httpx.Client(trust_env=False) as client:
        while time.perf_counter() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{url}: the server exited; see {log}")
            try:
                response = client.get(url, timeout=2)
                if ok(response):
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
    raise RuntimeError(f"{url} not ready within {timeout_s}s; see {log}")


def _config(folder: Path, port: int) -> Path:
    services = {
        n: fake_service_entry(vram, prio, round(load * SCALE, 3), 0.05, free_port())
        for n, (vram, prio, load) in SERVICES.items()
    }
    doc: dict[str, Any] = {
        "state_dir": str(folder / "state"),
        "gpu": {
            "backend": "sim",
            "reserve_mib": 0,
            "sim": {"total_mib": 24576, "reclaim_lag_s": 0.02},
        },
        "services": services,
        "phases": {
            "crawl": [],
            "analysis": ["vidi"],
            "tts": ["cosyvoice"],
            "video": ["comfyui"],
            "render": [],
            "chat": ["ollama"],
        },
        "pipeline": PIPELINE,
        "api": {"listen": f"127.0.0.1:{port}"},
    }
    return write_config(folder, doc)


def _not_available(why: str) -> list[Row]:
    return [
        Row(
            figure=f"7. /gpu/status, {CLIENTS} concurrent clients",
            gpusm="n/a (no API yet)",
            baseline="—",
            ratio=None,
            goal="—",
            met=None,
            details={"why": why},
        )
    ]


def start_logged(
    ctx: Ctx, argv: list[str], log: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start ``argv`` under the guard, its output appended to ``log``."""
    with log.open("ab") as out:
        return ctx.guard.popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)


def run(ctx: Ctx) -> list[Row]:
    """A pipeline through the daemon, its memory, then status under load against the baseline."""
    missing = api_missing()
    if missing is not None:
        return _not_available(missing)
    from gpusm.client import Client

    items, rounds, measure_s = (1, 1, 2.0) if ctx.quick else (2, 2, 3.0)
    folder = ctx.folder("api")
    port, base_port = free_port(), free_port()
    token = secrets.token_urlsafe(24)
    path = _config(folder, port)
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "GPUSM_TOKEN": token}
    daemon = start_logged(
        ctx,
        [PY, "-m", "gpusm", "serve", "-c", str(path), "--stop-on-exit"],
        folder / "serve.log",
        env,
    )
    base: subprocess.Popen[bytes] | None = None
    try:
        wait_until(
            f"{url}/healthz",
            lambda r: r.status_code == 200 and r.json().get("status") == "ok",
            60,
            daemon,
            folder / "serve.log",
        )
        with Client(url, token=token, timeout=30) as worker:
            for _ in range(items):
                for phase in PIPELINE:
                    worker.enter_phase(phase, client="worker", timeout=120)
                    time.sleep(0.05)
            worker.release("worker")
        rss_pipeline = psutil.Process(daemon.pid).memory_info().rss
        body = httpx.get(f"{url}/gpu/status", timeout=10).content
        body_file = str(folder / "status.json")
        Path(body_file).write_bytes(body)
        base = start_logged(
            ctx,
            [PY, "-m", "benchmarks.baseline_app", "--port", str(base_port), "--body", body_file],
            folder / "baseline.log",
        )
        base_url = f"http://127.0.0.1:{base_port}"
        wait_until(
            f"{base_url}/gpu/status",
            lambda r: r.status_code == 200,
            30,
            base,
            folder / "baseline.log",
        )
        rss_base_idle = psutil.Process(base.pid).memory_info().rss
        ours: list[dict[str, Any]] = []
        theirs: list[dict[str, Any]] = []
        ours_1: list[dict[str, Any]] = []
        theirs_1: list[dict[str, Any]] = []
        for _ in range(rounds):
            ours.append(load_test(f"{url}/gpu/status", CLIENTS, 0.5, measure_s))
            theirs.append(load_test(f"{base_url}/gpu/status", CLIENTS, 0.5, measure_s))
            # One reader alone: what one status costs when no other reader shares it.
            ours_1.append(load_test(f"{url}/gpu/status", 1, 0.2, 1.0))
            theirs_1.append(load_test(f"{base_url}/gpu/status", 1, 0.2, 1.0))
        rss_after = psutil.Process(daemon.pid).memory_info().rss
        rss_base = psutil.Process(base.pid).memory_info().rss
    finally:
        if base is not None:
            ctx.guard.stop(base)
        ctx.guard.stop(daemon)
    if any(r["errors"] for r in ours + theirs):
        raise RuntimeError(f"non-200 answers under load: {ours} {theirs}")
    g_rate = median([r["per_s"] for r in ours])
    b_rate = median([r["per_s"] for r in theirs])
    g50, g99 = median([r["p50_s"] for r in ours]), median([r["p99_s"] for r in ours])
    b50, b99 = median([r["p50_s"] for r in theirs]), median([r["p99_s"] for r in theirs])
    g1, b1 = median([r["p50_s"] for r in ours_1]), median([r["p50_s"] for r in theirs_1])
    return [
        Row(
            figure=f"7. /gpu/status, {CLIENTS} concurrent loopback clients",
            gpusm=f"{g_rate:.0f}/s, p50 {ms(g50)}, p99 {ms(g99)}; 1 client: p50 {ms(g1)}",
            baseline=(
                f"bare FastAPI, same JSON bytes: {b_rate:.0f}/s, p50 {ms(b50)}, "
                f"p99 {ms(b99)}; 1 client: p50 {ms(b1)}"
            ),
            ratio=g_rate / b_rate,
            goal="— (throughput ratio)",
            met=None,
            details={
                "gpusm": ours,
                "baseline": theirs,
                "gpusm_one_client": ours_1,
                "baseline_one_client": theirs_1,
                "measure_s": measure_s,
                "body_bytes": len(body),
            },
        ),
        Row(
            figure="7. /gpu/status, lone reader (1 client, keep-alive), p50",
            gpusm=f"p50 {ms(g1, 2)}",
            baseline=f"bare FastAPI, same JSON bytes: p50 {ms(b1, 2)}",
            ratio=g1 / b1,
            goal=f"p50 ≤ {ms(GOAL_LONE_P50_S, 0)}",
            met=g1 <= GOAL_LONE_P50_S,
            details={
                "gpusm_p50_s": [r["p50_s"] for r in ours_1],
                "baseline_p50_s": [r["p50_s"] for r in theirs_1],
            },
        ),
        Row(
            figure=f"7. Daemon resident memory after the pipeline ({items} items)",
            gpusm=f"{rss_pipeline / MIB:.0f} MiB (after the load test: {rss_after / MIB:.0f} MiB)",
            baseline=(
                f"bare FastAPI: {rss_base_idle / MIB:.0f} MiB "
                f"(after the load test: {rss_base / MIB:.0f} MiB)"
            ),
            ratio=rss_pipeline / rss_base_idle,
            goal="—",
            met=None,
            details={
                "daemon_rss_after_pipeline": rss_pipeline,
                "daemon_rss_after_load": rss_after,
                "baseline_rss_idle": rss_base_idle,
                "baseline_rss_after_load": rss_base,
            },
        ),
    ]
