"""What one API app holds: the config, the token, and the coordinator once it has recovered.

Recovery (:func:`gpusm.wiring.open_coordinator`: lock, replay, observe, reconcile) runs in a
background thread started by the app's lifespan, so the port is answering (503 with
``Retry-After``) while it runs. If it fails, :attr:`ApiState.error` says why and
``on_fatal`` is called (``gpusm serve`` then shuts the server down). The webhooks of
``notify:`` have their cursors loaded before recovery (so a new webhook also gets what
recovery records) and start delivering once it has finished.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable

import anyio.to_thread

from gpusm.api.metrics import Metrics
from gpusm.api.problems import HttpProblem
from gpusm.config import Config
from gpusm.engine.coordinator import Coordinator
from gpusm.errors import GpusmError, ReloadRefused
from gpusm.ports import Notifier, WebhookStatus
from gpusm.results import ReloadResult
from gpusm.wire import DaemonStatus, to_json

__all__ = ["ApiState", "CoordinatorFactory"]

CoordinatorFactory = Callable[[Config], Coordinator]
_log = logging.getLogger("gpusm.api")


def _status_json(coordinator: Coordinator, webhooks: Callable[[], list[WebhookStatus]]) -> bytes:
    status = coordinator.status()
    return to_json(DaemonStatus(**vars(status), webhooks=tuple(webhooks())))


def _default_factory(config: Config) -> Coordinator:
    from gpusm.wiring import open_coordinator

    return open_coordinator(config)


def _open_notifier(config: Config) -> Notifier | None:
    from gpusm.wiring import open_notifier

    return open_notifier(config)


class ApiState:
    """The app's shared state; :attr:`coordinator` is None until recovery has finished."""

    def __init__(
        self,
        config: Config,
        token: str,
        *,
        factory: CoordinatorFactory | None = None,
        on_fatal: Callable[[BaseException], None] | None = None,
        stop_services_on_exit: bool = False,
    ) -> None:
        self.config = config
        self.token = token
        self.coordinator: Coordinator | None = None
        self.notifier: Notifier | None = None
        self.error: BaseException | None = None
        self.metrics = Metrics(lambda: self.coordinator, webhooks=self.webhooks)
        self._factory = factory or _default_factory
        self._on_fatal = on_fatal
        self._stop_services = stop_services_on_exit
        self._thread: threading.Thread | None = None
        self._closing = False
        self._status_task: asyncio.Future[bytes] | None = None

    @property
    def phase(self) -> str:
        """``ok``, ``recovering``, ``failed`` or ``stopping``."""
        if self.coordinator is not None:
            return "ok"
        if self._closing:
            return "stopping"
        return "failed" if self.error is not None else "recovering"

    async def status_json(self, coordinator: Coordinator) -> bytes:
        """``coordinator.status()`` as JSON, computed once for all concurrent readers.

        A reader that arrives while a status is being computed (in a worker thread)
        awaits that one instead of queueing for the coordinator's lock behind every
        other reader: a hundred readers cost one computation and one serialisation,
        and no answer is older than the computation it shares.
        """
        task = self._status_task
        if task is None:
            task = asyncio.ensure_future(
                anyio.to_thread.run_sync(_status_json, coordinator, self.webhooks)
            )
            self._status_task = task
            task.add_done_callback(self._status_done)
        # shield: a reader that hangs up must not cancel the others' answer.
        return await asyncio.shield(task)

    def webhooks(self) -> list[WebhookStatus]:
        """How each webhook's deliveries stand ([] without ``notify:`` or before recovery)."""
        notifier = self.notifier
        return [] if notifier is None else notifier.status()

    def _status_done(self, task: asyncio.Future[bytes]) -> None:
        if self._status_task is task:
            self._status_task = None

    def unavailable(self) -> HttpProblem:
        """The 503 problem to answer while there is no coordinator to serve."""
        if self._closing:
            return HttpProblem(
                "stopping", "the gpusm daemon is shutting down", {"Retry-After": "1"}
            )
        if self.error is not None:
            return HttpProblem(
                "recovery-failed", f"recovery failed: {self.error}; the daemon is stopping"
            )
        return HttpProblem(
            "recovering",
            "the gpusm daemon is recovering (replay, observe, reconcile); retry shortly",
            {"Retry-After": "1"},
        )

    def reload(self, by: str) -> ReloadResult:
        """Read the config file again and apply it (see ``Coordinator.reload``); the API's
        own settings (e.g. ``api.lease_ttl_s``) and the webhooks follow. ReloadRefused while
        recovering."""
        coordinator = self.coordinator
        if coordinator is None:
            raise ReloadRefused("the daemon is still recovering; reload once it serves")
        result = coordinator.reload(by=by)
        previous, self.config = self.config, coordinator.config
        if self.config.notify != previous.notify:
            self._replace_notifier()
        return result

    def _replace_notifier(self) -> None:
        """``notify:`` changed: its new webhooks replace the old (a kept name keeps its
        cursor). Unreadable secrets leave the old ones running, logged."""
        try:
            notifier = _open_notifier(self.config)
        except GpusmError as exc:
            _log.error("webhooks left as they were: %s", exc)
            return
        old, self.notifier = self.notifier, notifier
        if old is not None:
            old.close()
        if notifier is not None:
            notifier.start()

    def start_recovery(self) -> None:
        """Open the coordinator in a background thread (once)."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._recover, name="gpusm-recovery", daemon=True
            )
            self._thread.start()

    def _recover(self) -> None:
        notifier: Notifier | None = None
        try:
            notifier = _open_notifier(self.config)
            coordinator = self._factory(self.config)
        except BaseException as exc:
            if notifier is not None:
                notifier.close()
            self.error = exc
            if not isinstance(exc, GpusmError):
                _log.exception("recovery failed")
            if self._on_fatal is not None:
                self._on_fatal(exc)
            return
        if notifier is not None:
            notifier.start()
        self.notifier = notifier
        self.coordinator = coordinator

    def close(self) -> None:
        """Wait for recovery, then close the coordinator (services keep running unless asked)."""
        if self._thread is not None:
            # Recovery cannot be interrupted halfway; its coordinator is closed below.
            self._thread.join()
        self._closing = True
        notifier = self.notifier
        if notifier is not None:
            notifier.close()
        coordinator, self.coordinator = self.coordinator, None
        if coordinator is not None:
            # Closing is best effort: the log already holds everything that happened.
            with contextlib.suppress(GpusmError):
                coordinator.close(stop_services=self._stop_services)
