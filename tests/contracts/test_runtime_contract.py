"""The runtime contract, run against the native runtime and the in-memory fake."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from gpusm.config import HealthConfig, NativeServiceConfig, ServiceConfig
from gpusm.errors import ServiceStartFailed
from gpusm.ports import Handle, Runtime
from gpusm.runtimes import MemoryRuntime, NativeRuntime
from tests.contracts.runtime_contract import RuntimeContract
from tests.support import eventually

_HEALTH = HealthConfig(tcp="127.0.0.1:9")

# Small Python programs for real processes; each touches $READY_FILE once it is set up.
SLEEP = "import time\nwhile True: time.sleep(1)"
IGNORE_TERM = (
    "import os, pathlib, signal, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "pathlib.Path(os.environ['READY_FILE']).touch()\n"
    "while True: time.sleep(1)"
)
FORK = (
    "import os, pathlib, subprocess, sys, time\n"
    f"code = {SLEEP!r}\n"
    "subprocess.Popen([sys.executable, '-c', code])\n"
    # This child leaves the process group, so only a per-process signal reaches it.
    "subprocess.Popen([sys.executable, '-c', code], start_new_session=True)\n"
    "pathlib.Path(os.environ['READY_FILE']).touch()\n"
    "while True: time.sleep(1)"
)
EXIT = "import sys, time\ntime.sleep(0.2)\nsys.exit({code})"
# Writes each argument on a line of its own, then sleeps.
CHATTY = (
    "import sys, time\n"
    "for line in sys.argv[1:]: print(line)\n"
    "sys.stdout.flush()\n"
    "while True: time.sleep(1)"
)


def python_service(
    name: str, code: str, ready_file: Path | None = None, args: list[str] | None = None
) -> NativeServiceConfig:
    """A native service running ``code`` in this Python; ``READY_FILE`` set if given."""
    env = {"READY_FILE": str(ready_file)} if ready_file else {}
    return NativeServiceConfig(
        name=name,
        command=[sys.executable, "-c", code, *(args or [])],
        env=env,
        vram_mib=0,
        health=_HEALTH,
    )


class TestNativeRuntimeContract(RuntimeContract):
    """Real processes."""

    def create_runtime(self, tmp_path: Path) -> Runtime:
        return NativeRuntime(tmp_path / "logs", kind="native-ct")

    def sleeping_service(self, runtime: Runtime, name: str) -> ServiceConfig:
        return python_service(name, SLEEP)

    def sigterm_ignoring_service(self, runtime: Runtime, name: str) -> ServiceConfig:
        return python_service(name, IGNORE_TERM, self.tmp_path / f"{name}.ready")

    def forking_service(self, runtime: Runtime, name: str) -> ServiceConfig:
        return python_service(name, FORK, self.tmp_path / f"{name}.ready")

    def exiting_service(self, runtime: Runtime, name: str, code: int = 3) -> ServiceConfig:
        return python_service(name, EXIT.format(code=code))

    def chatty_service(self, runtime: Runtime, name: str, lines: list[str]) -> ServiceConfig:
        return python_service(name, CHATTY, args=lines)

    def unstartable_service(self, runtime: Runtime, name: str) -> ServiceConfig:
        return NativeServiceConfig(
            name=name, command=["/nonexistent/gpusm-no-such-program"], vram_mib=0, health=_HEALTH
        )

    def wait_until_ready(self, runtime: Runtime, handle: Handle, service: ServiceConfig) -> None:
        ready = service.env.get("READY_FILE")
        if ready:
            eventually(Path(ready).exists, self.patience_s, f"{service.name} ready")


class TestMemoryRuntimeContract(RuntimeContract):
    """Fake processes in a dict, on the real clock."""

    grace_s = 0.2

    def create_runtime(self, tmp_path: Path) -> Runtime:
        return MemoryRuntime(kind="memory-ct")

    def _fake(self, name: str) -> ServiceConfig:
        return NativeServiceConfig(name=name, command=["fake"], vram_mib=0, health=_HEALTH)

    def sleeping_service(self, runtime: Runtime, name: str) -> ServiceConfig:
        return self._fake(name)

    def sigterm_ignoring_service(self, runtime: Runtime, name: str) -> ServiceConfig:
        assert isinstance(runtime, MemoryRuntime)
        runtime.ignore_term.add(name)
        return self._fake(name)

    def forking_service(self, runtime: Runtime, name: str) -> ServiceConfig:
        assert isinstance(runtime, MemoryRuntime)
        runtime.children[name] = 2
        return self._fake(name)

    def exiting_service(self, runtime: Runtime, name: str, code: int = 3) -> ServiceConfig:
        assert isinstance(runtime, MemoryRuntime)
        runtime.crash_after_s[name] = 0.2
        runtime.crash_exit_code[name] = code
        return self._fake(name)

    def chatty_service(self, runtime: Runtime, name: str, lines: list[str]) -> ServiceConfig:
        assert isinstance(runtime, MemoryRuntime)
        runtime.logs[name] = "".join(f"{line}\n" for line in lines)
        return self._fake(name)

    def unstartable_service(self, runtime: Runtime, name: str) -> ServiceConfig:
        assert isinstance(runtime, MemoryRuntime)
        runtime.fail_next_start = FileNotFoundError("no such program")
        return self._fake(name)

    def crash(self, runtime: Runtime, handle: Handle) -> None:
        assert isinstance(runtime, MemoryRuntime)
        runtime.kill(handle.service)

    def pid_exists(self, runtime: Runtime, pid: int) -> bool:
        assert isinstance(runtime, MemoryRuntime)
        return runtime.pid_alive(pid)

    def reopen_runtime(self, runtime: Runtime, tmp_path: Path) -> Runtime:
        assert isinstance(runtime, MemoryRuntime)
        return runtime.reopen()


def test_memory_runtime_passes_a_service_start_failed_through_unchanged() -> None:
    runtime = MemoryRuntime()
    error = ServiceStartFailed("x", "boom")
    runtime.fail_next_start = error
    with pytest.raises(ServiceStartFailed) as info:
        runtime.start(NativeServiceConfig(name="x", command=["f"], vram_mib=0, health=_HEALTH), "i")
    assert info.value is error
