"""Item 3 of the issue: async predictions/s end to end, against aio-pika alone.

The service (model delay 0) takes N async POSTs and is timed from the
first POST to the last result stored (bench/pipeline_client.py). The
baselines (bench/amqp_baseline.py) move N messages with aio-pika in one
process, without HTTP:

- simple: publish persistent + confirm to one durable queue, consume + ack:
  the issue's baseline (goal: service / simple >= 0.50);
- durable: the same traffic as the service's broker side (task to a quorum
  queue and the event stream, outcome to the stream, stream read back).

A second service with PUBLISH_BATCH_MAX=1 (every task and outcome a
message of its own, as before batching) runs in the same rounds, so the
gain from batching is measured too.

There is no pre-durability service to check out, so "before durability"
is stood in for by the two baselines: durable / simple is what the event
stream costs at the broker, whatever the service does on top.
Each round runs simple, durable, the unbatched service, the service, in that order.
"""

from __future__ import annotations

import re
import statistics
import sys
from dataclasses import dataclass, field
from typing import Any

import msgspec

from bench.amqp_baseline import BaselineResult
from bench.context import Context
from bench.pipeline_client import SubmitResult
from bench.procs import (
    Server,
    broker_pid,
    cpu_shares,
    delete_namespace,
    http_request,
    run_measured,
    running_service,
)
from bench.report import Goal, Row

TIMEOUT_S = 600
PUBLISHED = re.compile(
    r"^broker_(?P<what>events|messages)_published_total"
    r'\{routing_key="(?P<key>\w+)"\} (?P<value>\S+)$'
)


@dataclass
class Series:
    """Predictions (or messages) per second per round, with CPU shares."""

    rates: list[float] = field(default_factory=list)
    client_cpu: list[float] = field(default_factory=list)
    broker_cpu: list[float] = field(default_factory=list)
    server_cpu: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {
            name: {"median": statistics.median(values), "rounds": values}
            for name, values in vars(self).items()
            if values
        }


def run(ctx: Context) -> list[Row]:
    namespace = ctx.namespace("pipeline")
    simple, durable, unbatched, service = Series(), Series(), Series(), Series()
    checks: list[SubmitResult] = []
    zero_delay = {"model_delay_min_s": 0, "model_delay_max_s": 0}
    try:
        with (
            running_service(ctx.rabbitmq_url, namespace, ctx.log_dir, **zero_delay) as server,
            running_service(
                ctx.rabbitmq_url, f"{namespace}-1", ctx.log_dir, publish_batch_max=1, **zero_delay
            ) as one_by_one,
        ):
            for warming in (server, one_by_one):
                submit(ctx, warming, max(ctx.sizes.pipeline_count // 10, 10), Series())
            for round_index in range(ctx.sizes.rounds):
                baseline(ctx, "simple", f"{namespace}-simple{round_index}", simple)
                baseline(ctx, "durable", f"{namespace}-durable{round_index}", durable)
                checks.append(submit(ctx, one_by_one, ctx.sizes.pipeline_count, unbatched))
                checks.append(submit(ctx, server, ctx.sizes.pipeline_count, service))
            batching = events_per_message(server)
    finally:
        delete_namespace(ctx.rabbitmq_url, namespace)
        delete_namespace(ctx.rabbitmq_url, f"{namespace}-1")
    series = {"simple": simple, "durable": durable, "unbatched": unbatched, "service": service}
    return rows(ctx, series, checks, batching=batching)


def events_per_message(server: Server) -> dict[str, float]:
    """How many events the service's messages carried, per routing key (all rounds)."""
    status, body = http_request(server.port, "GET", "/metrics")
    if status != 200:
        raise RuntimeError(f"/metrics answered {status}")
    totals: dict[str, dict[str, float]] = {"events": {}, "messages": {}}
    for line in body.decode().splitlines():
        match = PUBLISHED.match(line)
        if match:
            totals[match["what"]][match["key"]] = float(match["value"])
    return {
        key: round(events / totals["messages"][key], 2)
        for key, events in totals["events"].items()
        if totals["messages"].get(key)
    }


def baseline(ctx: Context, mode: str, namespace: str, series: Series) -> None:
    command = [sys.executable, "-m", "bench.amqp_baseline", "--mode", mode]
    command += ["--rabbitmq-url", ctx.rabbitmq_url, "--namespace", namespace]
    command += ["--count", str(ctx.sizes.pipeline_count)]
    command += ["--concurrency", str(ctx.sizes.pipeline_connections)]
    try:
        with cpu_shares(_broker()) as shares:
            finished = run_measured(command, TIMEOUT_S)
    finally:
        delete_namespace(ctx.rabbitmq_url, namespace, extra_queues=[f"{namespace}.simple"])
    result = msgspec.json.decode(finished.stdout, type=BaselineResult)
    series.rates.append(result.count / result.elapsed_s)
    # The client is the whole baseline here: its CPU over its whole run.
    series.client_cpu.append(finished.cpu_s / finished.wall_s)
    if "broker" in shares:
        series.broker_cpu.append(shares["broker"])


def submit(ctx: Context, server: Server, count: int, series: Series) -> SubmitResult:
    command = [sys.executable, "-m", "bench.pipeline_client", "submit", "--port", str(server.port)]
    command += ["--count", str(count), "--connections", str(ctx.sizes.pipeline_connections)]
    command += ["--verify", str(count), "--timeout", str(TIMEOUT_S)]
    with cpu_shares(_broker() | {"server": server.process.pid}) as shares:
        finished = run_measured(command, TIMEOUT_S + 60)
    result = msgspec.json.decode(finished.stdout, type=SubmitResult)
    series.rates.append(result.count / result.makespan_s)
    series.client_cpu.append(finished.cpu_s / finished.wall_s)
    series.server_cpu.append(shares["server"])
    if "broker" in shares:
        series.broker_cpu.append(shares["broker"])
    return result


def _broker() -> dict[str, int]:
    pid = broker_pid()
    return {} if pid is None else {"broker": pid}


def rows(
    ctx: Context,
    series: dict[str, Series],
    checks: list[SubmitResult],
    *,
    batching: dict[str, float],
) -> list[Row]:
    simple, durable, service = series["simple"], series["durable"], series["service"]
    unbatched = series["unbatched"]
    details = {
        "events_per_message": batching,
        "count": ctx.sizes.pipeline_count,
        "connections": ctx.sizes.pipeline_connections,
        "service": service.summary(),
        "aio_pika_simple": simple.summary(),
        "aio_pika_durable": durable.summary(),
        "service_publish_batch_max_1": unbatched.summary(),
        "post_statuses": [check.statuses for check in checks],
        "get_statuses": [check.verified for check in checks],
        "failed": sum(check.failed for check in checks),
        "accept_s": [check.accept_s for check in checks],
        "makespan_s": [check.makespan_s for check in checks],
    }
    unit = "pred/s"
    return [
        Row(
            "pipeline",
            "3. async end to end (delay 0) vs aio-pika simple",
            unit,
            "msg/s",
            service.rates,
            simple.rates,
            Goal(">=", 0.50),
            loadgen_cpu=service.client_cpu,
            details=details,
        ),
        Row(
            "pipeline_durable",
            "3b. async end to end vs aio-pika, service topology",
            unit,
            "msg/s",
            service.rates,
            durable.rates,
            loadgen_cpu=service.client_cpu,
        ),
        Row(
            "batching_gain",
            "3d. async end to end: batched vs PUBLISH_BATCH_MAX=1",
            unit,
            unit,
            service.rates,
            unbatched.rates,
            loadgen_cpu=service.client_cpu,
        ),
        Row(
            "durability_cost",
            "3c. aio-pika: service topology vs simple",
            "msg/s",
            "msg/s",
            durable.rates,
            simple.rates,
        ),
    ]
