#!/usr/bin/env python3
"""The real-GPU check in one command, for an NVIDIA machine with no network.

    python3 scripts/gpu_check/run.py            # from the repository root

Standard library only, so any ``python3`` can start it. It

1. stops at once (exit 2) if there is no NVIDIA driver or NVML sees no GPU;
2. finds a Python >= 3.11 (this one, else python3.13/3.12/3.11 on PATH) that the wheel
   bundle has wheels for, and re-runs itself with it;
3. unpacks the bundle (``build/gpu-check/wheels``, made by ``scripts/gpu_bundle.sh``)
   into ``build/gpu-check/site-cpXY``, the private site dir every step runs with
   (``PYTHONPATH``: that dir, then this checkout, whose gpusm is the one checked);
4. runs ``scripts/gpu_check.py`` (NVML attribution, reclaim, latency), then
   ``scripts/gpu_check/pipeline.py`` (the seed pipeline through a Coordinator with
   ``gpu.backend: nvml`` and stand-in servers holding real GPU memory);
5. prints one JSON report and writes it to ``$OUT/gpu_check.json`` when OUT is set.

GPU memory is allocated with torch, else cupy, else libcuda through ctypes (``--backend``).
Exit: 0 every check passed, 1 one failed, 2 it could not run. The whole run is bounded
by ``--budget-s`` (default 450 s).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
DEFAULT_BUNDLE = os.path.join(REPO, "build", "gpu-check")
MIN_PYTHON = (3, 11)
EXIT_PASS, EXIT_FAIL, EXIT_CANNOT = 0, 1, 2
STARTED = time.monotonic()


class CannotRun(Exception):
    """The check cannot run here (exit 2); the message says why and what to do."""


# ---------------------------------------------------------------- 1. the driver
def nvml_devices() -> list[str]:
    """The names of the GPUs NVML sees, read through ctypes (no dependency needed)."""
    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
    except OSError as exc:
        raise CannotRun(
            f"no NVIDIA driver here: libnvidia-ml.so.1 cannot be loaded ({exc}); "
            "run this on a machine with an NVIDIA GPU and its driver"
        ) from exc
    nvml.nvmlErrorString.restype = ctypes.c_char_p

    def call(what: str, rc: int) -> None:
        if rc != 0:
            text = (nvml.nvmlErrorString(rc) or b"?").decode()
            raise CannotRun(f"NVML: {what} failed: {text} ({rc}); check `nvidia-smi`")

    call("nvmlInit", nvml.nvmlInit_v2())
    try:
        count = ctypes.c_uint()
        call("nvmlDeviceGetCount", nvml.nvmlDeviceGetCount_v2(ctypes.byref(count)))
        names = []
        for index in range(count.value):
            handle = ctypes.c_void_p()
            call(
                "nvmlDeviceGetHandleByIndex",
                nvml.nvmlDeviceGetHandleByIndex_v2(index, ctypes.byref(handle)),
            )
            name = ctypes.create_string_buffer(96)
            call("nvmlDeviceGetName", nvml.nvmlDeviceGetName(handle, name, 96))
            names.append(name.value.decode())
    finally:
        nvml.nvmlShutdown()
    if not names:
        raise CannotRun("NVML sees no GPU; check `nvidia-smi`")
    return names


# ---------------------------------------------------------------- 2. the interpreter
def bundle_pythons(wheels: str) -> set[tuple[int, int]]:
    """The CPython versions the bundle has binary wheels for (those of pydantic-core)."""
    found = set()
    for name in os.listdir(wheels):
        match = re.match(r"pydantic_core-[^-]+-cp3(\d+)-", name)
        if match:
            found.add((3, int(match.group(1))))
    return found


def choose_python(wheels: str, explicit: str | None) -> str | None:
    """None if this interpreter will do, else the path of one that will."""
    usable = bundle_pythons(wheels)
    current_ok = tuple(sys.version_info[:2]) in usable
    if explicit:
        path = shutil.which(explicit) or explicit
        if os.path.realpath(path) != os.path.realpath(sys.executable):
            return path  # re-run with it; there its own version is checked
        candidates: list[str] = []
    elif current_ok:
        return None
    else:
        candidates = []
        for minor in sorted((m for _, m in usable), reverse=True):
            candidates += [f"python3.{minor}", f"/usr/bin/python3.{minor}"]
        candidates += ["python3", "/usr/bin/python3", "/usr/local/bin/python3"]
        candidates += ["/opt/conda/bin/python3"]
    if explicit and current_ok:
        return None
    probe = "import sys; print('%d %d' % sys.version_info[:2])"
    for candidate in candidates:
        path = shutil.which(candidate)
        if not path or os.path.realpath(path) == os.path.realpath(sys.executable):
            continue
        try:
            out = subprocess.run(
                [path, "-c", probe], capture_output=True, text=True, timeout=20
            ).stdout.split()
        except (OSError, subprocess.SubprocessError):
            continue
        if len(out) == 2 and (int(out[0]), int(out[1])) in usable:
            return path
    have = "{}.{}".format(*sys.version_info[:2])
    wanted = ", ".join(f"{a}.{b}" for a, b in sorted(usable)) or "none: the bundle is empty"
    raise CannotRun(
        f"gpusm needs Python >= 3.11 with a bundled wheel set ({wanted}); this is {have} "
        "and no other was found (give one with --python, or rebuild the bundle with "
        "GPU_BUNDLE_PYTHONS naming this machine's version)"
    )


# ---------------------------------------------------------------- 3. the private site dir
def _glibc() -> tuple[int, int]:
    try:
        text = os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (ValueError, OSError):
        text = ""
    match = re.search(r"(\d+)\.(\d+)", text)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


_LEGACY = {"manylinux1": (2, 5), "manylinux2010": (2, 12), "manylinux2014": (2, 17)}


def platform_ok(tag: str, machine: str, glibc: tuple[int, int]) -> bool:
    if tag == "any":
        return True
    if not tag.endswith("_" + machine):
        return False
    base = tag[: -len(machine) - 1]
    if base in _LEGACY:
        return glibc >= _LEGACY[base]
    match = re.fullmatch(r"manylinux_(\d+)_(\d+)", base)
    return bool(match) and glibc >= (int(match.group(1)), int(match.group(2)))


def python_ok(py: str, abi: str, version: tuple[int, int]) -> bool:
    cp = f"cp{version[0]}{version[1]}"
    if abi == "none":
        return py in ("py3", f"py{version[0]}{version[1]}", cp)
    if abi == "abi3":
        match = re.fullmatch(r"cp3(\d+)", py)
        return bool(match) and int(match.group(1)) <= version[1]
    return abi == cp and py == cp


def pick_wheels(wheels: str, version: tuple[int, int]) -> list[str]:
    """One wheel per project (its newest version) that installs on this Python here."""
    machine, glibc = platform.machine(), _glibc()
    best: dict[str, tuple[tuple[int, ...], str]] = {}
    for name in sorted(os.listdir(wheels)):
        if not name.endswith(".whl"):
            continue
        parts = name[:-4].split("-")
        project, release = parts[0].lower().replace("_", "-"), parts[1]
        pys, abis, plats = (p.split(".") for p in parts[-3:])
        if not any(platform_ok(p, machine, glibc) for p in plats):
            continue
        if not any(python_ok(py, abi, version) for py in pys for abi in abis):
            continue
        key = tuple(int(n) for n in re.findall(r"\d+", release))
        if project not in best or key > best[project][0]:
            best[project] = (key, name)
    return sorted(name for _, name in best.values())


def install_site(bundle: str) -> tuple[str, list[str]]:
    """Unpack the fitting wheels into ``bundle/site-cpXY`` (kept while they are the same)."""
    wheels = os.path.join(bundle, "wheels")
    version = tuple(sys.version_info[:2])
    chosen = pick_wheels(wheels, version)  # type: ignore[arg-type]
    site = os.path.join(bundle, f"site-cp{version[0]}{version[1]}")
    stamp = os.path.join(site, ".gpu-check-wheels")
    if os.path.exists(stamp):
        with open(stamp) as f:
            if f.read().split() == chosen:
                return site, chosen
    shutil.rmtree(site, ignore_errors=True)
    os.makedirs(site)
    for name in chosen:
        with zipfile.ZipFile(os.path.join(wheels, name)) as whl:
            whl.extractall(site)
    # A wheel's *.data/purelib and platlib belong in the site dir itself.
    for entry in os.listdir(site):
        if entry.endswith(".data"):
            for sub in ("purelib", "platlib"):
                src = os.path.join(site, entry, sub)
                if os.path.isdir(src):
                    shutil.copytree(src, site, dirs_exist_ok=True)
            shutil.rmtree(os.path.join(site, entry))
    with open(stamp, "w") as f:
        f.write("\n".join(chosen) + "\n")
    return site, chosen


def child_env(site: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("OUT", None)  # the steps' reports come back through this script
    extra = env.get("PYTHONPATH")
    env["PYTHONPATH"] = os.pathsep.join([site, REPO, *([extra] if extra else [])])
    env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"  # CUDA's device order = NVML's
    return env


# ---------------------------------------------------------------- 4. the steps
def remaining(budget_s: float) -> float:
    return budget_s - (time.monotonic() - STARTED)


def run_step(command: list[str], env: dict[str, str], timeout_s: float) -> tuple[int, str, str]:
    """Run one step in its own process group; on timeout SIGTERM it (so it stops the
    services it started), then SIGKILL. Returns (exit code, stdout, stderr tail)."""
    proc = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=max(timeout_s, 1))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
        err = (err or "") + f"\n[gpu_check] step timed out after {timeout_s:.0f} s"
        return 124, out or "", err[-4000:]
    return proc.returncode, out, (err or "")[-4000:]


def parse_report(out: str) -> dict[str, object]:
    start = out.find("{")
    try:
        doc = json.loads(out[start:]) if start >= 0 else None
    except ValueError:
        doc = None
    return doc if isinstance(doc, dict) else {"unparsed_stdout": out[-4000:]}


def kill_leftovers(token: str) -> list[int]:
    """SIGKILL any holder this run started that is still alive (found by its run token)."""
    killed = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if token.encode() in argv:
            try:
                os.kill(int(entry), signal.SIGKILL)
                killed.append(int(entry))
            except OSError:
                pass
    return killed


def run_checks(args: argparse.Namespace, site: str) -> tuple[int, dict[str, object]]:
    env = child_env(site)
    env["GPU_CHECK_RUN_TOKEN"] = token = "gpu-check-" + uuid.uuid4().hex[:12]
    py = sys.executable
    report: dict[str, object] = {}
    smoke = "import gpusm; from gpusm import Coordinator; print(gpusm.__file__)"
    code, out, err = run_step([py, "-c", smoke], env, 60)
    if code != 0:
        raise CannotRun(f"gpusm does not import with the bundle on this Python: {err.strip()}")
    report["gpusm"] = out.strip()

    probe_cmd = [py, os.path.join(REPO, "scripts", "gpu_check.py"), "--device", str(args.device)]
    probe_cmd += ["--backend", args.backend]
    code_a, out, err = run_step(probe_cmd, env, min(180, remaining(args.budget_s) - 240))
    probe = parse_report(out)
    probe["exit"] = code_a
    if code_a != 0:
        probe["stderr_tail"] = err
    report["probe"] = probe
    if code_a == EXIT_CANNOT:
        return EXIT_CANNOT, report

    context = probe.get("context_mib")
    pipe_cmd = [py, os.path.join(HERE, "pipeline.py"), "--device", str(args.device)]
    pipe_cmd += ["--backend", args.backend, "--items", str(args.items), "--run-token", token]
    if isinstance(context, int) and context > 0:
        pipe_cmd += ["--context-mib", str(context)]
    code_b, out, err = run_step(pipe_cmd, env, remaining(args.budget_s) - 70)
    pipeline = parse_report(out)
    pipeline["exit"] = code_b
    if code_b != 0:
        pipeline["stderr_tail"] = err
    report["pipeline"] = pipeline
    report["leftover_holders_killed"] = kill_leftovers(token)
    codes = {code_a, code_b}
    if codes == {EXIT_PASS}:
        return EXIT_PASS, report
    return (EXIT_CANNOT if codes <= {EXIT_PASS, EXIT_CANNOT} else EXIT_FAIL), report


# ---------------------------------------------------------------- main
def emit(report: dict[str, object]) -> None:
    text = json.dumps(report, indent=2, default=str)
    print(text, flush=True)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "gpu_check.json"), "w") as f:
            f.write(text + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--device", type=int, default=0, help="NVML/CUDA device index.")
    parser.add_argument("--items", type=int, default=3, help="Runs of the seed pipeline.")
    parser.add_argument("--backend", default="auto", choices=["auto", "torch", "cupy", "cuda"])
    parser.add_argument("--bundle", default=DEFAULT_BUNDLE, help="Where gpu_bundle.sh put it.")
    parser.add_argument("--python", help="The interpreter to run gpusm with (>= 3.11).")
    parser.add_argument("--budget-s", type=float, default=450.0, help="Bound on the whole run.")
    parser.add_argument(
        "--prepare-only",
        action="store_true",
        help="Skip the driver check; unpack the bundle, import gpusm with it, print the site dir.",
    )
    args = parser.parse_args(argv)
    report: dict[str, object] = {"ok": False}
    try:
        if not args.prepare_only:
            report["gpus"] = nvml_devices()
        wheels = os.path.join(args.bundle, "wheels")
        if not os.path.isdir(wheels):
            raise CannotRun(
                f"no wheel bundle at {wheels}: run `bash scripts/gpu_bundle.sh` where PyPI "
                "is reachable, and carry build/gpu-check here"
            )
        other = choose_python(wheels, args.python)
        if other is not None:
            rest = list(argv if argv is not None else sys.argv[1:])
            os.execv(other, [other, os.path.abspath(__file__), *rest])
        site, chosen = install_site(args.bundle)
        report.update(python=sys.version.split()[0], site=site, wheels=chosen)
        if args.prepare_only:
            code, _, err = run_step(
                [sys.executable, "-c", "import gpusm; from gpusm import Coordinator"],
                child_env(site),
                60,
            )
            if code != 0:
                raise CannotRun(f"gpusm does not import with the bundle: {err.strip()}")
            report["ok"] = True
            emit(report)
            return EXIT_PASS
        code, steps = run_checks(args, site)
        report.update(steps)
        report["ok"] = code == EXIT_PASS
    except CannotRun as exc:
        report["error"] = str(exc)
        code = EXIT_CANNOT
    report["exit"] = code
    report["wall_s"] = round(time.monotonic() - STARTED, 1)
    emit(report)
    if code == EXIT_CANNOT:
        print(f"gpu_check: could not run: {report.get('error')}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
