"""Helpers for simulated-GPU tests: holder processes that are always cleaned up, free ports."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.support.ports import free_port

__all__ = ["Spawner", "free_port"]

# Allocates argv[2] MiB on the sim GPU at argv[1], says so, and exits when stdin closes.
_HOLDER = """
import sys
from pathlib import Path
from gpusm.gpu.sim import SimGpu
SimGpu(Path(sys.argv[1])).allocate(int(sys.argv[2]))
print("holding", flush=True)
sys.stdin.read()
"""


class Spawner:
    """Starts child processes and kills every one still running at teardown."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[str]] = []

    def popen(self, argv: list[str], **kwargs: object) -> subprocess.Popen[str]:
        proc = subprocess.Popen(argv, text=True, **kwargs)  # type: ignore[call-overload]
        self.procs.append(proc)
        return proc  # type: ignore[no-any-return]

    def holder(self, sim_dir: Path, mib: int) -> subprocess.Popen[str]:
        """A process holding ``mib`` MiB; close its stdin (or kill it) to end it."""
        proc = self.popen(
            [sys.executable, "-c", _HOLDER, str(sim_dir), str(mib)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "holding"
        return proc

    def sleeper(self) -> subprocess.Popen[str]:
        """A process that does nothing until killed or its stdin closes."""
        return self.popen(
            [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
        )

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
