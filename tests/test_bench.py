"""The benchmarks still run: `python -m bench --quick` once, at tiny sizes.

No timing is asserted (a shared 2-core machine makes them meaningless at
these sizes); what is asserted is that every figure was measured, every
request got the status it should, and the run left nothing on the broker.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from yarl import URL

from tests.support import REPO, rabbitmqctl

HTTP_KEYS = {"get", "get_cpu", "post", "post_cpu"}
PIPELINE_KEYS = {"pipeline", "pipeline_durable", "batching_gain", "durability_cost"}
STATE_KEYS = {"restart_200", "replay_200", "restart_1k", "replay_1k", "rss", "cold_get_p50"}
STATE_KEYS |= {"cold_get_p99"}
QUICK = {
    "pipeline": 60,
    "capacity_async": 40,
    "capacity_sync": 10,
    "burst_async": 60,
    "memory": 600,
}
CAPACITY_KEYS = {"capacity", "capacity_put_back", "burst"}
FANOUT_KEYS = {"fanout_1", "fanout_2", "fanout_4"}
LINE_KEYS = {
    "line_ahead_scaling",
    "line_dict_scaling",
    "line_ahead_speedup",
    "line_churn_scaling",
    "line_churn_speedup",
}


def run_bench(rabbitmq_url: str, out_dir: Path, *args: str) -> dict[str, Any]:
    command = [sys.executable, "-m", "bench", "--quick", "--rabbitmq-url", rabbitmq_url]
    command += ["--output-dir", str(out_dir), *args]
    done = subprocess.run(
        command, check=False, cwd=REPO, capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ratio" in done.stdout  # the table's header
    [path] = out_dir.glob("bench-*.json")
    document: dict[str, Any] = json.loads(path.read_text())
    return document


def rows_by_key(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {row["key"]: row for row in document["rows"]}


def bench_queues(rabbitmq_url: str) -> list[str]:
    vhost = URL(rabbitmq_url).path.lstrip("/") or "/"
    listing = rabbitmqctl("list_queues", "-p", vhost, "name", "--no-table-headers")
    return [name for name in listing.split() if name.startswith("bench-")]


def test_quick_run_measures_every_figure(rabbitmq_url: str, tmp_path: Path) -> None:
    document = run_bench(rabbitmq_url, tmp_path, "--loadgen", "python")
    rows = rows_by_key(document)
    expected = HTTP_KEYS | PIPELINE_KEYS | STATE_KEYS | CAPACITY_KEYS | LINE_KEYS | FANOUT_KEYS
    expected |= {"memory"}
    assert set(rows) == expected
    for row in rows.values():
        assert len(row["ratios"]) == len(row["values"]) >= 1
        # Put-backs may well be none at all.
        assert all(
            ratio >= 0 if row["key"] == "capacity_put_back" else ratio > 0
            for ratio in row["ratios"]
        ), row["key"]
    assert_http_answered(rows, tool="python")
    assert_pipeline_answered(rows["pipeline"]["details"])
    assert_capacity_answered(rows["capacity"]["details"])
    assert_burst_answered(rows["burst"]["details"])
    assert_memory_filled(rows["memory"]["details"])
    assert_state_measured(rows)
    assert bench_queues(rabbitmq_url) == []


@pytest.mark.skipif(
    shutil.which("wrk") is None,
    reason="wrk is not installed (apt-get install wrk); the Python load generator was tested",
)
def test_quick_http_run_with_wrk(rabbitmq_url: str, tmp_path: Path) -> None:
    document = run_bench(rabbitmq_url, tmp_path, "--only", "get", "post", "--loadgen", "wrk")
    rows = rows_by_key(document)
    assert set(rows) == HTTP_KEYS
    assert_http_answered(rows, tool="wrk")


def assert_http_answered(rows: dict[str, dict[str, Any]], tool: str) -> None:
    for key in ("get", "post"):
        details = rows[key]["details"]
        assert details["loadgen"] == tool
        assert details["service_requests"] > 0 and details["baseline_requests"] > 0
        # Anything but a 2xx, and any socket error, counts as bad.
        assert details["service_bad"] == 0 and details["baseline_bad"] == 0
        if tool == "python":  # wrk does not tell 2xx statuses apart
            assert set(details["service_statuses"]) == {"200"}
        assert all(0 < share < 2 for share in rows[key]["loadgen_cpu"])


def assert_pipeline_answered(details: dict[str, Any]) -> None:
    count = QUICK["pipeline"]
    # One round: the service with PUBLISH_BATCH_MAX=1, then the service.
    assert details["post_statuses"] == [{"202": count}] * 2
    assert details["get_statuses"] == [{"200": count}] * 2
    assert details["failed"] == 0
    assert details["aio_pika_simple"]["rates"]["rounds"][0] > 0
    assert details["aio_pika_durable"]["rates"]["rounds"][0] > 0
    assert details["service_publish_batch_max_1"]["rates"]["rounds"][0] > 0
    # Tasks and outcomes were published, each message carrying at least one.
    assert set(details["events_per_message"]) == {"task", "event"}
    assert all(ratio >= 1 for ratio in details["events_per_message"].values())


def assert_burst_answered(details: dict[str, Any]) -> None:
    assert details["async_statuses"] == {"202": QUICK["burst_async"]}
    assert details["verified"] == {"200": QUICK["burst_async"]}
    assert details["model_calls"] == QUICK["burst_async"]
    assert details["put_back_per_task"] >= 0


def assert_capacity_answered(details: dict[str, Any]) -> None:
    assert details["async_statuses"] == {"202": QUICK["capacity_async"]}
    assert details["sync_statuses"] == {"200": QUICK["capacity_sync"]}
    assert details["verified"] == {"200": QUICK["capacity_async"]}
    assert details["model_calls"] == QUICK["capacity_async"] + QUICK["capacity_sync"]
    assert details["failed"] == 0
    assert details["serial_worker_s"] > 0


def assert_memory_filled(details: dict[str, Any]) -> None:
    assert details["stored"] == QUICK["memory"]
    assert sum(sum(statuses.values()) for statuses in details["post_statuses"]) == QUICK["memory"]
    assert all(set(statuses) == {"202"} for statuses in details["post_statuses"])
    assert all(set(statuses) == {"200"} for statuses in details["get_statuses"])
    assert details["rss_full_bytes"] > 0
    assert details["heap_bytes_per_prediction"] > 0


def assert_state_measured(rows: dict[str, dict[str, Any]]) -> None:
    for count, label in ((200, "200"), (1000, "1k")):
        details = rows[f"restart_{label}"]["details"]
        assert details["retained"] == count and details["events"] == 2 * count
        assert details["restart_ready_s"] > 0 and details["fresh_ready_s"] > 0
        assert details["aio_pika_read_s"] > 0
    rss = rows["rss"]["details"]
    # Filled in steps to 3x a budget lowered for --quick, and said so.
    assert rss["overrides"]["results_memory_max_bytes"] == rss["budget_bytes"]
    assert rss["curve"][-1]["retained_bytes"] >= 3 * rss["budget_bytes"] - rss["input_bytes"]
    assert (
        rss["metrics"]["results_disk_entries"] * rss["input_bytes"]
        >= 3 * rss["budget_bytes"] - rss["input_bytes"]
    )
    assert rss["metrics"]["results_cold_reads_total"] >= rss["latency_ms"]["cold_requests"]
