"""Loopback ports for tests."""

from __future__ import annotations

import socket
import threading

__all__ = ["free_port"]

_given: set[int] = set()
_lock = threading.Lock()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago and was not handed out before in
    this run (the OS may offer the same free port twice in a row, and a config with two
    services on one port is refused)."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        with _lock:
            if port not in _given:
                _given.add(port)
                return port
