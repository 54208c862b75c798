"""A webhook receiver on 127.0.0.1 for tests: it can refuse, hang, go down and come back.

It checks every POST the way the README tells a receiver to (HMAC-SHA256 over
``<timestamp>.<body>``), independently of ``gpusm.notify.signing``, and keeps what came.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["Delivery", "Receiver", "verify_signature"]


def verify_signature(secret: bytes, headers: dict[str, str], body: bytes) -> bool:
    """The README's check: a fresh timestamp and a matching signature."""
    timestamp = headers.get("x-gpusm-timestamp", "")
    signature = headers.get("x-gpusm-signature", "")
    if not timestamp.isdigit() or abs(time.time() - int(timestamp)) > 300:
        return False
    expected = hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(f"sha256={expected}", signature)


@dataclass
class Delivery:
    """One POST as received, and what it was answered."""

    headers: dict[str, str]
    body: bytes
    signed: bool
    answered: int

    @property
    def seqs(self) -> list[int]:
        return [int(e["seq"]) for e in json.loads(self.body)["events"]]

    @property
    def events(self) -> list[dict[str, Any]]:
        return list(json.loads(self.body)["events"])


@dataclass
class _Behaviour:
    fail_next: int = 0
    hold: threading.Event | None = None
    held: threading.Event = field(default_factory=threading.Event)


class Receiver:
    """Serves on ``port`` (0: a free one, kept across :meth:`down` / :meth:`up`)."""

    def __init__(self, secret: bytes, port: int = 0) -> None:
        self.secret = secret
        self.port = port
        self.deliveries: list[Delivery] = []
        self.behaviour = _Behaviour()
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def up(self) -> Receiver:
        """Start serving (again, on the same port)."""
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                headers = {k.lower(): v for k, v in self.headers.items()}
                code = receiver._answer()
                with receiver._lock:
                    receiver.deliveries.append(
                        Delivery(
                            headers, body, verify_signature(receiver.secret, headers, body), code
                        )
                    )
                hold = receiver.behaviour.hold
                if hold is not None and code == 200:
                    receiver.behaviour.held.set()
                    hold.wait(60)
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def down(self) -> None:
        """Stop serving and close the port (connections are refused until :meth:`up`)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None

    def _answer(self) -> int:
        with self._lock:
            if self.behaviour.fail_next > 0:
                self.behaviour.fail_next -= 1
                return 503
        return 200

    def accepted(self) -> list[Delivery]:
        """The deliveries answered 2xx, in arrival order."""
        with self._lock:
            return [d for d in self.deliveries if d.answered == 200]

    def accepted_seqs(self) -> list[int]:
        """Every seq in an accepted delivery, in arrival order (duplicates kept)."""
        return [seq for d in self.accepted() for seq in d.seqs]
