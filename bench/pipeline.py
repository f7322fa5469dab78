"""Item 3 of the issue: async predictions/s end to end, against aio-pika alone.

The service (model delay 0) takes N async POSTs and is timed from the
first POST to the last result stored (bench/pipeline_client.py). The
baselines (bench/amqp_baseline.py) move N messages with aio-pika in one
process, without HTTP:

- simple: publish persistent + confirm to one durable queue, consume + ack:
  the issue's baseline (goal: service / simple >= 0.50);
- durable: the same traffic as the service's broker side (task to a quorum
  queue and the event stream, outcome to the stream, stream read back).

There is no pre-durability service to check out, so "before durability"
is stood in for by the two baselines: durable / simple is what the event
stream costs at the broker, whatever the service does on top.
Each round runs simple, durable, service, in that order.
"""

from __future__ import annotations

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
    run_measured,
    running_service,
)
from bench.report import Goal, Row

TIMEOUT_S = 600


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
    simple, durable, service = Series(), Series(), Series()
    checks: list[SubmitResult] = []
    try:
        with running_service(
            ctx.rabbitmq_url, namespace, ctx.log_dir, model_delay_min_s=0, model_delay_max_s=0
        ) as server:
            submit(ctx, server, max(ctx.sizes.pipeline_count // 10, 10), Series())  # warm-up
            for round_index in range(ctx.sizes.rounds):
                baseline(ctx, "simple", f"{namespace}-simple{round_index}", simple)
                baseline(ctx, "durable", f"{namespace}-durable{round_index}", durable)
                checks.append(submit(ctx, server, ctx.sizes.pipeline_count, service))
    finally:
        delete_namespace(ctx.rabbitmq_url, namespace)
    return rows(ctx, simple, durable, service, checks)


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
    ctx: Context, simple: Series, durable: Series, service: Series, checks: list[SubmitResult]
) -> list[Row]:
    details = {
        "count": ctx.sizes.pipeline_count,
        "connections": ctx.sizes.pipeline_connections,
        "service": service.summary(),
        "aio_pika_simple": simple.summary(),
        "aio_pika_durable": durable.summary(),
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
            "durability_cost",
            "3c. aio-pika: service topology vs simple",
            "msg/s",
            "msg/s",
            durable.rates,
            simple.rates,
        ),
    ]
