"""systemd's notify protocol (``Type=notify``), with the standard library only.

systemd gives a ``Type=notify`` service the address of a datagram socket in
``$NOTIFY_SOCKET`` (a path, or ``@name`` for an abstract socket) and waits for
``READY=1`` before it counts the start as done. ``gpusm serve`` sends:

- ``READY=1`` (with ``STATUS=``) once recovery has finished and the API answers;
- ``STOPPING=1`` when it begins to shut down;
- ``RELOADING=1`` then ``READY=1`` around a reload: wrap the reload in
  :func:`reloading`.

Without ``$NOTIFY_SOCKET`` (not under systemd) every call does nothing and returns
False. A send that fails is logged and never raises: a daemon must not die because
its supervisor went away. :func:`claim` takes the address out of the environment,
so the services gpusm starts do not inherit it (``NotifyAccess=main`` would ignore
them, but a service that speaks the protocol itself would log the rejections).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = [
    "NOTIFY_SOCKET_ENV",
    "claim",
    "enabled",
    "notify",
    "ready",
    "reloading",
    "status",
    "stopping",
]

NOTIFY_SOCKET_ENV = "NOTIFY_SOCKET"

_log = logging.getLogger("gpusm.sd_notify")
# The address taken by claim(); None means "read the environment at each call".
_claimed: str | None = None


def claim() -> bool:
    """Take ``$NOTIFY_SOCKET`` out of the environment and keep it for this process.

    Returns whether there is a socket to notify. Later calls keep the first address.
    """
    global _claimed
    address = os.environ.pop(NOTIFY_SOCKET_ENV, "")
    if _claimed is None and address:
        _claimed = address
    return enabled()


def enabled() -> bool:
    """Whether there is a socket to notify (claimed, or in the environment)."""
    return bool(_address())


def notify(*assignments: str) -> bool:
    """Send ``KEY=VALUE`` lines in one datagram; True if it was sent.

    A no-op (False) without a notify socket; a failed send is logged, not raised.
    """
    address = _address()
    if not address or not assignments:
        return False
    # "@name" is an abstract socket: its name starts with a NUL byte.
    target = "\0" + address[1:] if address.startswith("@") else address
    message = "\n".join(assignments).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(target)
            sock.sendall(message)
    except OSError as exc:
        _log.warning("cannot notify systemd at %s: %s", address, exc)
        return False
    return True


def ready(status_text: str | None = None) -> bool:
    """Tell systemd the service is up (``READY=1``), with an optional status line."""
    return notify("READY=1", *_status(status_text))


def stopping(status_text: str | None = None) -> bool:
    """Tell systemd the service is shutting down (``STOPPING=1``)."""
    return notify("STOPPING=1", *_status(status_text))


def status(status_text: str) -> bool:
    """Set the one-line status ``systemctl status`` shows."""
    return notify(*_status(status_text))


@contextmanager
def reloading(status_text: str | None = None) -> Iterator[None]:
    """Bracket a reload: ``RELOADING=1`` now, ``READY=1`` when the block ends, even on error.

    systemd wants the monotonic time with ``RELOADING=1`` so it can tell this reload
    from an earlier one. If the block raises, ``READY=1`` still follows: the daemon
    keeps serving with its previous configuration.
    """
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notify("RELOADING=1", f"MONOTONIC_USEC={usec}", *_status("reloading"))
    try:
        yield
    finally:
        ready(status_text)


def _status(text: str | None) -> list[str]:
    # A status is one line: systemd reads the datagram line by line.
    return [] if text is None else ["STATUS=" + " ".join(text.split())]


def _address() -> str:
    return _claimed or os.environ.get(NOTIFY_SOCKET_ENV, "")
