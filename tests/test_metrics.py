"""The hand-kept HTTP series render as valid Prometheus histograms and counters."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from service.metrics import Metrics


def _samples(metrics: Metrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = metrics.render().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_requests_are_counted_per_method_route_and_status() -> None:
    metrics = Metrics()
    for status in (200, 200, 404):
        metrics.http.record("GET", "/predict/{prediction_id}", status, 0.002)
    samples = _samples(metrics)
    route = ("route", "/predict/{prediction_id}")
    ok = frozenset({("method", "GET"), route, ("status", "200")})
    missing = frozenset({("method", "GET"), route, ("status", "404")})
    assert samples[("http_requests_total", ok)] == 2
    assert samples[("http_requests_total", missing)] == 1


def test_latency_buckets_are_cumulative_and_inclusive() -> None:
    metrics = Metrics()
    for elapsed_s in (0.001, 0.003, 0.2, 99.0):
        metrics.http.record("POST", "/predict", 200, elapsed_s)
    samples = _samples(metrics)
    labels = {("method", "POST"), ("route", "/predict")}

    def bucket(le: str) -> float:
        return samples[("http_request_duration_seconds_bucket", frozenset(labels | {("le", le)}))]

    assert bucket("0.001") == 1  # a bucket holds values equal to its bound
    assert bucket("0.005") == 2
    assert bucket("0.5") == 3
    assert bucket("60.0") == 3
    assert bucket("+Inf") == 4
    assert samples[("http_request_duration_seconds_count", frozenset(labels))] == 4
    assert abs(samples[("http_request_duration_seconds_sum", frozenset(labels))] - 99.204) < 1e-9
