"""Run ``python -m gpusm serve`` as a real subprocess for tests, and always clean it up."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from gpusm import Coordinator
from tests.support import eventually


class Daemon:
    """A ``gpusm serve -c CONFIG`` child; :meth:`stop` ends it and every service it left."""

    def __init__(self, config: Path, url: str, token: str, *args: str) -> None:
        self.config = config
        self.url = url
        env = {**os.environ, "GPUSM_TOKEN": token}
        self.log = config.parent / "serve.log"
        self._out = self.log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gpusm", "serve", "-c", str(config), *args],
            stdout=self._out,
            stderr=subprocess.STDOUT,
            env=env,
        )

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Until /healthz says ok (recovery finished)."""

        def ready_or_exited() -> bool:
            if self.proc.poll() is not None:
                return True
            try:
                return bool(httpx.get(f"{self.url}/healthz", timeout=1).json()["status"] == "ok")
            except httpx.HTTPError:
                return False

        try:
            eventually(ready_or_exited, timeout, "gpusm serve to be ready")
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {self.log.read_text()}") from None
        if self.proc.poll() is not None:
            raise AssertionError(f"gpusm serve exited: {self.log.read_text()}")

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, wait, and stop whatever services are left; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._out.close()
        # Whatever the daemon left running is adopted and stopped here.
        Coordinator.from_config(self.config, monitor=False).close(stop_services=True)
        return self.proc.returncode
