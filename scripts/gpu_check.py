#!/usr/bin/env python3
"""Check gpusm's NVML probe on a real NVIDIA GPU (not run in CI: it needs a GPU).

What it proves, on device ``--device``:

1. attribution: three child processes each allocate a known amount of real GPU memory
   (torch.cuda, else cupy, else libcuda through ctypes: gpu_check/cudamem.py); NvmlProbe
   must attribute to each child's pid its request plus one CUDA context (measured with a
   child that allocates nothing), within ±64 MiB;
2. reclaim: after SIGTERM, the memory must show as free through NvmlProbe within 5 s;
3. latency: p50/p99 of ``NvmlProbe.snapshot()`` (memory info + both process lists) over
   ``--calls`` calls, with the children still holding memory.

It prints a JSON report, writes it to ``$OUT/gpu_check.json`` when ``OUT`` is set, and
exits 0 if every check passed, 1 if one failed, 2 if it could not run (no NVML, no way to
allocate). gpusm is imported from this repo, its dependencies from the environment:
``scripts/gpu_check/run.py`` runs this with the offline wheel bundle on the path.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts" / "gpu_check"))

from cudamem import NoBackend, OutOfMemory, allocate  # noqa: E402

from gpusm.errors import GpuProbeError  # noqa: E402 - after the sys.path insert
from gpusm.gpu.nvml import NvmlProbe  # noqa: E402

MIB = 1024 * 1024


# ---------------------------------------------------------------- child side
def child(mib: int, device: int, backend: str) -> int:
    """Allocate ``mib`` MiB on ``device`` (0: only a CUDA context), say so, hold until killed."""
    try:
        block = allocate(mib, device, backend)
    except (NoBackend, OutOfMemory) as exc:
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}), flush=True)
        return 2
    ready = {"ready": os.getpid(), "backend": block.backend, "bytes": block.nbytes}
    print(json.dumps(ready), flush=True)
    sys.stdin.read()  # hold until the parent kills us or closes the pipe
    return 0


# ---------------------------------------------------------------- parent side
class Children:
    """The allocating children; every one is killed on exit, whatever happens."""

    def __init__(self, device: int, backend: str) -> None:
        self.device = device
        self.backend = backend
        self.procs: list[subprocess.Popen[str]] = []

    def start(self, mib: int) -> subprocess.Popen[str]:
        env = dict(os.environ, CUDA_DEVICE_ORDER="PCI_BUS_ID")  # CUDA index = NVML index
        proc = subprocess.Popen(
            [
                *(sys.executable, __file__, "--child", str(mib)),
                *("--device", str(self.device), "--backend", self.backend),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.procs.append(proc)
        return proc

    @staticmethod
    def wait_ready(proc: subprocess.Popen[str], timeout_s: float) -> dict[str, Any]:
        assert proc.stdout is not None
        # torch's import can take a while, but a hung child must not hang the check.
        readable, _, _ = select.select([proc.stdout], [], [], timeout_s)
        line = proc.stdout.readline() if readable else ""
        if not line:
            raise RuntimeError(f"child {proc.pid} did not allocate (exit {proc.poll()})")
        doc = json.loads(line)
        if "ready" not in doc:
            raise RuntimeError(f"child {proc.pid}: {doc}")
        return dict(doc)

    def kill_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=30)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def measure_latency(probe: NvmlProbe, device: int, calls: int) -> dict[str, float]:
    samples = []
    for _ in range(calls):
        started = time.perf_counter()
        probe.snapshot(device)
        samples.append((time.perf_counter() - started) * 1000)
    return {
        "calls": calls,
        "p50_ms": round(statistics.median(samples), 4),
        "p99_ms": round(percentile(samples, 0.99), 4),
        "max_ms": round(max(samples), 4),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    probe = NvmlProbe()
    report: dict[str, Any] = {"device": args.device, "checks": {}}
    children = Children(args.device, args.backend)
    try:
        before = probe.snapshot(args.device)
        report["gpu"] = {"name": before.name, "uuid": before.uuid, "total_mib": before.total_mib}
        report["before"] = {"used_mib": before.used_mib, "processes": dict(before.processes)}

        # A child with no allocation shows what one CUDA context costs on this GPU/driver.
        ctx = children.start(0)
        report["backend"] = children.wait_ready(ctx, args.child_timeout_s)["backend"]
        context_mib = probe.snapshot(args.device).processes.get(ctx.pid, 0)
        report["context_mib"] = context_mib

        procs = [(mib, children.start(mib)) for mib in args.mib]
        for _, proc in procs:
            children.wait_ready(proc, args.child_timeout_s)
        snap = probe.snapshot(args.device)
        attribution = []
        for mib, proc in procs:
            seen = snap.processes.get(proc.pid)
            expected = mib + context_mib
            ok = seen is not None and abs(seen - expected) <= args.tolerance_mib
            attribution.append(
                {
                    "pid": proc.pid,
                    "requested_mib": mib,
                    "expected_mib": expected,
                    "seen_mib": seen,
                    "ok": ok,
                }
            )
        report["attribution"] = attribution
        report["processes_seen"] = dict(snap.processes)
        report["checks"]["attribution"] = all(a["ok"] for a in attribution)

        report["latency"] = measure_latency(probe, args.device, args.calls)

        # Reclaim: SIGTERM every child, then poll until NVML lists none and used is back.
        pids = {proc.pid for proc in children.procs}
        sent = time.monotonic()
        for proc in children.procs:
            proc.send_signal(signal.SIGTERM)
        reclaimed_at = None
        while time.monotonic() - sent < args.reclaim_limit_s * 3:
            now_snap = probe.snapshot(args.device)
            gone = not (pids & set(now_snap.processes))
            if gone and now_snap.used_mib <= before.used_mib + args.tolerance_mib:
                reclaimed_at = time.monotonic()
                break
            time.sleep(0.01)
        exited = [proc.wait(timeout=30) for proc in children.procs]
        reclaim_s = None if reclaimed_at is None else round(reclaimed_at - sent, 3)
        report["reclaim"] = {
            "seconds": reclaim_s,
            "limit_s": args.reclaim_limit_s,
            "exit_codes": exited,
        }
        report["checks"]["reclaim"] = reclaim_s is not None and reclaim_s <= args.reclaim_limit_s
    finally:
        children.kill_all()
        probe.close()
    report["ok"] = all(report["checks"].values()) and bool(report["checks"])
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", type=int, default=0, help="NVML/CUDA device index.")
    parser.add_argument(
        "--mib",
        type=int,
        nargs=3,
        default=[512, 1024, 1536],
        help="MiB each of the three children allocates.",
    )
    parser.add_argument("--calls", type=int, default=2000, help="snapshot() calls to time.")
    parser.add_argument("--tolerance-mib", type=int, default=64)
    parser.add_argument("--reclaim-limit-s", type=float, default=5.0)
    parser.add_argument("--child-timeout-s", type=float, default=180.0)
    parser.add_argument(
        "--backend",
        default="auto",
        choices=["auto", "torch", "cupy", "cuda"],
        help="How children allocate (auto: torch, else cupy, else libcuda through ctypes).",
    )
    parser.add_argument("--child", type=int, metavar="MIB", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        return child(args.child, args.device, args.backend)
    try:
        report = run(args)
        code = 0 if report["ok"] else 1
    except (GpuProbeError, RuntimeError) as exc:
        report = {"ok": False, "error": str(exc)}
        code = 2
    text = json.dumps(report, indent=2, default=str)
    print(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_check.json").write_text(text + "\n")
    return code


if __name__ == "__main__":
    sys.exit(main())
