"""Prometheus metrics: what operators alert on.

One registry per site (not prometheus_client's global one), so several
services in one process, as in the tests, keep their counts apart.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from twisted.web import resource, server

SIZE_BUCKETS = tuple(float(1024**2 * 4**i) for i in range(8))  # 1 MiB .. 16 GiB
DURATION_BUCKETS = (0.01, 0.1, 0.5, 1, 5, 15, 60, 300, 1800, 3600)


class Metrics:
    def __init__(self, pending_tickets: Callable[[], int], free_bytes: Callable[[], float]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.connections = Gauge(
            "wsfiles_connections",
            "Open WebSocket connections",
            ["channel"],
            registry=self.registry,
        )
        self.transfers_started = Counter(
            "wsfiles_transfers_started", "Transfers started", ["op"], registry=self.registry
        )
        self.transfers_finished = Counter(
            "wsfiles_transfers_finished",
            "Transfers that completed",
            ["op"],
            registry=self.registry,
        )
        self.transfers_failed = Counter(
            "wsfiles_transfers_failed",
            "Transfers that failed, by error code",
            ["op", "code"],
            registry=self.registry,
        )
        self.bytes_in = Counter(
            "wsfiles_bytes_received", "File bytes received from clients", registry=self.registry
        )
        self.bytes_out = Counter(
            "wsfiles_bytes_sent", "File bytes sent to clients", registry=self.registry
        )
        self.duration = Histogram(
            "wsfiles_transfer_duration_seconds",
            "How long transfers take",
            ["op"],
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.size = Histogram(
            "wsfiles_transfer_size_bytes",
            "Sizes of transferred files",
            ["op"],
            buckets=SIZE_BUCKETS,
            registry=self.registry,
        )
        self.refusals = Counter(
            "wsfiles_refusals",
            "Commands and handshakes refused, by error code or HTTP status",
            ["code"],
            registry=self.registry,
        )
        tickets = Gauge(
            "wsfiles_pending_tickets", "File channel tickets not yet used", registry=self.registry
        )
        tickets.set_function(pending_tickets)
        free = Gauge(
            "wsfiles_storage_free_bytes",
            "Free bytes where files are stored",
            registry=self.registry,
        )
        free.set_function(free_bytes)
        for channel in ("command", "file"):
            self.connections.labels(channel)

    def transfer_started(self, op: str) -> None:
        self.transfers_started.labels(op).inc()

    def transfer_ended(self, op: str, result: str, moved: int, size: int, seconds: float) -> None:
        (self.bytes_in if op == "save" else self.bytes_out).inc(moved)
        if result == "ok":
            self.transfers_finished.labels(op).inc()
            self.duration.labels(op).observe(seconds)
            self.size.labels(op).observe(size)
        else:
            self.transfers_failed.labels(op, result).inc()


class MetricsPage(resource.Resource):
    """``GET /metrics`` in Prometheus' text format."""

    isLeaf = True

    def __init__(self, metrics: Metrics) -> None:
        super().__init__()
        self._metrics = metrics

    def render_GET(self, request: server.Request) -> bytes:
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
        return generate_latest(self._metrics.registry)
