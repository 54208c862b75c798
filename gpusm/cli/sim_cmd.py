"""``gpusm sim …``: create, inspect and use the simulated GPU; run the fake model server.

A simulated GPU folder holds one or several devices (``gpusm sim create --devices N``);
``status`` and ``reset`` cover every device, ``hog --device`` picks one, and the fake
model server holds memory on the devices its ``CUDA_VISIBLE_DEVICES`` names.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from types import FrameType
from typing import Annotated, Any

import typer
from rich.table import Table

from gpusm.cli.common import (
    EXIT_CONFIG,
    ConfigOption,
    console,
    fail,
    friendly_errors,
    load,
    plain,
    say,
)
from gpusm.errors import GpuProbeError, SimOutOfMemory
from gpusm.wiring import (
    EXIT_OOM,
    FakeServerOptions,
    SimGpu,
    open_sim_devices,
    run_fake_server,
)

__all__ = ["register", "resolve_sim_dir"]

_WHERE = (
    "The simulated GPU is the folder given by --sim-dir, else $GPUSM_SIM_DIR, else the "
    "config's gpu.sim.dir (default <state_dir>/simgpu; config from -c, $GPUSM_CONFIG or "
    "./gpusm.yaml)."
)

sim_app = typer.Typer(
    help="The simulated GPU and a fake model server, for tests and demos. " + _WHERE,
    no_args_is_help=True,
)

SimDirOption = Annotated[
    Path | None,
    typer.Option(
        "--sim-dir",
        help="Folder of the simulated GPU (else $GPUSM_SIM_DIR, else the config's).",
        show_default=False,
    ),
]
TotalOption = Annotated[
    str | None,
    typer.Option(
        "--total-mib",
        help="Size in MiB of each simulated device if it must be created, or one size per "
        "device, comma-separated (default: the config's).",
        show_default=False,
    ),
]


def _sizes(total_mib: str | None) -> int | list[int] | None:
    """``--total-mib``: one size, or one per device ("24576,12288"); exit 2 if nonsense."""
    if total_mib is None:
        return None
    try:
        sizes = [int(part) for part in total_mib.split(",")]
    except ValueError:
        sizes = []
    if not sizes or any(size < 1 for size in sizes):
        fail(
            f"--total-mib {total_mib!r}: give a size in MiB above 0, or one per device "
            "separated by commas (e.g. 24576,12288)",
            EXIT_CONFIG,
        )
    return sizes[0] if len(sizes) == 1 else sizes


def resolve_sim_dir(sim_dir: Path | None, config: Path | None) -> tuple[Path, dict[str, Any]]:
    """The sim folder (--sim-dir, $GPUSM_SIM_DIR, config) and the config's creation defaults."""
    if sim_dir is not None:
        return sim_dir, {}
    env = os.environ.get("GPUSM_SIM_DIR")
    if env:
        return Path(env), {}
    if config is None and not os.environ.get("GPUSM_CONFIG") and not Path("gpusm.yaml").exists():
        fail(
            "no simulated GPU named: pass --sim-dir DIR, set GPUSM_SIM_DIR, "
            "or give a config with -c FILE",
            EXIT_CONFIG,
        )
    cfg = load(config, need_services=False)  # only the simulated GPU's settings are read
    sim = cfg.gpu.sim
    return cfg.sim_dir, {
        "total_mib": sim.sizes,
        "devices": sim.devices,
        "reclaim_lag_s": sim.reclaim_lag_s,
    }


def _open(
    sim_dir: Path | None,
    config: Path | None,
    total_mib: str | None = None,
    reclaim_lag_s: float | None = None,
    *,
    devices: int | None = None,
    apply: bool = False,
) -> list[SimGpu]:
    """Open every device of the sim GPU; create those that are new. ``apply`` makes sizes
    and lag take effect always (and removes devices past ``devices``)."""
    directory, defaults = resolve_sim_dir(sim_dir, config)
    sizes = _sizes(total_mib)
    total = sizes if sizes is not None else defaults.get("total_mib")
    lag = reclaim_lag_s if reclaim_lag_s is not None else defaults.get("reclaim_lag_s")
    count = devices if devices is not None else defaults.get("devices")
    if devices is None and isinstance(sizes, list):
        count = len(sizes)  # sizes given on the command line say how many
    try:
        return open_sim_devices(directory, total, lag, devices=count, apply=apply)
    except GpuProbeError as exc:
        fail(str(exc), EXIT_CONFIG)
    except (OSError, ValueError) as exc:  # a path the OS refuses (too long, NUL, a file…)
        why = getattr(exc, "strerror", None) or exc
        fail(
            f"cannot use {directory} as the simulated GPU's folder ({why}); give another --sim-dir",
            EXIT_CONFIG,
        )


@sim_app.command("create")
def create(
    total_mib: TotalOption = None,
    reclaim_lag_s: Annotated[
        float | None,
        typer.Option(
            "--reclaim-lag-s",
            min=0.0,
            help="Seconds a dead process's memory stays counted (default: config's, else 0.2).",
            show_default=False,
        ),
    ] = None,
    devices: Annotated[
        int | None,
        typer.Option(
            "--devices",
            min=1,
            max=16,
            help="How many devices (default: the config's, else as many sizes as "
            "--total-mib lists, else as many as exist). Fewer than exist removes the last "
            "ones (refused while a live process holds memory on one).",
            show_default=False,
        ),
    ] = None,
    sim_dir: SimDirOption = None,
    config: ConfigOption = None,
) -> None:
    """Create the simulated GPU, or change the devices, sizes and lag of an existing one."""
    with friendly_errors():
        sims = _open(sim_dir, config, total_mib, reclaim_lag_s, devices=devices, apply=True)
        sim = sims[0]
        if len(sims) == 1:
            say(
                f"simulated GPU at {sim.directory}: {sim.total_mib} MiB, "
                f"reclaim lag {sim.reclaim_lag_s}s, uuid {sim.uuid}"
            )
            return
        say(
            f"simulated GPU at {sim.directory}: {len(sims)} devices, "
            f"reclaim lag {sim.reclaim_lag_s}s"
        )
        for one in sims:
            say(f"  device {one.index}: {one.total_mib} MiB, uuid {one.uuid}")


def _device_doc(sim: SimGpu) -> dict[str, Any]:
    """One device's status, as ``sim status --json`` prints it."""
    snap = sim.snapshot()
    allocations = sim.allocations()
    ooms = sim.ooms()
    return {
        "dir": str(sim.directory),
        "index": sim.index,
        "uuid": snap.uuid,
        "total_mib": snap.total_mib,
        "used_mib": snap.used_mib,
        "free_mib": snap.free_mib,
        "reclaim_lag_s": sim.reclaim_lag_s,
        "processes": [
            {
                "pid": a.pid,
                "mib": a.mib,
                "alive": a.alive,
                "exited_at": a.exited_at,
                "cmdline": list(a.cmdline),
            }
            for a in allocations
        ],
        "oom_count": len(ooms),
        "ooms": ooms,
    }


def _say_ooms(ooms: list[dict[str, Any]], prefix: str = "") -> None:
    for oom in ooms[-10:]:
        say(
            f"    {prefix}{oom['at']} pid {oom['pid']} asked {oom['requested_mib']} MiB, "
            f"{oom['free_mib']} MiB free: {' '.join(oom['cmdline'])}"
        )


def _status_one(doc: dict[str, Any]) -> None:
    say(f"simulated GPU {doc['uuid']} at {doc['dir']}")
    say(
        f"  total {doc['total_mib']} MiB, used {doc['used_mib']} MiB, "
        f"free {doc['free_mib']} MiB (reclaim lag {doc['reclaim_lag_s']}s)"
    )
    if doc["processes"]:
        table = Table("pid", "MiB")
        table.add_column("state", no_wrap=True)
        table.add_column("command", overflow="fold")
        for p in doc["processes"]:
            state = "alive" if p["alive"] else "exited, not yet reclaimed"
            table.add_row(str(p["pid"]), str(p["mib"]), state, plain(" ".join(p["cmdline"])))
        console.print(table)
    say(f"  OOMs: {doc['oom_count']}")
    _say_ooms(doc["ooms"])


def _status_many(docs: list[dict[str, Any]]) -> None:
    say(
        f"simulated GPU at {docs[0]['dir']}: {len(docs)} devices "
        f"(reclaim lag {docs[0]['reclaim_lag_s']}s)"
    )
    for doc in docs:  # a UUID is too wide for the table
        say(f"  device {doc['index']}: uuid {doc['uuid']}")
    table = Table("device", "total MiB", "used MiB", "free MiB")
    table.add_column("holders (pid: MiB)", overflow="fold")
    table.add_column("OOMs")
    for doc in docs:
        holders = ", ".join(
            f"{p['pid']}: {p['mib']}" + ("" if p["alive"] else " (exited)")
            for p in doc["processes"]
        )
        table.add_row(
            str(doc["index"]),
            str(doc["total_mib"]),
            str(doc["used_mib"]),
            str(doc["free_mib"]),
            holders or "-",
            str(doc["oom_count"]),
        )
    console.print(table)
    for doc in docs:
        _say_ooms(doc["ooms"], f"device {doc['index']}: ")


@sim_app.command("status")
def status(
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help="Print JSON: one object for a single device, a list of them for several.",
        ),
    ] = False,
    sim_dir: SimDirOption = None,
    total_mib: TotalOption = None,
    config: ConfigOption = None,
) -> None:
    """Total, used and free memory of each device, who holds it, and the OOMs seen so far."""
    with friendly_errors():
        docs = [_device_doc(sim) for sim in _open(sim_dir, config, total_mib)]
    if as_json:
        typer.echo(json.dumps(docs[0] if len(docs) == 1 else docs))
    elif len(docs) == 1:
        _status_one(docs[0])
    else:
        _status_many(docs)


@sim_app.command("hog")
def hog(
    mib: Annotated[int, typer.Option("--mib", min=1, help="MiB to hold.")],
    device: Annotated[
        str, typer.Option("--device", help="The device to hold it on: its index or UUID.")
    ] = "0",
    sim_dir: SimDirOption = None,
    total_mib: TotalOption = None,
    config: ConfigOption = None,
) -> None:
    """Hold MiB as a foreign process until SIGTERM or Ctrl-C (memory comes back after exit)."""
    stop = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with friendly_errors():
        sims = _open(sim_dir, config, total_mib)
        sim = next((s for s in sims if device.strip() in (str(s.index), s.uuid)), None)
        if sim is None:
            known = ", ".join(f"{s.index} ({s.uuid})" for s in sims)
            fail(
                f"--device {device}: no such simulated device; the devices are {known}", EXIT_CONFIG
            )
        try:
            sim.allocate(mib)
        except SimOutOfMemory as exc:
            fail(str(exc), EXIT_OOM)
    on = "" if len(sims) == 1 else f" device {sim.index} ({sim.uuid})"
    say(f"pid {os.getpid()} holds {mib} MiB of {sim.directory}{on}; SIGTERM or Ctrl-C ends")
    while not stop:
        time.sleep(0.05)


@sim_app.command("service")
def service(
    vram_mib: Annotated[int, typer.Option("--vram-mib", min=0, help="MiB to load.")],
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="HTTP port.")],
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    load_s: Annotated[
        float, typer.Option("--load-s", min=0.0, help="Seconds loading takes (503 meanwhile).")
    ] = 0.0,
    stop_s: Annotated[
        float, typer.Option("--stop-s", min=0.0, help="Seconds a SIGTERM stop takes.")
    ] = 0.0,
    ignore_sigterm: Annotated[
        bool, typer.Option("--ignore-sigterm", help="Ignore SIGTERM; only SIGKILL ends it.")
    ] = False,
    crash_after: Annotated[
        float | None,
        typer.Option("--crash-after", min=0.0, help="Exit with code 1 this long after ready."),
    ] = None,
    grow_mib: Annotated[
        int, typer.Option("--grow-mib", min=0, help="MiB to add after becoming ready.")
    ] = 0,
    wake_s: Annotated[
        float,
        typer.Option("--wake-s", min=0.0, help="Seconds a wake takes to get the memory back."),
    ] = 0.5,
    residual_mib: Annotated[
        int,
        typer.Option("--residual-mib", min=0, help="MiB kept while parked (e.g. a CUDA context)."),
    ] = 0,
    leak_mib: Annotated[
        int,
        typer.Option(
            "--leak-mib", min=0, help="MiB a park fails to free, kept besides the residual."
        ),
    ] = 0,
    async_free_s: Annotated[
        float,
        typer.Option(
            "--async-free-s",
            min=0.0,
            help="Seconds after ComfyUI's POST /free answers before the memory is freed.",
        ),
    ] = 0.0,
    model: Annotated[
        str,
        typer.Option(
            "--model", help="Model name the OpenAI, Ollama and llama.cpp requests must use."
        ),
    ] = "fake-model",
    tokens_per_s: Annotated[
        float,
        typer.Option(
            "--tokens-per-s",
            min=0.0,
            help="Tokens a completion produces per second (streamed as produced); 0: at once.",
        ),
    ] = 50.0,
    sim_dir: SimDirOption = None,
    total_mib: TotalOption = None,
    config: ConfigOption = None,
) -> None:
    """A fake model server: GET /health is 503 while loading VRAM, 200 when ready.

    Once ready it can be parked (memory freed down to --residual-mib + --leak-mib) and
    woken (memory back after --wake-s) with the requests of vLLM (POST /sleep, /wake_up,
    /collective_rpc), SGLang (POST /release_memory_occupation, /resume_memory_occupation),
    Ollama (POST /api/generate with keep_alive 0 or -1), ComfyUI (POST /free, /prompt) and
    llama.cpp's router (POST /models/unload, /models/load); /health stays 200 while parked.

    Clients get completions at --tokens-per-s: OpenAI's POST /v1/chat/completions,
    /v1/completions, /v1/embeddings and GET /v1/models (streamed as server-sent events
    with "stream": true), Ollama's POST /api/chat and /api/generate (NDJSON streams), and
    ComfyUI's GET /ws (an echo WebSocket); a parked server wakes first.

    It holds --vram-mib on each device that $CUDA_VISIBLE_DEVICES names (device indices
    or UUIDs, comma-separated; unset: device 0); parks free and wakes take back on each.

    Exit codes: 0 stopped by SIGTERM/SIGINT, 1 crashed (--crash-after), 3 simulated OOM,
    4 port unavailable, 5 $CUDA_VISIBLE_DEVICES names a device the simulated GPU lacks.
    Memory is freed by the process's exit, after the sim's lag.
    """
    with friendly_errors():
        sims = _open(sim_dir, config, total_mib)
    options = FakeServerOptions(
        vram_mib=vram_mib,
        port=port,
        sim_dir=sims[0].directory,
        host=host,
        load_s=load_s,
        stop_s=stop_s,
        ignore_sigterm=ignore_sigterm,
        crash_after=crash_after,
        grow_mib=grow_mib,
        wake_s=wake_s,
        residual_mib=residual_mib,
        leak_mib=leak_mib,
        async_free_s=async_free_s,
        model=model,
        tokens_per_s=tokens_per_s,
        visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),
    )
    with friendly_errors():
        code = run_fake_server(options, sims)
    raise typer.Exit(code)


@sim_app.command("reset")
def reset(
    force: Annotated[
        bool, typer.Option("--force", help="Also forget memory held by live processes.")
    ] = False,
    sim_dir: SimDirOption = None,
    config: ConfigOption = None,
) -> None:
    """Forget dead processes' memory and the OOM records of every device (refused while
    live holders exist on any)."""
    with friendly_errors():
        sims = _open(sim_dir, config)
        if len(sims) > 1 and not force:
            for sim in sims:  # check them all first: reset all devices or none
                live = sim.holders()
                if live:
                    pids = ", ".join(f"{pid} ({mib} MiB)" for pid, mib in sorted(live.items()))
                    raise GpuProbeError(
                        f"live processes hold simulated memory on device {sim.index}: {pids}; "
                        "stop them or pass --force"
                    )
        allocations = ooms = 0
        for sim in sims:
            dropped = sim.reset(force=force)
            allocations += dropped[0]
            ooms += dropped[1]
    on = "" if len(sims) == 1 else f" on {len(sims)} devices"
    say(f"dropped {allocations} allocation(s) and {ooms} OOM record(s){on}")


def register(app: typer.Typer) -> None:
    """Add the ``sim`` group to ``app``."""
    app.add_typer(sim_app, name="sim")
