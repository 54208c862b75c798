"""Prometheus metrics of one API app, in its own registry (never the global one).

Gauges are read from ``Coordinator.status()`` at scrape time. Counters and histograms
are folded from the event log: each scrape reads the events after the last one it saw
(by ``seq``), so they count the whole log, across daemon restarts, and nothing is lost
between scrapes. Phase-switch times and refused requests are observed by the API itself.
Webhook families are read from the notifier's status at scrape time (counts since the
daemon started).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from gpusm.domain.events import COORDINATOR_STREAM, RecordedEvent
from gpusm.domain.states import State
from gpusm.engine.coordinator import Coordinator
from gpusm.errors import GpusmError
from gpusm.ports import EventQuery, WebhookStatus
from gpusm.results import PhaseResult

__all__ = ["METRIC_NAMES", "Metrics"]

_MIB = 1024 * 1024
_LEASE_ENDS = {"LeaseRevoked": "revoked", "LeaseExpired": "expired"}
_PAGE = 1000
_SLOW = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_FAST = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

# Every family this module exposes (a test pins the list).
METRIC_NAMES = (
    "gpusm_recovered",
    "gpusm_device_vram_total_bytes",
    "gpusm_device_vram_used_bytes",
    "gpusm_device_vram_free_bytes",
    "gpusm_device_vram_foreign_bytes",
    "gpusm_device_vram_admission_free_bytes",
    "gpusm_service_reservation_bytes",
    "gpusm_service_vram_used_bytes",
    "gpusm_service_state",
    "gpusm_ooms",
    "gpusm_transitions",
    "gpusm_evictions",
    "gpusm_preemptions",
    "gpusm_refused_requests",
    "gpusm_leases_ended",
    "gpusm_time_to_healthy_seconds",
    "gpusm_stop_seconds",
    "gpusm_reclaim_seconds",
    "gpusm_phase_switch_seconds",
    "gpusm_proxy_requests",
    "gpusm_proxy_wait_seconds",
    "gpusm_proxy_inflight",
    "gpusm_webhook_deliveries",
    "gpusm_webhook_events_delivered",
    "gpusm_webhook_pending_events",
    "gpusm_webhook_consecutive_failures",
)


class _Live:
    """A collector of gauges computed from the coordinator's status at each scrape."""

    def __init__(self, coordinator: Callable[[], Coordinator | None]) -> None:
        self._coordinator = coordinator

    def describe(self) -> Iterable[Metric]:
        return list(self._families())

    def collect(self) -> Iterable[Metric]:
        coordinator = self._coordinator()
        return list(self._families(coordinator))

    def _families(self, coordinator: Coordinator | None = None) -> Iterator[Metric]:
        recovered = GaugeMetricFamily(
            "gpusm_recovered", "1 once recovery has finished and the API serves requests"
        )
        device = {
            key: GaugeMetricFamily(
                f"gpusm_device_vram_{key}_bytes", help_, labels=["device", "name"]
            )
            for key, help_ in (
                ("total", "GPU memory in total"),
                ("used", "GPU memory in use (driver-reported)"),
                ("free", "GPU memory free (driver-reported)"),
                ("foreign", "GPU memory held by processes gpusm does not own"),
                ("admission_free", "GPU memory free for admitting a new service"),
            )
        }
        reservation = GaugeMetricFamily(
            "gpusm_service_reservation_bytes",
            "max(declared vram_mib, learned peak) of each service",
            labels=["service"],
        )
        used = GaugeMetricFamily(
            "gpusm_service_vram_used_bytes",
            "GPU memory attributed to each service's processes now",
            labels=["service"],
        )
        state = GaugeMetricFamily(
            "gpusm_service_state",
            "1 for the state each service is in, else 0",
            labels=["service", "state"],
        )
        ooms = CounterMetricFamily(
            "gpusm_ooms", "Out-of-memory allocations seen (simulated GPU only; else 0)"
        )
        if coordinator is not None:
            status = coordinator.status()
            recovered.add_metric([], 1.0 if status.recovered else 0.0)
            for dev in status.devices:
                labels = [str(dev.index), dev.name]
                device["total"].add_metric(labels, dev.total_mib * _MIB)
                device["used"].add_metric(labels, dev.used_mib * _MIB)
                device["free"].add_metric(labels, dev.free_mib * _MIB)
                device["foreign"].add_metric(labels, dev.foreign_mib * _MIB)
                device["admission_free"].add_metric(labels, dev.free_for_admission_mib * _MIB)
            for svc in status.services:
                reservation.add_metric([svc.name], svc.reservation_mib * _MIB)
                used.add_metric([svc.name], svc.used_mib * _MIB)
                for each in State:
                    state.add_metric([svc.name, each.value], 1.0 if svc.state == each else 0.0)
            ooms.add_metric([], float(_oom_count(coordinator)))
        yield recovered
        yield from device.values()
        yield from (reservation, used, state, ooms)


class _Webhooks:
    """A collector of each webhook's delivery counts, read at each scrape."""

    def __init__(self, webhooks: Callable[[], Sequence[WebhookStatus]]) -> None:
        self._webhooks = webhooks

    def describe(self) -> Iterable[Metric]:
        return list(self._families(()))

    def collect(self) -> Iterable[Metric]:
        return list(self._families(self._webhooks()))

    def _families(self, hooks: Sequence[WebhookStatus]) -> Iterator[Metric]:
        deliveries = CounterMetricFamily(
            "gpusm_webhook_deliveries",
            "Webhook POSTs since the daemon started, by result (ok: 2xx; failed: retried)",
            labels=["webhook", "result"],
        )
        delivered = CounterMetricFamily(
            "gpusm_webhook_events_delivered",
            "Events acknowledged by each webhook's receiver since the daemon started",
            labels=["webhook"],
        )
        pending = GaugeMetricFamily(
            "gpusm_webhook_pending_events",
            "Events in the log that each webhook has yet to deliver (its lag)",
            labels=["webhook"],
        )
        failures = GaugeMetricFamily(
            "gpusm_webhook_consecutive_failures",
            "Failed POSTs in a row (0 once a delivery succeeds)",
            labels=["webhook"],
        )
        for hook in hooks:
            deliveries.add_metric([hook.name, "ok"], hook.deliveries_ok)
            deliveries.add_metric([hook.name, "failed"], hook.deliveries_failed)
            delivered.add_metric([hook.name], hook.delivered_events)
            pending.add_metric([hook.name], hook.pending)
            failures.add_metric([hook.name], hook.consecutive_failures)
        yield from (deliveries, delivered, pending, failures)


def _oom_count(coordinator: Coordinator) -> int:
    try:
        return coordinator.oom_count() or 0
    except GpusmError:
        return 0


class Metrics:
    """The metrics of one app: call :meth:`render` to scrape (thread-safe)."""

    def __init__(
        self,
        coordinator: Callable[[], Coordinator | None],
        webhooks: Callable[[], Sequence[WebhookStatus]] = tuple,
    ) -> None:
        self._coordinator = coordinator
        self._lock = threading.Lock()
        self._after_seq = 0
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Live(coordinator))
        self.registry.register(_Webhooks(webhooks))
        reg = self.registry
        self.transitions = Counter(
            "gpusm_transitions", "Service events recorded, by type", ["type"], registry=reg
        )
        self.evictions = Counter(
            "gpusm_evictions", "Idle services stopped to make room", ["service"], registry=reg
        )
        self.preemptions = Counter(
            "gpusm_preemptions",
            "In-use services stopped for a higher-priority request",
            ["service"],
            registry=reg,
        )
        self.refused = Counter(
            "gpusm_refused_requests",
            "Requests answered 409, by problem type",
            ["reason"],
            registry=reg,
        )
        self.leases_ended = Counter(
            "gpusm_leases_ended",
            "Leases that ended without a release: revoked (their service was preempted "
            "or stopped) or expired (their client went silent)",
            ["how"],
            registry=reg,
        )
        self.time_to_healthy = Histogram(
            "gpusm_time_to_healthy_seconds",
            "Start to healthy",
            ["service"],
            buckets=_SLOW,
            registry=reg,
        )
        self.stop_time = Histogram(
            "gpusm_stop_seconds", "Signal to exit", ["service"], buckets=_FAST, registry=reg
        )
        self.reclaim_time = Histogram(
            "gpusm_reclaim_seconds",
            "Exit to VRAM seen free",
            ["service"],
            buckets=_FAST,
            registry=reg,
        )
        self.phase_switch = Histogram(
            "gpusm_phase_switch_seconds",
            "Phase request to all its services healthy (API calls)",
            ["phase"],
            buckets=_SLOW,
            registry=reg,
        )

        self.proxy_requests = Counter(
            "gpusm_proxy_requests",
            "Requests through the proxy, by service and answer status",
            ["service", "code"],
            registry=reg,
        )
        self.proxy_wait = Histogram(
            "gpusm_proxy_wait_seconds",
            "How long a proxied request waited for its service to be healthy",
            ["service"],
            buckets=_SLOW,
            registry=reg,
        )
        self.proxy_inflight = Gauge(
            "gpusm_proxy_inflight",
            "Proxied requests holding a lease now (waiting, or being answered)",
            ["service"],
            registry=reg,
        )

    def observe_phase(self, result: PhaseResult) -> None:
        """Record how long a phase switch took."""
        self.phase_switch.labels(result.phase).observe(result.waited_s)

    def refuse(self, reason: str) -> None:
        """Count a request answered 409."""
        self.refused.labels(reason).inc()

    def fold(self, events: Iterable[RecordedEvent]) -> None:
        """Count ``events`` into the counters and histograms."""
        for event in events:
            self._after_seq = max(self._after_seq, event.seq)
            if event.stream == COORDINATOR_STREAM:
                how = _LEASE_ENDS.get(event.type)
                if how is not None:
                    self.leases_ended.labels(how).inc()
                continue
            self.transitions.labels(event.type).inc()
            service = event.stream
            if event.type == "Evicted":
                self.evictions.labels(service).inc()
            elif event.type == "Preempted":
                self.preemptions.labels(service).inc()
            for kind, key, histogram in (
                ("HealthPassed", "time_to_healthy_s", self.time_to_healthy),
                ("Stopped", "stop_s", self.stop_time),
                ("Stopped", "reclaim_s", self.reclaim_time),
            ):
                value = event.data.get(key) if event.type == kind else None
                if isinstance(value, int | float) and not isinstance(value, bool):
                    histogram.labels(service).observe(float(value))

    def catch_up(self) -> None:
        """Fold every event recorded since the last call."""
        coordinator = self._coordinator()
        if coordinator is None:
            return
        with self._lock:
            while True:
                page = coordinator.events(EventQuery(after_seq=self._after_seq, limit=_PAGE))
                self.fold(page)
                if len(page) < _PAGE:
                    return

    def render(self) -> bytes:
        """The Prometheus text exposition, after catching up with the log."""
        self.catch_up()
        return generate_latest(self.registry)
