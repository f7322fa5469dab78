"""Prometheus metrics, in a registry owned by one app (no process globals)."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence
from itertools import accumulate
from typing import Protocol

from prometheus_client import CollectorRegistry, Gauge, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

# The mock waits 10-17 s; user models may answer in milliseconds.
WEBHOOK_BUCKETS_S = (0.01, 0.05, 0.1, 0.5, 1, 5, 30, 60, 300, 3600, 86400)
MODEL_BUCKETS_S = (0.005, 0.025, 0.1, 0.5, 1, 2.5, 5, 10, 12, 14, 16, 18, 30, 60, 120)
HTTP_BUCKETS_S = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1, 5, 10, 20, 60)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class ResultTiers(Protocol):
    """What /metrics reads of the results view (service/store.py)."""

    @property
    def memory_bytes(self) -> int: ...
    @property
    def memory_entries(self) -> int: ...

    disk_entries: int
    cold_reads: int


class StreamReading(Protocol):
    """What /metrics reads of the event follower (service/follower.py)."""

    events_read: int

    @property
    def fences_sent(self) -> int: ...


class Metrics:
    def __init__(self) -> None:
        # `*_created` series double the exposition and no dashboard reads them.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self.http = HttpStats()
        registry.register(self.http)
        self.accepted = LoopCounter(
            "predictions_accepted", "Async predictions accepted (202 sent)", registry=registry
        )
        self.completed = LoopCounter(
            "predictions_completed",
            "Predictions the model answered",
            ["mode"],
            registry=registry,
        )
        # Children bound once, so the hot paths skip the label lookup.
        self.completed_sync = self.completed.labels("sync")
        self.completed_async = self.completed.labels("async")
        self.failed = LoopCounter(
            "predictions_failed", "Predictions that failed", ["mode"], registry=registry
        )
        self.failed_sync = self.failed.labels("sync")
        self.failed_async = self.failed.labels("async")
        self.canceled = LoopCounter(
            "predictions_canceled",
            "Predictions canceled by a cancel request this replica answered",
            registry=registry,
        )
        self.canceled_runs = LoopCounter(
            "model_runs_canceled",
            "Model runs this replica stopped because their prediction was canceled",
            registry=registry,
        )
        self.idempotent_repeats = LoopCounter(
            "idempotent_repeats",
            "Keyed submits answered with the prediction an earlier submit of the key made",
            registry=registry,
        )
        self.dead_lettered = LoopCounter(
            "tasks_dead_lettered",
            "Task messages set aside to the dead-letter queue",
            ["reason"],
            registry=registry,
        )
        self.put_back = LoopCounter(
            "tasks_put_back",
            "Tasks a worker sent back to the work queue instead of running them itself",
            ["reason"],
            registry=registry,
        )
        self.put_back_busy = self.put_back.labels("busy")
        self.put_back_stopping = self.put_back.labels("stopping")
        self.put_back_failed = self.put_back.labels("model_failed")
        self.put_back_redelivered = self.put_back.labels("redelivered")
        self.messages_published = LoopCounter(
            "broker_messages_published",
            "Messages published with a confirm (tasks or outcomes that share one count once)",
            ["routing_key"],
            registry=registry,
        )
        self.events_published = LoopCounter(
            "broker_events_published",
            "Prediction events published, whether alone or batched into one message",
            ["routing_key"],
            registry=registry,
        )
        self.model_latency = LatencyCollector(
            "model_latency_seconds", "Time the model took per prediction", MODEL_BUCKETS_S
        )
        registry.register(self.model_latency)
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
        self.webhook_deliveries = LoopCounter(
            "webhook_deliveries",
            "Webhook tries by event (start, completed) and outcome"
            " (delivered, retried, gone: the receiver answered 410, dead: given up)",
            ["event", "outcome"],
            registry=registry,
        )
        self.webhook_latency = LatencyCollector(
            "webhook_delivery_latency_seconds",
            "From a webhook being owed to its delivery, retries included",
            WEBHOOK_BUCKETS_S,
        )
        registry.register(self.webhook_latency)
        self.webhooks_owed = Gauge(
            "webhook_deliveries_owed",
            "Webhook deliveries owed: waiting in the broker's webhook queues (every"
            " replica's, counted every 5 s) plus those this replica is trying",
            registry=registry,
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

    def track_results(self, tiers: ResultTiers) -> None:
        """Memory and disk tiers of the results view, read at scrape time."""
        gauges = (
            (
                "results_memory_bytes",
                "Bytes of inputs and results held in memory (budget: RESULTS_MEMORY_MAX_BYTES)",
                lambda: tiers.memory_bytes,
            ),
            (
                "results_memory_entries",
                "Predictions held in memory (pending and recently used)",
                lambda: tiers.memory_entries,
            ),
            (
                "results_disk_entries",
                "Predictions in the on-disk state store",
                lambda: tiers.disk_entries,
            ),
        )
        for name, documentation, read in gauges:
            Gauge(name, documentation, registry=self.registry).set_function(read)
        self.registry.register(
            FunctionCounter(
                "results_cold_reads",
                "Finished predictions read from disk because memory no longer held them",
                lambda: tiers.cold_reads,
            )
        )

    def track_stream(self, follower: StreamReading) -> None:
        self.registry.register(
            FunctionCounter(
                "event_stream_events",
                "Events read from the event stream and applied since start (a restart "
                "that resumes from STATE_DIR reads only what came after its checkpoint)",
                lambda: follower.events_read,
            )
        )
        self.registry.register(
            FunctionCounter(
                "event_stream_fences",
                "Markers written and read back before answering 404 (one per batch of lookups)",
                lambda: follower.fences_sent,
            )
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)


class CounterSeries:
    """One counter's value. Only the event loop increments it, so no lock."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1) -> None:
        self.value += amount


class LoopCounter(Collector):
    """A Prometheus counter kept as plain floats, exposed at scrape time.

    prometheus_client's Counter takes a lock on every increment; these are
    incremented on every prediction, and only ever from the event loop.
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        *,
        registry: CollectorRegistry,
    ) -> None:
        self._name = name
        self._documentation = documentation
        self._labelnames = list(labelnames)
        self._series: dict[tuple[str, ...], CounterSeries] = {}
        if not labelnames:
            self._series[()] = CounterSeries()
        registry.register(self)

    def labels(self, *values: str) -> CounterSeries:
        """The series for these label values (bind it once, increment it often)."""
        series = self._series.get(values)
        if series is None:
            series = self._series[values] = CounterSeries()
        return series

    def inc(self, amount: float = 1) -> None:
        self._series[()].inc(amount)

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self._name, self._documentation, labels=self._labelnames)
        for values, series in self._series.items():
            family.add_metric(list(values), series.value)
        yield family


class FunctionCounter(Collector):
    """A counter kept elsewhere as a plain int, exposed at scrape time."""

    def __init__(self, name: str, documentation: str, read: Callable[[], float]) -> None:
        self._name = name
        self._documentation = documentation
        self._read = read

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(self._name, self._documentation, value=self._read())


class LatencyHistogram:
    """A Prometheus-style histogram as a list of counts; no lock, no label lookup."""

    __slots__ = ("bounds", "counts", "sum_s")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum_s = 0.0

    def observe(self, seconds: float) -> None:
        # bisect_left: a value equal to a bound belongs to that bound's bucket.
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.sum_s += seconds

    def cumulative(self) -> list[tuple[str, float]]:
        # Same "le" spelling as prometheus_client's own histograms ("60.0").
        bounds = [*map(floatToGoString, self.bounds), "+Inf"]
        return list(zip(bounds, accumulate(self.counts), strict=True))


class LatencyCollector(Collector):
    """One unlabelled histogram, exposed at scrape time."""

    def __init__(self, name: str, documentation: str, bounds: tuple[float, ...]) -> None:
        self._name = name
        self._documentation = documentation
        self.histogram = LatencyHistogram(bounds)
        self.observe = self.histogram.observe

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self._name, self._documentation, labels=[])
        family.add_metric([], self.histogram.cumulative(), self.histogram.sum_s)
        yield family


class HttpStats(Collector):
    """Request counts and latencies, kept in plain dicts and exposed at scrape time.

    prometheus_client's labelled metrics take a lock and look the label set
    up on every call; for a per-request metric that was most of the
    middleware's cost. One event loop means no lock is needed here.
    """

    def __init__(self) -> None:
        self._counts: dict[tuple[str, str, int], int] = {}
        self._latency: dict[tuple[str, str], LatencyHistogram] = {}

    def record(self, method: str, route: str, status: int, elapsed_s: float) -> None:
        key = (method, route, status)
        self._counts[key] = self._counts.get(key, 0) + 1
        histogram = self._latency.get((method, route))
        if histogram is None:
            histogram = self._latency[(method, route)] = LatencyHistogram(HTTP_BUCKETS_S)
        histogram.observe(elapsed_s)

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "http_requests", "HTTP requests answered", labels=["method", "route", "status"]
        )
        for (method, route, status), count in self._counts.items():
            requests.add_metric([method, route, str(status)], count)
        yield requests
        latency = HistogramMetricFamily(
            "http_request_duration_seconds",
            "Time to answer an HTTP request",
            labels=["method", "route"],
        )
        for route_labels, histogram in self._latency.items():
            latency.add_metric(list(route_labels), histogram.cumulative(), histogram.sum_s)
        yield latency
