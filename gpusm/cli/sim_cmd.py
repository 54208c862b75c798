"""``gpusm sim …``: create, inspect and use the simulated GPU; run the fake model server."""

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
from gpusm.wiring import EXIT_OOM, FakeServerOptions, SimGpu, open_sim_dir, run_fake_server

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
    int | None,
    typer.Option(
        "--total-mib",
        min=1,
        help="Size of the simulated GPU if it must be created (default: the config's).",
        show_default=False,
    ),
]


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
    return cfg.sim_dir, {"total_mib": sim.total_mib, "reclaim_lag_s": sim.reclaim_lag_s}


def _open(
    sim_dir: Path | None,
    config: Path | None,
    total_mib: int | None = None,
    reclaim_lag_s: float | None = None,
    *,
    apply: bool = False,
) -> SimGpu:
    """Open the sim GPU; create it when new. ``apply`` makes size and lag take effect always."""
    directory, defaults = resolve_sim_dir(sim_dir, config)
    total = total_mib if total_mib is not None else defaults.get("total_mib")
    lag = reclaim_lag_s if reclaim_lag_s is not None else defaults.get("reclaim_lag_s")
    try:
        return open_sim_dir(directory, total, lag, apply=apply)
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
    sim_dir: SimDirOption = None,
    config: ConfigOption = None,
) -> None:
    """Create the simulated GPU, or change the size and lag of an existing one."""
    with friendly_errors():
        sim = _open(sim_dir, config, total_mib, reclaim_lag_s, apply=True)
        say(
            f"simulated GPU at {sim.directory}: {sim.total_mib} MiB, "
            f"reclaim lag {sim.reclaim_lag_s}s, uuid {sim.uuid}"
        )


@sim_app.command("status")
def status(
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    sim_dir: SimDirOption = None,
    total_mib: TotalOption = None,
    config: ConfigOption = None,
) -> None:
    """Total, used and free memory, who holds it, and the OOMs seen so far."""
    with friendly_errors():
        sim = _open(sim_dir, config, total_mib)
        snap = sim.snapshot()
        allocations = sim.allocations()
        ooms = sim.ooms()
    doc = {
        "dir": str(sim.directory),
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
    if as_json:
        typer.echo(json.dumps(doc))
        return
    say(f"simulated GPU {snap.uuid} at {sim.directory}")
    say(
        f"  total {snap.total_mib} MiB, used {snap.used_mib} MiB, free {snap.free_mib} MiB "
        f"(reclaim lag {sim.reclaim_lag_s}s)"
    )
    if allocations:
        table = Table("pid", "MiB")
        table.add_column("state", no_wrap=True)
        table.add_column("command", overflow="fold")
        for a in allocations:
            state = "alive" if a.alive else "exited, not yet reclaimed"
            table.add_row(str(a.pid), str(a.mib), state, plain(" ".join(a.cmdline)))
        console.print(table)
    say(f"  OOMs: {len(ooms)}")
    for oom in ooms[-10:]:
        say(
            f"    {oom['at']} pid {oom['pid']} asked {oom['requested_mib']} MiB, "
            f"{oom['free_mib']} MiB free: {' '.join(oom['cmdline'])}"
        )


@sim_app.command("hog")
def hog(
    mib: Annotated[int, typer.Option("--mib", min=1, help="MiB to hold.")],
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
        sim = _open(sim_dir, config, total_mib)
        try:
            sim.allocate(mib)
        except SimOutOfMemory as exc:
            fail(str(exc), EXIT_OOM)
    say(f"pid {os.getpid()} holds {mib} MiB of {sim.directory}; SIGTERM or Ctrl-C ends")
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
        typer.Option("--model", help="Model name the Ollama and llama.cpp requests must use."),
    ] = "fake-model",
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

    Exit codes: 0 stopped by SIGTERM/SIGINT, 1 crashed (--crash-after), 3 simulated OOM,
    4 port unavailable. Memory is freed by the process's exit, after the sim's lag.
    """
    with friendly_errors():
        sim = _open(sim_dir, config, total_mib)
    options = FakeServerOptions(
        vram_mib=vram_mib,
        port=port,
        sim_dir=sim.directory,
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
    )
    with friendly_errors():
        code = run_fake_server(options, sim)
    raise typer.Exit(code)


@sim_app.command("reset")
def reset(
    force: Annotated[
        bool, typer.Option("--force", help="Also forget memory held by live processes.")
    ] = False,
    sim_dir: SimDirOption = None,
    config: ConfigOption = None,
) -> None:
    """Forget dead processes' memory and the OOM records (refused while live holders exist)."""
    with friendly_errors():
        sim = _open(sim_dir, config)
        allocations, ooms = sim.reset(force=force)
    say(f"dropped {allocations} allocation(s) and {ooms} OOM record(s)")


def register(app: typer.Typer) -> None:
    """Add the ``sim`` group to ``app``."""
    app.add_typer(sim_app, name="sim")
