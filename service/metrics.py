"""Prometheus metrics, in a registry owned by one app (no process globals)."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator
from itertools import accumulate

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

# The mock waits 10-17 s; user models may answer in milliseconds.
MODEL_BUCKETS_S = (0.005, 0.025, 0.1, 0.5, 1, 2.5, 5, 10, 12, 14, 16, 18, 30, 60, 120)
HTTP_BUCKETS_S = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1, 5, 10, 20, 60)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self) -> None:
        # `*_created` series double the exposition and no dashboard reads them.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self.http = HttpStats()
        registry.register(self.http)
        self.accepted = Counter(
            "predictions_accepted", "Async predictions accepted (202 sent)", registry=registry
        )
        self.completed = Counter(
            "predictions_completed",
            "Predictions the model answered",
            ["mode"],
            registry=registry,
        )
        self.failed = Counter(
            "predictions_failed", "Predictions that failed", ["mode"], registry=registry
        )
        self.dead_lettered = Counter(
            "tasks_dead_lettered",
            "Task messages set aside to the dead-letter queue",
            ["reason"],
            registry=registry,
        )
        self.model_latency = Histogram(
            "model_latency_seconds",
            "Time the model took per prediction",
            buckets=MODEL_BUCKETS_S,
            registry=registry,
        )
        self.in_flight = Gauge(
            "predictions_in_flight", "Predictions running in the model now", registry=registry
        )
        self.queue_depth = Gauge(
            "task_queue_depth",
            "Accepted predictions without an outcome yet, as this replica knows them",
            registry=registry,
        )

        self.long_polls = Gauge(
            "long_polls_waiting", "GET requests parked by Prefer: wait", registry=registry
        )

    def track(
        self,
        in_flight: Callable[[], float],
        queue_depth: Callable[[], float],
        long_polls: Callable[[], float],
    ) -> None:
        """Read the gauges from live state at scrape time."""
        self.in_flight.set_function(in_flight)
        self.queue_depth.set_function(queue_depth)
        self.long_polls.set_function(long_polls)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class HttpStats(Collector):
    """Request counts and latencies, kept in plain dicts and exposed at scrape time.

    prometheus_client's labelled metrics take a lock and look the label set
    up on every call; for a per-request metric that was most of the
    middleware's cost. One event loop means no lock is needed here.
    """

    def __init__(self) -> None:
        self._counts: dict[tuple[str, str, str], int] = {}
        # (method, route) -> [bucket counts..., +Inf count, sum of seconds]
        self._latency: dict[tuple[str, str], list[float]] = {}

    def record(self, method: str, route: str, status: int, elapsed_s: float) -> None:
        key = (method, route, str(status))
        self._counts[key] = self._counts.get(key, 0) + 1
        series = self._latency.get((method, route))
        if series is None:
            series = self._latency[(method, route)] = [0.0] * (len(HTTP_BUCKETS_S) + 2)
        series[bisect_left(HTTP_BUCKETS_S, elapsed_s)] += 1
        series[-1] += elapsed_s

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "http_requests", "HTTP requests answered", labels=["method", "route", "status"]
        )
        for labels, count in self._counts.items():
            requests.add_metric(list(labels), count)
        yield requests
        latency = HistogramMetricFamily(
            "http_request_duration_seconds",
            "Time to answer an HTTP request",
            labels=["method", "route"],
        )
        # Same "le" spelling as prometheus_client's own histograms ("60.0").
        bounds = [*map(floatToGoString, HTTP_BUCKETS_S), "+Inf"]
        for route_labels, series in self._latency.items():
            cumulative = list(accumulate(series[:-1]))
            latency.add_metric(
                list(route_labels), list(zip(bounds, cumulative, strict=True)), series[-1]
            )
        yield latency
