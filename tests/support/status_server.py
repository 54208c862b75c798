"""A real HTTP server on 127.0.0.1 whose every GET answers a status the test sets."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

__all__ = ["StatusServer"]


class StatusServer:
    """Answers every GET with ``status``, after ``delay_s`` if set; ``close()`` stops it.

    A delayed answer is cut short by ``close()``, so a test never waits for it.
    """

    def __init__(self, status: int = 503) -> None:
        self.status = status
        self.delay_s = 0.0
        self.release = threading.Event()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if owner.delay_s:
                    owner.release.wait(owner.delay_s)
                self.send_response(owner.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/health"
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def close(self) -> None:
        """Stop serving and release any delayed answer; idempotent."""
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)

    def __enter__(self) -> StatusServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
