"""Run the API in a background thread of this process (tests, notebooks, embedding).

``gpusm serve`` runs uvicorn in the main thread instead; this is the same app and the
same server, without signal handling.
"""

from __future__ import annotations

import threading
import time
from types import TracebackType
from typing import Any

from gpusm.api.app import create_app, state_of
from gpusm.api.server import bind, bind_listeners, bound_port, make_server
from gpusm.api.state import ApiState
from gpusm.config import Config
from gpusm.errors import GpusmError
from gpusm.wire import Listen

__all__ = ["ThreadedServer"]


class ThreadedServer:
    """``create_app(config, **app_kwargs)`` served on ``host:port`` (0 = a free port).

    :meth:`start` returns once the port answers; recovery may still be running (see
    :meth:`wait_recovered`). :meth:`stop` shuts down gracefully and joins the thread.
    """

    def __init__(
        self, config: Config, *, host: str = "127.0.0.1", port: int = 0, **app_kwargs: Any
    ) -> None:
        self.app = create_app(config, **app_kwargs)
        self._listen = Listen(host, port)
        self._config = config
        self._server = make_server(self.app)
        self._thread: threading.Thread | None = None
        self.port = 0

    @property
    def state(self) -> ApiState:
        """The app's state (the coordinator, once recovered)."""
        return state_of(self.app)

    @property
    def url(self) -> str:
        """Base URL of the running server."""
        return Listen(self._listen.host, self.port).url

    def start(self, timeout: float = 30.0) -> ThreadedServer:
        """Bind, serve in a thread, and wait until uvicorn has started."""
        sock = bind(self._listen)
        self.port = bound_port(sock)
        # The services' own listeners are served too, as by ``gpusm serve``.
        sockets = [sock, *bind_listeners(self._config)]
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": sockets}, name="gpusm-api", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise GpusmError(f"the API server did not start on {self.url}")
            time.sleep(0.01)
        return self

    def wait_recovered(self, timeout: float = 60.0) -> None:
        """Block until recovery has finished; GpusmError if it failed or took too long."""
        deadline = time.monotonic() + timeout
        while self.state.coordinator is None:
            if self.state.error is not None:
                raise GpusmError(f"recovery failed: {self.state.error}")
            if time.monotonic() > deadline:
                raise GpusmError(f"recovery did not finish within {timeout} s")
            time.sleep(0.01)

    def stop(self, timeout: float = 60.0) -> None:
        """Shut down (the lifespan closes the coordinator) and join the thread; idempotent."""
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise GpusmError(f"the API server thread did not stop within {timeout} s")
            self._thread = None

    def __enter__(self) -> ThreadedServer:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
