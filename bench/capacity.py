"""Item 4 of the issue: capacity with the real model (10-17 s per prediction).

2,000 async and 500 sync predictions are sent to one process at once,
with MODEL_CONCURRENCY raised to hold them all. The figure is the
makespan (first request sent to last prediction finished) against the
model's longest wait, MODEL_DELAY_MAX_S: the goal is about 20 s against
17 s, a ratio of at most 20/17. One serial worker would need the sum of
all the model's waits, which the service's own latency histogram gives.
One round: each takes as long as the model's longest wait.
"""

from __future__ import annotations

import sys

import msgspec

from bench.context import Context
from bench.pipeline_client import CapacityResult
from bench.procs import cpu_shares, delete_namespace, run_measured, running_service
from bench.report import Goal, Row

GOAL_S = 20.0  # "all finish within about 20 s"
TIMEOUT_S = 300
# The worker issue: put-backs at most a tenth of the tasks in the capacity burst.
PUT_BACK_GOAL = 0.10


def run(ctx: Context) -> list[Row]:
    sizes = ctx.sizes
    capacity = _burst(
        ctx,
        "capacity",
        async_count=sizes.capacity_async,
        sync_count=sizes.capacity_sync,
        delays=(sizes.capacity_delay_min_s, sizes.capacity_delay_max_s),
        model_concurrency=sizes.capacity_async + sizes.capacity_sync,
    )
    deep = _burst(
        ctx,
        "burst",
        async_count=sizes.burst_async,
        sync_count=0,
        delays=(sizes.burst_delay_min_s, sizes.burst_delay_max_s),
        model_concurrency=sizes.burst_concurrency,
    )
    return [row(ctx, *capacity), put_back_row(capacity[0], "4."), deep_row(ctx, *deep)]


def _burst(
    ctx: Context,
    name: str,
    *,
    async_count: int,
    sync_count: int,
    delays: tuple[float, float],
    model_concurrency: int,
) -> tuple[CapacityResult, float, float]:
    """One burst against a fresh service: the result, and the client's and server's CPU."""
    namespace = ctx.namespace(name)
    try:
        with running_service(
            ctx.rabbitmq_url,
            namespace,
            ctx.log_dir,
            model_delay_min_s=delays[0],
            model_delay_max_s=delays[1],
            model_concurrency=model_concurrency,
        ) as server:
            command = [sys.executable, "-m", "bench.pipeline_client", "capacity"]
            command += ["--port", str(server.port), "--count", str(async_count)]
            command += ["--sync-count", str(sync_count)]
            command += ["--connections", str(ctx.sizes.capacity_connections)]
            command += ["--timeout", str(TIMEOUT_S)]
            with cpu_shares({"server": server.process.pid}) as shares:
                finished = run_measured(command, TIMEOUT_S + 60)
    finally:
        delete_namespace(ctx.rabbitmq_url, namespace)
    result = msgspec.json.decode(finished.stdout, type=CapacityResult)
    return result, finished.cpu_s / finished.wall_s, shares["server"]


def row(ctx: Context, result: CapacityResult, client_cpu: float, server_cpu: float) -> Row:
    longest_wait_s = ctx.sizes.capacity_delay_max_s
    total = result.async_count + result.sync_count
    details = msgspec.to_builtins(result) | {
        "model_delay_s": [ctx.sizes.capacity_delay_min_s, longest_wait_s],
        "serial_worker_s": result.model_seconds,
        "serial_worker_expected_s": total * (ctx.sizes.capacity_delay_min_s + longest_wait_s) / 2,
        "server_cpu": server_cpu,
    }
    return Row(
        "capacity",
        f"4. {result.async_count} async + {result.sync_count} sync, makespan vs longest wait"
        f" (MODEL_CONCURRENCY={total})",
        "s",
        "s",
        [result.makespan_s],
        [longest_wait_s],
        Goal("<=", GOAL_S / 17.0),
        loadgen_cpu=[client_cpu],
        details=details,
    )


def put_back_row(result: CapacityResult, label: str) -> Row:
    """Tasks handed back to the work queue, against the async tasks of the burst."""
    return Row(
        "capacity_put_back",
        f"{label} tasks put back vs async tasks",
        "tasks",
        "tasks",
        [float(result.put_back)],
        [float(result.async_count)],
        Goal("<=", PUT_BACK_GOAL),
    )


def deep_row(ctx: Context, result: CapacityResult, client_cpu: float, server_cpu: float) -> Row:
    """The burst deeper than the slots: makespan against its ideal, slots kept busy."""
    sizes = ctx.sizes
    mean_delay_s = (sizes.burst_delay_min_s + sizes.burst_delay_max_s) / 2
    ideal_s = result.async_count * mean_delay_s / sizes.burst_concurrency
    details = msgspec.to_builtins(result) | {
        "model_delay_s": [sizes.burst_delay_min_s, sizes.burst_delay_max_s],
        "put_back_per_task": result.put_back / max(result.async_count, 1),
        "server_cpu": server_cpu,
    }
    return Row(
        "burst",
        f"4b. {result.async_count} async, {sizes.burst_delay_min_s:g}-"
        f"{sizes.burst_delay_max_s:g} s model, MODEL_CONCURRENCY={sizes.burst_concurrency}: "
        f"makespan vs ideal ({result.put_back} put back)",
        "s",
        "s",
        [result.makespan_s],
        [ideal_s],
        loadgen_cpu=[client_cpu],
        details=details,
    )
