"""One coordinator per state directory, enforced with an OS file lock."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from gpusm.config import make_folder
from gpusm.errors import ConfigError, CoordinatorBusy

__all__ = ["StateDirLock"]


class StateDirLock:
    """An exclusive ``flock`` on ``<state_dir>/coordinator.lock``; the file holds the owner's pid.

    The kernel drops the lock when the owner dies, however it dies, so a crashed
    coordinator never blocks its successor.
    """

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "coordinator.lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise CoordinatorBusy naming the holder's pid.

        A state directory that cannot be created or written is a ConfigError naming
        ``state_dir`` and the fix, never a bare OS error.
        """
        make_folder(self.path.parent, "state_dir")
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise ConfigError(
                "state_dir",
                "",
                f"cannot create or write {self.path} ({exc.strerror or exc})",
                "set state_dir to a folder that gpusm may create and write",
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise CoordinatorBusy(
                f"state directory {self.path.parent} is owned by coordinator pid {holder}; "
                "stop it, talk to it through `gpusm serve`'s API, or use another state_dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Drop the lock; idempotent."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)
