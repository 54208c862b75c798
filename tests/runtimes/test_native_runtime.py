"""Native runtime behaviour beyond the contract: environment, logs, errors, process trees."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from gpusm import procs
from gpusm.config import DockerServiceConfig, HealthConfig, NativeServiceConfig
from gpusm.errors import ServiceStartFailed
from gpusm.ports import Handle, Placement
from gpusm.procs import kill_tree
from gpusm.runtimes import native
from gpusm.runtimes.native import NativeRuntime
from tests.support import eventually

_HEALTH = HealthConfig(tcp="127.0.0.1:9")


def service(name: str, code: str, **extra: object) -> NativeServiceConfig:
    """A native service that runs ``code`` with this Python."""
    return NativeServiceConfig(
        name=name,
        command=[sys.executable, "-c", code],
        vram_mib=0,
        health=_HEALTH,
        **extra,
    )


def alive(pid: int) -> bool:
    return procs.live_create_time(pid) is not None


# Instance ids of this module's services, so cleanup (and orphan scans) see only ours.
PREFIX = f"nt-{uuid.uuid4().hex[:12]}"


def ours(env: Mapping[str, str]) -> bool:
    return env.get("GPUSM_INSTANCE", "").startswith(PREFIX)


@pytest.fixture
def rt(tmp_path: Path) -> Iterator[NativeRuntime]:
    """A native runtime that stops, after the test, every instance of this module left."""
    runtime = NativeRuntime(tmp_path / "logs", marker_filter=ours)
    yield runtime
    for handle in runtime.find_orphans():
        runtime.stop(handle, 0.1)


def instance() -> str:
    return f"{PREFIX}-{uuid.uuid4().hex[:8]}"


def test_runs_in_its_own_session_with_markers_env_and_cwd(
    rt: NativeRuntime, tmp_path: Path
) -> None:
    out = tmp_path / "seen.json"
    work = tmp_path / "work"
    work.mkdir()
    code = (
        "import json, os, sys, time\n"
        "keys = ['GPUSM_SERVICE', 'GPUSM_INSTANCE', 'FROM_EXTRA', 'FROM_SERVICE', 'BOTH']\n"
        "seen = {k: os.environ.get(k) for k in keys}\n"
        "seen.update(cwd=os.getcwd(), sid=os.getsid(0), pgid=os.getpgid(0), pid=os.getpid())\n"
        f"open({str(out)!r} + '.tmp', 'w').write(json.dumps(seen))\n"
        f"os.replace({str(out)!r} + '.tmp', {str(out)!r})\n"
        "time.sleep(60)"
    )
    rt.extra_env = {"FROM_EXTRA": "x", "BOTH": "extra"}
    inst = instance()
    svc = service("envsvc", code, cwd=work, env={"FROM_SERVICE": "s", "BOTH": "service"})
    handle = rt.start(svc, inst)
    eventually(out.exists, what="the service wrote what it saw")
    seen = json.loads(out.read_text())
    assert seen["GPUSM_SERVICE"] == "envsvc"
    assert seen["GPUSM_INSTANCE"] == inst
    assert (seen["FROM_EXTRA"], seen["FROM_SERVICE"]) == ("x", "s")
    assert seen["BOTH"] == "service"  # the service's own env wins over extra_env
    assert Path(seen["cwd"]) == work
    assert seen["pid"] == handle.pid == seen["sid"] == seen["pgid"]


def test_python_placeholder_runs_this_interpreter(rt: NativeRuntime) -> None:
    svc = NativeServiceConfig(
        name="placeholder",
        command=["{python}", "-c", "import sys; print(sys.executable); sys.stdout.flush()"],
        vram_mib=0,
        health=_HEALTH,
    )
    handle = rt.start(svc, instance())
    eventually(lambda: not rt.is_alive(handle))
    assert rt.exit_code(handle) == 0
    assert rt.log_tail(handle, lines=1) == sys.executable


def _proc_view(pid: int) -> tuple[list[str], dict[str, str]]:
    """The argv and the initial environment of ``pid``, as the kernel has them."""
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]
    raw = Path(f"/proc/{pid}/environ").read_bytes().decode().split("\0")
    env = dict(entry.split("=", 1) for entry in raw if "=" in entry)
    return argv, env


_DEVICE_SERVICE_ENV = {
    "DEVICE": "cuda:{gpu}",
    "DEVICES": "[{gpus}]",
    # A service's own values lose to the placement (gpusm accounts by the placement).
    "CUDA_VISIBLE_DEVICES": "7",
    "CUDA_DEVICE_ORDER": "FASTEST_FIRST",
}


def test_placement_sets_the_cuda_env_and_fills_gpu_placeholders(
    rt: NativeRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5")  # inherited: overridden too
    svc = NativeServiceConfig(
        name="placed",
        command=["{python}", "-c", "import time; time.sleep(60)", "--gpu={gpu}", "{gpus}"],
        env=_DEVICE_SERVICE_ENV,
        vram_mib=0,
        health=_HEALTH,
    )
    placement = Placement(indices=(3, 1), uuids=("GPU-aaaa", "GPU-bbbb"))
    handle = rt.start(svc, instance(), placement)
    assert handle.pid is not None
    argv, env = _proc_view(handle.pid)
    assert argv == [sys.executable, "-c", "import time; time.sleep(60)", "--gpu=3", "3,1"]
    assert env["CUDA_VISIBLE_DEVICES"] == "GPU-aaaa,GPU-bbbb"
    assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert (env["DEVICE"], env["DEVICES"]) == ("cuda:3", "[3,1]")
    assert env["GPUSM_INSTANCE"] == handle.instance


def test_placement_without_uuids_makes_the_indices_visible(rt: NativeRuntime) -> None:
    svc = service("byindex", "import time; time.sleep(60)", env=_DEVICE_SERVICE_ENV)
    handle = rt.start(svc, instance(), Placement(indices=(0, 2)))
    assert handle.pid is not None
    _, env = _proc_view(handle.pid)
    assert (env["CUDA_VISIBLE_DEVICES"], env["CUDA_DEVICE_ORDER"]) == ("0,2", "PCI_BUS_ID")
    assert (env["DEVICE"], env["DEVICES"]) == ("cuda:0", "[0,2]")


@pytest.mark.parametrize(("gpu", "expected"), [(2, "2"), ("auto", "0"), ([1, 3], "0")])
def test_without_placement_no_cuda_env_is_set_and_placeholders_are_the_configured_device(
    rt: NativeRuntime, monkeypatch: pytest.MonkeyPatch, gpu: object, expected: str
) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)
    svc = service(
        "unplaced", "import time; time.sleep(60)", gpu=gpu, env={"DEVICE": "{gpu}/{gpus}"}
    )
    handle = rt.start(svc, instance())
    assert handle.pid is not None
    _, env = _proc_view(handle.pid)
    assert "CUDA_VISIBLE_DEVICES" not in env
    assert "CUDA_DEVICE_ORDER" not in env
    assert env["DEVICE"] == f"{expected}/{expected}"


def test_output_goes_to_the_service_log_and_exit_code_is_kept(rt: NativeRuntime) -> None:
    code = "import sys\nprint('to stdout')\nprint('to stderr', file=sys.stderr)\nsys.exit(3)"
    handle = rt.start(service("logged", code), instance())
    assert rt.exit_code(handle) is None or rt.exit_code(handle) == 3
    eventually(lambda: not rt.is_alive(handle))
    assert rt.exit_code(handle) == 3
    tail = rt.log_tail(handle)
    assert sorted(tail.splitlines()) == ["to stderr", "to stdout"]
    assert rt.log_tail(handle, lines=1) in ("to stdout", "to stderr")
    assert rt.log_tail(handle, lines=0) == ""
    assert f"starting instance {handle.instance}" in rt.log_path("logged").read_text()
    assert rt.log_tail(Handle("never-started", "x")) == ""


def test_log_tail_tells_the_instances_of_one_service_apart(rt: NativeRuntime) -> None:
    code = "import os\nprint(os.environ['SAY'])"
    first = rt.start(service("twice", code, env={"SAY": "first run"}), instance())
    eventually(lambda: not rt.is_alive(first))
    silent = rt.start(service("twice", "pass"), instance())
    eventually(lambda: not rt.is_alive(silent))
    second = rt.start(service("twice", code, env={"SAY": "second run"}), instance())
    eventually(lambda: not rt.is_alive(second))
    assert rt.log_tail(first) == "first run"
    assert rt.log_tail(silent) == ""
    assert rt.log_tail(second) == "second run"
    assert rt.log_tail(Handle("twice", "not-an-instance")) == ""


def test_log_tail_of_an_output_longer_than_what_it_reads_is_its_end(rt: NativeRuntime) -> None:
    code = "for i in range(20000): print(f'line {i}')"
    handle = rt.start(service("long", code), instance())
    eventually(lambda: not rt.is_alive(handle))
    assert rt.log_tail(handle, lines=2) == "line 19998\nline 19999"


def test_exit_code_after_a_stop_is_the_signal_that_ended_it(rt: NativeRuntime) -> None:
    handle = rt.start(service("stopped", "import time; time.sleep(60)"), instance())
    assert not rt.stop(handle, 5.0).escalated
    assert rt.exit_code(handle) == -signal.SIGTERM


def test_a_docker_service_is_refused(rt: NativeRuntime) -> None:
    svc = DockerServiceConfig(name="boxed", image="busybox", vram_mib=0, health=_HEALTH)
    with pytest.raises(ServiceStartFailed, match=r"'boxed'.*runtime: native"):
        rt.start(svc, instance())


def test_exit_code_is_unknown_for_a_process_it_did_not_launch(rt: NativeRuntime) -> None:
    stranger = Handle(service="x", instance="y", pid=os.getpid(), create_time=0.0)
    assert rt.exit_code(stranger) is None
    assert rt.exit_code(Handle(service="x", instance="y")) is None
    assert not rt.is_alive(Handle(service="x", instance="y"))


def test_log_over_its_bound_is_rotated_at_the_next_start(tmp_path: Path) -> None:
    rt = NativeRuntime(tmp_path / "logs", log_max_bytes=200)
    first = rt.start(service("chatty", "print('x' * 500)"), instance())
    eventually(lambda: not rt.is_alive(first))
    second = rt.start(service("chatty", "print('second run')"), instance())
    eventually(lambda: "second run" in rt.log_tail(second))
    rotated = tmp_path / "logs" / "chatty.log.1"
    assert "x" * 500 in rotated.read_text()
    assert "x" * 500 not in (tmp_path / "logs" / "chatty.log").read_text()


def test_missing_executable_fails_naming_the_service_and_the_fix(rt: NativeRuntime) -> None:
    svc = NativeServiceConfig(
        name="ghost", command=["gpusm-no-such-program"], vram_mib=0, health=_HEALTH
    )
    with pytest.raises(ServiceStartFailed, match=r"'ghost'.*not found.*services\.ghost\.command"):
        rt.start(svc, instance())


def test_file_that_is_not_executable_fails_clearly(rt: NativeRuntime, tmp_path: Path) -> None:
    script = tmp_path / "script.sh"
    script.write_text("#!/bin/sh\n")
    svc = NativeServiceConfig(name="noexec", command=[str(script)], vram_mib=0, health=_HEALTH)
    with pytest.raises(ServiceStartFailed, match="not executable"):
        rt.start(svc, instance())


def test_missing_working_directory_fails_clearly(rt: NativeRuntime, tmp_path: Path) -> None:
    svc = service("nocwd", "pass", cwd=tmp_path / "absent")
    with pytest.raises(ServiceStartFailed, match=r"working directory .*absent.* does not exist"):
        rt.start(svc, instance())


def test_unusable_log_directory_fails_clearly(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ServiceStartFailed, match="cannot open its log"):
        NativeRuntime(blocker / "logs").start(service("nolog", "pass"), instance())


def test_directory_as_program_fails_clearly(rt: NativeRuntime, tmp_path: Path) -> None:
    svc = NativeServiceConfig(name="dir", command=[str(tmp_path)], vram_mib=0, health=_HEALTH)
    with pytest.raises(ServiceStartFailed, match="'dir'"):
        rt.start(svc, instance())


# Main starts a child, which starts a grandchild that leaves the session and ignores
# SIGTERM, then writes the three pids to $PIDS.
TREE = """
import os, subprocess, sys, time
grandchild = (
    "import os, signal, sys, time\\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\\n"
    "os.setsid()\\n"
    "open(sys.argv[1], 'w').write(str(os.getpid()))\\n"
    "time.sleep(60)"
)
child = (
    "import subprocess, sys, time\\n"
    "subprocess.Popen([sys.executable, '-c', sys.argv[1], sys.argv[2]])\\n"
    "time.sleep(60)"
)
gc_file = os.environ['PIDS'] + '.gc'
c = subprocess.Popen([sys.executable, '-c', child, grandchild, gc_file])
while not os.path.exists(gc_file) or not open(gc_file).read():
    time.sleep(0.01)
open(os.environ['PIDS'] + '.tmp', 'w').write(f"{os.getpid()} {c.pid} {open(gc_file).read()}")
os.replace(os.environ['PIDS'] + '.tmp', os.environ['PIDS'])
time.sleep(60)
"""


def test_grandchild_that_left_the_session_does_not_survive_the_stop(
    rt: NativeRuntime, tmp_path: Path
) -> None:
    pids_file = tmp_path / "pids"
    handle = rt.start(service("tree", TREE, env={"PIDS": str(pids_file)}), instance())
    eventually(pids_file.exists, what="the tree is up")
    pids = [int(p) for p in pids_file.read_text().split()]
    assert set(pids) <= rt.pids_of(handle)
    result = rt.stop(handle, 0.3)
    assert result.escalated  # the grandchild ignored SIGTERM
    assert not any(alive(pid) for pid in pids)


def test_child_forked_during_shutdown_is_killed_too(rt: NativeRuntime, tmp_path: Path) -> None:
    late = tmp_path / "late"
    code = (
        "import os, signal, subprocess, sys, time\n"
        "def on_term(*_):\n"
        "    p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        f"    open({str(late)!r}, 'w').write(str(p.pid))\n"
        "signal.signal(signal.SIGTERM, on_term)\n"
        f"open({str(late)!r} + '.ready', 'w').close()\n"
        "while True: time.sleep(1)"
    )
    handle = rt.start(service("late", code), instance())
    eventually(Path(str(late) + ".ready").exists, what="handler installed")
    result = rt.stop(handle, 1.0)
    assert result.escalated
    late_pid = int(late.read_text())
    assert not alive(late_pid)


def test_stragglers_of_a_crashed_instance_are_stopped(rt: NativeRuntime, tmp_path: Path) -> None:
    child_pid = tmp_path / "child"
    code = (
        "import subprocess, sys, time\n"
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'],"
        " start_new_session=True)\n"
        f"open({str(child_pid)!r}, 'w').write(str(p.pid))\n"
        "time.sleep(60)"
    )
    handle = rt.start(service("straggly", code), instance())
    eventually(lambda: child_pid.exists() and child_pid.read_text() != "")
    pid = int(child_pid.read_text())
    assert handle.pid is not None
    os.kill(handle.pid, signal.SIGKILL)
    eventually(lambda: not rt.is_alive(handle))
    assert alive(pid)  # outlived its parent
    result = rt.stop(handle, 1.0)
    assert result.already_dead
    assert not alive(pid)


# Plays a coordinator that starts a service and then dies without stopping it.
LAUNCHER = """
import json, sys
from pathlib import Path
from gpusm.config import HealthConfig, NativeServiceConfig
from gpusm.runtimes.native import NativeRuntime
svc = NativeServiceConfig(name="orphaned",
                          command=[sys.executable, "-c", "import time; time.sleep(60)"],
                          vram_mib=0, health=HealthConfig(tcp="127.0.0.1:9"))
h = NativeRuntime(Path(sys.argv[1])).start(svc, sys.argv[2])
print(json.dumps([h.pid, h.create_time]), flush=True)
sys.stdin.read()
"""


def test_orphan_of_a_killed_coordinator_is_found_by_marker_and_stopped(tmp_path: Path) -> None:
    inst = instance()
    launcher = subprocess.Popen(
        [sys.executable, "-c", LAUNCHER, str(tmp_path / "logs"), inst],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert launcher.stdout is not None
        pid, create_time = json.loads(launcher.stdout.readline())
    finally:
        launcher.kill()
        launcher.wait()
        assert launcher.stdin is not None
        assert launcher.stdout is not None
        launcher.stdin.close()
        launcher.stdout.close()
    mine = NativeRuntime(
        tmp_path / "logs", marker_filter=lambda env: env.get("GPUSM_INSTANCE") == inst
    )
    try:
        found = mine.find_orphans()
        assert found == [Handle("orphaned", inst, pid=pid, create_time=create_time)]
        assert mine.is_alive(found[0])
    finally:
        for handle in mine.find_orphans():
            mine.stop(handle, 1.0)
    assert not alive(pid)
    assert mine.find_orphans() == []


def test_marker_filter_hides_other_instances(rt: NativeRuntime) -> None:
    handle = rt.start(service("filtered", "import time; time.sleep(60)"), instance())
    nobody = NativeRuntime(rt.log_dir, marker_filter=lambda env: False)
    assert nobody.find_orphans() == []
    assert handle in NativeRuntime(rt.log_dir).find_orphans()


def test_stops_a_marked_child_it_did_not_launch_and_reaps_it(tmp_path: Path) -> None:
    inst = instance()
    env = {**os.environ, "GPUSM_SERVICE": "foreign", "GPUSM_INSTANCE": inst}
    proc = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)"], env=env, start_new_session=True
    )
    try:
        rt = NativeRuntime(tmp_path, marker_filter=lambda e: e.get("GPUSM_INSTANCE") == inst)
        eventually(lambda: len(rt.find_orphans()) == 1, what="found by marker")
        (handle,) = rt.find_orphans()
        assert not rt.stop(handle, 1.0).escalated
        # Reaped by the runtime, not left as a zombie for us.
        assert procs.create_time(proc.pid) is None
    finally:
        proc.kill()
        proc.wait()


def test_kill_tree_kills_a_process_and_its_descendants(rt: NativeRuntime, tmp_path: Path) -> None:
    pids_file = tmp_path / "pids"
    handle = rt.start(service("killme", TREE, env={"PIDS": str(pids_file)}), instance())
    eventually(pids_file.exists, what="the tree is up")
    pids = [int(p) for p in pids_file.read_text().split()]
    assert handle.pid is not None
    kill_tree(handle.pid)
    eventually(lambda: not any(alive(pid) for pid in pids), what="tree gone")
    kill_tree(handle.pid)  # already gone: nothing to do, no error


def test_finished_children_are_forgotten_beyond_a_bound(
    rt: NativeRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(native, "_KEEP_FINISHED", 1)
    handles = [rt.start(service("brief", "pass"), instance()) for _ in range(4)]
    for handle in handles:
        eventually(lambda h=handle: not rt.is_alive(h))  # type: ignore[misc]
    rt.start(service("brief", "pass"), instance())
    assert rt.exit_code(handles[0]) is None  # forgotten
    assert rt.exit_code(handles[-1]) == 0
