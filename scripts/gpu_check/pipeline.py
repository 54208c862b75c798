"""The seed pipeline through a real Coordinator on a real NVIDIA GPU (``gpu.backend: nvml``).

The plan's four services (comfyui, cosyvoice, vidi, ollama) at the seed's sizes scaled to
the card, so that they oversubscribe it the way 20+4+4+18 GiB oversubscribe 24 GiB; each
is ``holder.py``, a stand-in server that holds that much real GPU memory (less one CUDA
context, which NVML also counts against it). ``--items`` runs of crawl -> analysis -> tts
-> video -> render, then chat, then release everything. Asserts:

- healthy on return: after each phase, its services are healthy and NVML shows each
  one's process holding its memory;
- 0 OOM: no holder failed to allocate (marker files, exit code 3, failed services);
- reclaim: every Stopped event has ``vram_reclaimed`` and ``reclaim_s`` <= the limit;
- the card is back to where it started at the end.

Prints a JSON report (and ``--report PATH``); exits 0 pass, 1 fail, 2 could not run.
Needs gpusm's dependencies on the path (``run.py`` arranges it).
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(REPO))

import yaml  # noqa: E402

from gpusm import Coordinator, EventQuery, GpuProbeError, GpusmError  # noqa: E402
from gpusm.gpu.nvml import NvmlProbe  # noqa: E402

# name: (MiB on the seed's 24 GiB card, priority)
SEED = {"comfyui": (20480, 100), "cosyvoice": (4096, 50), "vidi": (4096, 40), "ollama": (18432, 10)}
SEED_TOTAL_MIB = 24576
PHASES: dict[str, Any] = {
    "crawl": {"services": [], "release": True},
    "analysis": ["vidi"],
    "tts": ["cosyvoice"],
    "video": ["comfyui"],
    "render": {"services": [], "release": True},
    "chat": ["ollama"],
}
PIPELINE = ["crawl", "analysis", "tts", "video", "render"]
RESERVE_MIB = 512
# Left free beyond the reserve: the driver's own wobble, and what the card holds already.
MARGIN_MIB = 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def plan_sizes(total_mib: int, used_mib: int) -> tuple[float, dict[str, int]]:
    """The seed's sizes scaled to what is free on this card, rounded down to 64 MiB."""
    usable = total_mib - used_mib - RESERVE_MIB - MARGIN_MIB
    scale = usable / SEED_TOTAL_MIB
    return scale, {name: int(mib * scale) // 64 * 64 for name, (mib, _) in SEED.items()}


def build_config(
    folder: Path, sizes: dict[str, int], args: argparse.Namespace, context_mib: int
) -> dict[str, Any]:
    services = {}
    for name, (_, priority) in SEED.items():
        port = free_port()
        hold = max(sizes[name] - context_mib - 64, 1)
        command = [sys.executable, str(HERE / "holder.py"), "--mib", str(hold)]
        command += ["--port", str(port), "--device", "0", "--backend", args.backend]
        command += ["--name", name, "--oom-dir", str(folder / "oom")]
        command += ["--run-token", args.run_token]
        services[name] = {
            "command": command,
            "vram_mib": sizes[name],
            "priority": priority,
            "gpu": args.device,
            # The runtime may set CUDA_VISIBLE_DEVICES itself (to the UUID): the same device.
            "env": {"CUDA_VISIBLE_DEVICES": str(args.device), "CUDA_DEVICE_ORDER": "PCI_BUS_ID"},
            "health": {"http": f"http://127.0.0.1:{port}/health", "timeout_s": 120},
            "stop_timeout_s": 10,
            "drain_timeout_s": 10,
        }
    return {
        "state_dir": str(folder / "state"),
        "gpu": {"backend": "nvml", "reserve_mib": RESERVE_MIB, "settle_timeout_s": 15},
        "services": services,
        "phases": PHASES,
        "pipeline": PIPELINE,
    }


def check_phase(
    coordinator: Coordinator, probe: NvmlProbe, device: int, phase: str, sizes: dict[str, int]
) -> dict[str, Any]:
    """Whether ``phase``'s services are healthy and hold their memory, right on return."""
    wanted = PHASES[phase] if isinstance(PHASES[phase], list) else PHASES[phase]["services"]
    status = {s.name: s for s in coordinator.status().services}
    snap = probe.snapshot(device)
    problems = []
    for name in wanted:
        svc = status[name]
        if svc.state != "healthy":
            problems.append(f"{name} is {svc.state}")
            continue
        held = snap.processes.get(svc.pid or -1, 0)
        if held < sizes[name] // 2:  # loaded: far more than a bare context
            problems.append(f"{name} (pid {svc.pid}) holds {held} MiB on the GPU")
    return {"phase": phase, "used_mib": snap.used_mib, "problems": problems}


def run_items(
    coordinator: Coordinator,
    probe: NvmlProbe,
    args: argparse.Namespace,
    sizes: dict[str, int],
    phases: list[dict[str, Any]],
) -> None:
    """``args.items`` runs of the pipeline, then chat once; a row per phase in ``phases``."""
    for item in range(1, args.items + 1):
        for phase in [*PIPELINE, *(["chat"] if item == args.items else [])]:
            result = coordinator.enter_phase(phase, client="gpu-check", timeout=180)
            row = check_phase(coordinator, probe, args.device, phase, sizes)
            row.update(item=item, waited_s=round(result.waited_s, 3))
            row["started"] = list(result.started)
            row["stopped"] = [note.service for note in result.stopped]
            phases.append(row)


def run(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    probe = NvmlProbe()
    try:
        before = probe.snapshot(args.device)
        scale, sizes = plan_sizes(before.total_mib, before.used_mib)
        report: dict[str, Any] = {
            "gpu": {"name": before.name, "total_mib": before.total_mib},
            "used_before_mib": before.used_mib,
            "scale": round(scale, 3),
            "sizes_mib": sizes,
            "context_mib": args.context_mib,
        }
        doc = build_config(folder, sizes, args, args.context_mib)
        path = folder / "gpusm.yaml"
        path.write_text(yaml.safe_dump(doc))
        phases: list[dict[str, Any]] = []
        began = time.monotonic()
        with Coordinator.from_config(path) as coordinator:
            newest = coordinator.events(EventQuery(newest_first=True, limit=1))
            after = newest[0].seq if newest else 0
            try:
                try:
                    run_items(coordinator, probe, args, sizes, phases)
                except GpusmError as exc:  # e.g. a start that failed: the report says which
                    report["error"] = f"{type(exc).__name__}: {exc}"
                coordinator.release_all(by="gpu-check")
                coordinator.wait_settled(60)
                events = coordinator.events(EventQuery(after_seq=after))
                final = {s.name: s.state for s in coordinator.status().services}
            finally:
                coordinator.close(stop_services=True)
        report["wall_s"] = round(time.monotonic() - began, 1)
        report["phases"] = phases
        report["final_states"] = final
        report["event_counts"] = dict(Counter(e.type for e in events))
        stops = [e for e in events if e.type == "Stopped"]
        reclaims = [e.data.get("reclaim_s") for e in stops]
        report["reclaim_s"] = reclaims
        ooms = sorted(p.name for p in (folder / "oom").glob("*"))
        report["oom_markers"] = ooms
        after_snap = probe.snapshot(args.device)
        report["used_after_mib"] = after_snap.used_mib
        report["checks"] = {
            "pipeline_ran": "error" not in report and len(phases) == args.items * 5 + 1,
            "healthy_on_return": all(not row["problems"] for row in phases),
            "no_oom": not ooms and "failed" not in final.values(),
            "reclaim": bool(stops)
            and all(e.data.get("vram_reclaimed") is True for e in stops)
            and all(r is not None and r <= args.reclaim_limit_s for r in reclaims),
            "all_stopped": all(state == "stopped" for state in final.values()),
            "card_back": after_snap.used_mib <= before.used_mib + NvmlProbe.slack_mib,
        }
        report["ok"] = all(report["checks"].values())
        return report
    finally:
        probe.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", type=int, default=0, help="NVML/CUDA device index.")
    parser.add_argument("--items", type=int, default=3, help="Runs of the pipeline.")
    parser.add_argument("--backend", default="auto", choices=["auto", "torch", "cupy", "cuda"])
    parser.add_argument(
        "--context-mib",
        type=int,
        default=1024,
        help="What one CUDA context costs (gpu_check.py measures it); held back from each "
        "service's allocation so that NVML's count for it matches its vram_mib.",
    )
    parser.add_argument("--reclaim-limit-s", type=float, default=5.0)
    parser.add_argument("--report", type=Path, help="Also write the JSON report here.")
    parser.add_argument("--run-token", default="gpu-check", help="Marks this run's holders.")
    args = parser.parse_args(argv)
    # run.py's timeout sends SIGTERM: unwind, so that the services are stopped on the way.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with tempfile.TemporaryDirectory(prefix="gpusm-gpu-check-") as tmp:
        try:
            report = run(args, Path(tmp))
            code = 0 if report["ok"] else 1
        except GpuProbeError as exc:
            report, code = {"ok": False, "error": str(exc)}, 2
    text = json.dumps(report, indent=2, default=str)
    print(text)
    if args.report is not None:
        args.report.write_text(text + "\n")
    return code


if __name__ == "__main__":
    sys.exit(main())
