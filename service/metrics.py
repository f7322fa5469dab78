"""Prometheus metrics, in a registry owned by one app (no process globals)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

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
        self.http_requests = Counter(
            "http_requests",
            "HTTP requests answered",
            ["method", "route", "status"],
            registry=registry,
        )
        self.http_latency = Histogram(
            "http_request_duration_seconds",
            "Time to answer an HTTP request",
            ["method", "route"],
            buckets=HTTP_BUCKETS_S,
            registry=registry,
        )
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
