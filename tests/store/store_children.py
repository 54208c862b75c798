"""Child processes that write to an event store (store_child.py), always reaped."""

from __future__ import annotations

import selectors
import subprocess
import sys
from pathlib import Path

CHILD = Path(__file__).with_name("store_child.py")


class Children:
    """Child processes running store_child.py; killed and reaped at teardown, reads bounded."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[str]] = []

    def start(self, mode: str, url: str) -> subprocess.Popen[str]:
        """Start ``store_child.py MODE URL`` with pipes to its stdin and stdout."""
        proc = subprocess.Popen(
            [sys.executable, str(CHILD), mode, url],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.procs.append(proc)
        return proc

    @staticmethod
    def line(proc: subprocess.Popen[str], timeout: float = 30.0) -> str:
        """The child's next line; fails the test if none comes within ``timeout``."""
        assert proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            if not sel.select(timeout):
                raise AssertionError(f"child {proc.pid} said nothing for {timeout}s")
        return proc.stdout.readline().strip()

    def reap(self, proc: subprocess.Popen[str]) -> int:
        """Kill (if still running) and wait for ``proc``; returns its exit status."""
        if proc.poll() is None:
            proc.kill()
        code = proc.wait(timeout=30)
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                pipe.close()
        return code

    def close(self) -> None:
        """Reap every child still around."""
        for proc in self.procs:
            self.reap(proc)
