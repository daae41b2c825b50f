"""Prometheus metrics, in a registry of our own so several servers can live in one process (tests).

Counters, gauges and the histogram are plain numbers kept by `Counter`, `Gauge` and `Histogram`
below and turned into samples when the registry is scraped: prometheus_client's own lock and check
on every call, which cost more than the work they count (docs/performance.md), and one event-loop
thread needs no lock.
"""

from __future__ import annotations

import itertools
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Generic, TypeVar

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from push_service.topics import FAMILIES

CONTENT_TYPE = CONTENT_TYPE_LATEST
# The *_created series double the scrape size and no dashboard of ours reads them.
disable_created_metrics()


# Label values known in advance, given a 0 series at start: a family with no sample is invisible to
# rate() and to alerts until its first event, and "absent" cannot be told from "zero".
TRANSPORTS = ("websocket", "longpoll")
ENDPOINTS = ("message", "channel", "thread", "community", "user", "broadcast", "batch")
PUBLISH_REFUSALS = ("lag",)
RECOVERY_RESULTS = ("recovered", "not_recovered")
JOIN_REFUSALS = ("unmatched_topic", "too_many_channels", "unauthorized", "bad_since", "auth_unavailable")
TOKEN_REFUSALS = ("missing", "malformed", "bad_algorithm", "bad_signature", "missing_claim", "invalid",
                  "not_yet_valid", "expired", "bad_issuer", "bad_audience", "bad_claims")
AUTH_CALLBACK_ENDPOINTS = ("connect", "join")
AUTH_CALLBACK_OUTCOMES = ("admit", "refuse", "error", "timeout", "overload")
AUTH_CALLBACK_REFUSALS = ("auth_refused", "auth_error", "auth_timeout", "auth_overload")
CONNECT_REFUSALS = (*TOKEN_REFUSALS, *AUTH_CALLBACK_REFUSALS, "origin", "vsn", "draining")
TOKEN_REFRESH_RESULTS = ("ok", "too_many_refreshes", "sub_mismatch", "bad_payload", *TOKEN_REFUSALS)
DISCONNECTS = ("token expired", "heartbeat timeout", "server shutting down", "invalid message", "slow consumer",
               "service restart")
BROKER_PROTOCOL_ERRORS = ("not_resp2", "reply_too_large", "unasked_reply", "bad_push")
CLIENT_ERRORS = ("invalid_json", "bad_shape", "bad_topic", "bad_event", "bad_ref", "bad_join_ref",
                 "unmatched_topic", "unhandled_event", "frame_too_big", "bad_typing")


class Series:
    """One series of a metric (one combination of label values): a number."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1) -> None:
        self.value += amount


class GaugeSeries(Series):
    __slots__ = ()

    def dec(self, amount: float = 1) -> None:
        self.value -= amount

    def set(self, value: float) -> None:
        self.value = float(value)


S = TypeVar("S", bound="Series")


class _Metric(Collector, Generic[S]):
    """A metric family: `labels(*values)` is its series for those values (created on first use, then a
    dict lookup); an unlabelled one is its own only series."""

    _family: type[CounterMetricFamily] | type[GaugeMetricFamily]
    _series_type: type[S]

    def __init__(self, name: str, documentation: str, labelnames: Iterable[str] = (),
                 registry: CollectorRegistry | None = None) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._series: dict[tuple[object, ...], S] = {}  # by the values as given
        self._by_text: dict[tuple[str, ...], S] = {}  # by their text: 101 and "101" are one series
        if not self.labelnames:
            self._only = self._by_text[()] = self._series_type()
        if registry is not None:
            registry.register(self)

    def labels(self, *values: object) -> S:
        series = self._series.get(values)
        if series is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name} takes labels {self.labelnames}, got {values!r}")
            text = tuple(str(value) for value in values)
            series = self._by_text.get(text)
            if series is None:
                series = self._by_text[text] = self._series_type()
            self._series[values] = series
        return series

    def preset(self, *values: Iterable[object]) -> None:
        """A 0 series for each of these label values (one iterable per label name)."""
        for combination in itertools.product(*values):
            self.labels(*combination)

    def inc(self, amount: float = 1) -> None:
        """An unlabelled metric's increment."""
        self._only.value += amount

    def collect(self) -> Iterator[Metric]:
        family = self._family(self.name, self.documentation, labels=self.labelnames)
        for text, series in self._by_text.items():
            family.add_metric(list(text), series.value)
        yield family


class Counter(_Metric[Series]):
    _family = CounterMetricFamily
    _series_type = Series

    def __init__(self, name: str, documentation: str, labelnames: Iterable[str] = (),
                 registry: CollectorRegistry | None = None) -> None:
        # As prometheus_client: the family is named without "_total", its sample with it.
        super().__init__(name.removesuffix("_total"), documentation, labelnames, registry)


class Gauge(_Metric[GaugeSeries]):
    _family = GaugeMetricFamily
    _series_type = GaugeSeries
    _function: Callable[[], float] | None = None

    def set(self, value: float) -> None:
        self._only.value = float(value)

    def set_function(self, function: Callable[[], float]) -> None:
        """The gauge's value is read from `function` at each scrape."""
        self._function = function

    def collect(self) -> Iterator[Metric]:
        if self._function is not None:
            self._only.value = float(self._function())
        return super().collect()


class CounterFunction(Collector):
    """A labelled counter whose values are read from `source` (label value -> count) at each scrape:
    for counts kept where no Metrics object reaches (a broker connection's protocol errors)."""

    def __init__(self, name: str, documentation: str, labelname: str, known: Iterable[str],
                 source: Callable[[], Mapping[str, int]], registry: CollectorRegistry) -> None:
        self.name = name.removesuffix("_total")
        self.documentation = documentation
        self.labelname = labelname
        self.known = tuple(known)
        self.source = source
        registry.register(self)

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self.name, self.documentation, labels=[self.labelname])
        counts = self.source()
        for value in dict.fromkeys([*self.known, *counts]):
            family.add_metric([value], counts.get(value, 0))
        yield family


class Histogram(Collector):
    """An unlabelled histogram: a count per bucket (a value goes to the first bucket whose upper bound
    is at or above it, as Prometheus's `le`), cumulated at scrape time, and the sum."""

    def __init__(self, name: str, documentation: str, buckets: Iterable[float],
                 registry: CollectorRegistry | None = None) -> None:
        self.name = name
        self.documentation = documentation
        self._bounds = sorted(float(bound) for bound in buckets)
        self._labels = [floatToGoString(bound) for bound in self._bounds] + ["+Inf"]
        self._counts = [0] * len(self._labels)  # the last one: above every bound
        self._sum = 0.0
        if registry is not None:
            registry.register(self)

    def observe(self, value: float) -> None:
        self._counts[bisect_left(self._bounds, value)] += 1
        self._sum += value

    def counts(self) -> tuple[int, ...]:
        """The count of each bucket, not cumulated (the last: above every bound), for windowed quantiles."""
        return tuple(self._counts)

    def quantile_since(self, earlier: tuple[int, ...], fraction: float) -> float | None:
        """The upper bound of the bucket holding the `fraction` quantile of what was observed since the
        `earlier` counts(), the last bound for values above it; None when nothing was observed."""
        added = [now - then for now, then in zip(self._counts, earlier)]
        total = sum(added)
        if total <= 0:
            return None
        rank, cumulative = fraction * total, 0
        for index, count in enumerate(added):
            cumulative += count
            if cumulative >= rank:
                return self._bounds[min(index, len(self._bounds) - 1)]
        return self._bounds[-1]

    def collect(self) -> Iterator[Metric]:
        cumulative, buckets = 0, []
        for label, count in zip(self._labels, self._counts):
            cumulative += count
            buckets.append((label, cumulative))
        yield HistogramMetricFamily(self.name, self.documentation, buckets=buckets, sum_value=self._sum)


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
        self.token_refreshes = Counter(
            "push_token_refreshes_total", "access_token events (token refresh on a live socket), by result: ok, "
            "or why the token was refused", ["result"], registry=registry)
        self.slow_consumers = Counter(
            "push_slow_consumer_disconnects_total", "Subscribers dropped because their send buffer overflowed",
            registry=registry)
        self.published = Counter(
            "push_messages_published_total", "Messages accepted for broadcast, by API endpoint", ["endpoint"],
            registry=registry)
        self.publishes_refused = Counter(
            "push_publish_refused_total", "Messages refused with 503 before being accepted, by reason (lag: delivery "
            "is behind by more than PUSH_MAX_DELIVERY_LAG)", ["reason"], registry=registry)
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
            "push_history_evictions_total",
            "Topics whose history was dropped to stay within PUSH_HISTORY_MAX_BYTES or PUSH_HISTORY_MAX_TOPICS",
            registry=registry)
        self.broker_up = Gauge(
            "push_broker_up", "1 while the broker is connected and publishes are accepted", registry=registry)
        self.broker_reconnects = Counter(
            "push_broker_reconnects_total", "Broker connections re-established after a loss", registry=registry)
        self.broker_protocol_errors: CounterFunction | None = None
        self.auth_callbacks = Counter(
            "push_auth_callbacks_total", "Calls to the auth backend (PUSH_AUTH_CONNECT_URL, PUSH_AUTH_JOIN_URL), by "
            "endpoint and outcome (admit, refuse: 401/403, error, timeout, overload: refused without a call)",
            ["endpoint", "outcome"], registry=registry)
        self.auth_callback_cache = Counter(
            "push_auth_callback_cache_total", "Auth backend asks answered from memory or a call in flight (hit) "
            "or by a call of their own (miss)", ["endpoint", "result"], registry=registry)
        self.auth_callback_seconds = Histogram(
            "push_auth_callback_seconds", "Auth backend calls, from the ask to the answer (its wait for a slot "
            "included)", buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0), registry=registry)
        self.auth_callbacks_pending = Gauge(
            "push_auth_callbacks_pending", "Calls to the auth backend in flight or waiting for a slot",
            registry=registry)
        self.longpoll_relayed = Counter(
            "push_longpoll_relayed_total", "Long-poll requests for a session held by another node, relayed over the "
            "broker, by direction (out: this node asked, in: it held the session) and outcome",
            ["direction", "outcome"], registry=registry)
        self.http_requests = Counter(
            "push_http_requests_total", "HTTP requests, by route and status", ["route", "method", "status"],
            registry=registry)
        self.connections.preset(TRANSPORTS)
        self.connects_refused.preset(CONNECT_REFUSALS)
        self.joins.preset(FAMILIES)
        self.leaves.preset(FAMILIES)
        self.joins_refused.preset(JOIN_REFUSALS)
        self.client_errors.preset(CLIENT_ERRORS)
        self.disconnects.preset(DISCONNECTS)
        self.token_refreshes.preset(TOKEN_REFRESH_RESULTS)
        self.published.preset(ENDPOINTS)
        self.publishes_refused.preset(PUBLISH_REFUSALS)
        self.recoveries.preset(RECOVERY_RESULTS)
        self.auth_callbacks.preset(AUTH_CALLBACK_ENDPOINTS, AUTH_CALLBACK_OUTCOMES)
        self.auth_callback_cache.preset(AUTH_CALLBACK_ENDPOINTS, ("hit", "miss"))
        # The series every connect and join counts (and their ends), looked up once: labels() is a call.
        self.connections_of = {transport: self.connections.labels(transport) for transport in TRANSPORTS}
        self.joins_of = {family: self.joins.labels(family) for family in FAMILIES}
        self.leaves_of = {family: self.leaves.labels(family) for family in FAMILIES}
        # The standard process and Python collectors (memory, CPU, fds, gc), read only when scraped.
        for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            registry.register(collector)

    def count_broker_protocol_errors(self, source: Callable[[], Mapping[str, int]]) -> None:
        """Export what the broker's connections count of bytes they could not use, by reason."""
        self.broker_protocol_errors = CounterFunction(
            "push_broker_protocol_errors_total", "Broker connections given up, or pushes dropped, for what the "
            "broker sent, by reason", "reason", BROKER_PROTOCOL_ERRORS, source, self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)
