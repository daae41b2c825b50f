"""Prometheus metrics, in a registry of our own so several servers can live in one process (tests)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics import MetricWrapperBase

CONTENT_TYPE = CONTENT_TYPE_LATEST
# The *_created series double the scrape size and no dashboard of ours reads them.
disable_created_metrics()


class Children:
    """A labelled metric's children, each looked up once: `labels()` checks its arguments and takes a
    lock on every call, a cost the HTTP path would pay per request. The labels are as bounded as the
    metric's own series (the cache holds the same children the metric does)."""

    __slots__ = ("_metric", "_children")

    def __init__(self, metric: MetricWrapperBase) -> None:
        self._metric = metric
        self._children: dict[tuple[object, ...], Any] = {}

    def __call__(self, *values: object) -> Any:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._metric.labels(*(str(value) for value in values))
        return child


class Metrics:
    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        self.connections = Gauge(
            "push_connections", "Open client connections", ["transport"], registry=registry)
        self.connects_refused = Counter(
            "push_connects_refused_total", "Connection attempts refused, by reason", ["reason"], registry=registry)
        self.joins = Counter(
            "push_joins_total", "Channel joins accepted, by topic family", ["family"], registry=registry)
        self.leaves = Counter(
            "push_leaves_total", "Channels left (leave, replaced or disconnect), by topic family", ["family"],
            registry=registry)
        self.joins_refused = Counter(
            "push_joins_refused_total", "Channel joins refused, by reason", ["reason"], registry=registry)
        self.client_errors = Counter(
            "push_client_errors_total", "Bad or refused client frames, by reason", ["reason"], registry=registry)
        self.disconnects = Counter(
            "push_disconnects_total", "Connections closed by the server, by reason", ["reason"], registry=registry)
        self.slow_consumers = Counter(
            "push_slow_consumer_disconnects_total", "Subscribers dropped because their send buffer overflowed",
            registry=registry)
        self.published = Counter(
            "push_messages_published_total", "Messages accepted for broadcast, by API endpoint", ["endpoint"],
            registry=registry)
        self.frames_delivered = Counter(
            "push_frames_delivered_total", "Broadcast frames written to client sockets", registry=registry)
        self.publish_latency = Histogram(
            "push_publish_to_write_seconds", "From the publish request's arrival to the last local socket write",
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
            registry=registry)
        self.presences = Gauge(
            "push_presences", "Tracked presences (connections x presence topics)", registry=registry)
        self.presence_diffs = Counter(
            "push_presence_diffs_total", "presence_diff broadcasts (each a batch of joins and leaves on one topic)",
            registry=registry)
        self.typing_dropped = Counter(
            "push_typing_dropped_total", "user:typing updates dropped by the per-connection rate limit",
            registry=registry)
        self.recoveries = Counter(
            "push_recoveries_total", "Joins with `since`, by result (recovered or not)", ["result"],
            registry=registry)
        self.replayed = Counter(
            "push_replayed_messages_total", "Missed broadcasts sent to recovering clients", registry=registry)
        self.history_evictions = Counter(
            "push_history_evictions_total", "Topics whose history was dropped to stay within PUSH_HISTORY_MAX_BYTES",
            registry=registry)
        self.broker_up = Gauge(
            "push_broker_up", "1 while the broker is connected and publishes are accepted", registry=registry)
        self.broker_reconnects = Counter(
            "push_broker_reconnects_total", "Broker connections re-established after a loss", registry=registry)
        self.http_requests = Counter(
            "push_http_requests_total", "HTTP requests, by route and status", ["route", "method", "status"],
            registry=registry)
        # Per-request counters, by their labels: `http_request_count(route, method, status).inc()`.
        self.http_request_count = Children(self.http_requests)
        self.published_count = Children(self.published)

    def render(self) -> bytes:
        return generate_latest(self.registry)
