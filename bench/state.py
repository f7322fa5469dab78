"""The results view's figures: start-up, replay, memory, cold reads.

- restart: a stream holding N finished predictions (events batched 22 to
  a message, as the pipeline's load shapes them; see bench/stream_fill.py)
  is read by a brand-new replica (empty STATE_DIR), which is then stopped
  and started again on the same STATE_DIR. Both are timed from exec to
  `/readyz` 200. The restart's baseline is that fresh replay.
- replay: the fresh replica's replay rate (events/s, exec to ready)
  against aio-pika alone reading the same stream to its end with the
  same prefetch and decoding nothing: what the broker and the client
  library allow.
- rss: one replica follows a stream filled in steps up to 3x its memory
  budget with 16 KiB inputs; its RSS is read after each step. RSS
  against retained bytes should be flat above the budget.
- cold/hot GET: sequential GETs, one connection, of predictions evicted
  to disk (each read once) against ones still in memory, p50 and p99.

Default settings, except the mock's delay (0) and, with --quick only, a
smaller memory budget; the figures say so in their details.
"""

from __future__ import annotations

import asyncio
import re
import statistics
import tempfile
import time
from collections.abc import Iterator, Sequence

import aio_pika

from bench import stream_fill
from bench.context import Context
from bench.httpclient import Connection, encode_request
from bench.procs import Server, delete_namespace, http_request, launched_service, wait_http_ok
from bench.report import Goal, Row
from service.broker import Names
from service.settings import Settings

PER_MESSAGE = 22  # events per stream message, as batching shapes a busy stream
RSS_INPUT_BYTES = 16 * 1024
RSS_STEPS = (0.5, 1.0, 2.0, 3.0)  # retained bytes, in budgets
READY_TIMEOUT_S = 600
MiB = 1024 * 1024


def run(ctx: Context) -> list[Row]:
    rows: list[Row] = []
    for count in ctx.sizes.restart_counts:
        rows += restart_rows(ctx, count)
    rows += memory_rows(ctx)
    return rows


# -- restart and replay -----------------------------------------------------------


def restart_rows(ctx: Context, count: int) -> list[Row]:
    namespace = ctx.namespace(f"restart-{count}")
    overrides = {"model_delay_min_s": 0, "model_delay_max_s": 0}
    try:
        filled = asyncio.run(stream_fill.fill(ctx.rabbitmq_url, namespace, count, PER_MESSAGE))
        read_s = asyncio.run(read_stream(ctx.rabbitmq_url, namespace, filled.messages))
        with tempfile.TemporaryDirectory(prefix="bench-state-") as state_dir:
            fresh_s, fresh_rss = time_to_ready(ctx, namespace, state_dir=state_dir, **overrides)
            restart_s, restart_rss = time_to_ready(ctx, namespace, state_dir=state_dir, **overrides)
    finally:
        delete_namespace(ctx.rabbitmq_url, namespace)
    events = 2 * count
    details = {
        "retained": count,
        "events": events,
        "stream_messages": filled.messages,
        "fresh_ready_s": fresh_s,
        "restart_ready_s": restart_s,
        "aio_pika_read_s": read_s,
        "rss_after_fresh_bytes": fresh_rss,
        "rss_after_restart_bytes": restart_rss,
        "overrides": overrides,
    }
    label = _count_label(count)
    return [
        Row(
            f"restart_{label}",
            f"restart to ready, {count:,} retained, vs a fresh replica's replay",
            "s",
            "s",
            [restart_s],
            [fresh_s],
            details=details,
        ),
        Row(
            f"replay_{label}",
            f"fresh replica's replay, {count:,} retained, vs aio-pika reading the stream",
            "events/s",
            "events/s",
            [events / fresh_s],
            [events / read_s],
            details=details,
        ),
    ]


def time_to_ready(ctx: Context, namespace: str, **settings: object) -> tuple[float, int]:
    """Seconds from exec to /readyz 200, and the RSS then."""
    started_s = time.perf_counter()
    with launched_service(ctx.rabbitmq_url, namespace, ctx.log_dir, **settings) as server:
        wait_http_ok(server, "/readyz", timeout_s=READY_TIMEOUT_S)
        ready_s = time.perf_counter() - started_s
        return ready_s, server.rss_bytes()


async def read_stream(rabbitmq_url: str, namespace: str, messages: int) -> float:
    """Seconds aio-pika alone takes to read `messages` from the stream's start."""
    connection = await aio_pika.connect(rabbitmq_url)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=Settings().stream_prefetch)
        queue = await channel.get_queue(Names.for_namespace(namespace).events, ensure=False)
        seen = 0
        done = asyncio.get_running_loop().create_future()

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            nonlocal seen
            await message.ack()
            seen += 1
            if seen == messages and not done.done():
                done.set_result(None)

        started_s = time.perf_counter()
        await queue.consume(on_message, arguments={"x-stream-offset": "first"})
        await asyncio.wait_for(done, READY_TIMEOUT_S)
        return time.perf_counter() - started_s


def _count_label(count: int) -> str:
    if count % 1_000_000 == 0:
        return f"{count // 1_000_000}m"
    if count % 1_000 == 0:
        return f"{count // 1_000}k"
    return str(count)


# -- memory against retention, cold and hot reads ---------------------------------------


def memory_rows(ctx: Context) -> list[Row]:
    budget = ctx.sizes.rss_budget_bytes
    overrides: dict[str, object] = {"model_delay_min_s": 0, "model_delay_max_s": 0}
    if budget != Settings().results_memory_max_bytes:
        overrides["results_memory_max_bytes"] = budget
    namespace = ctx.namespace("rss")
    try:
        with (
            tempfile.TemporaryDirectory(prefix="bench-state-") as state_dir,
            launched_service(
                ctx.rabbitmq_url, namespace, ctx.log_dir, state_dir=state_dir, **overrides
            ) as server,
        ):
            wait_http_ok(server, "/readyz", timeout_s=READY_TIMEOUT_S)
            curve, ids = fill_in_steps(ctx, server, namespace, budget)
            latency = asyncio.run(cold_and_hot(server, ids, ctx.sizes.latency_requests))
            final = _metrics(server)
    finally:
        delete_namespace(ctx.rabbitmq_url, namespace)
    (empty_rss, _), *_, (full_rss, retained) = curve
    details = {
        "budget_bytes": budget,
        "input_bytes": RSS_INPUT_BYTES,
        "curve": [{"retained_bytes": r, "rss_bytes": rss} for rss, r in curve],
        "overrides": overrides,
        "metrics": final,
        "latency_ms": latency,
    }
    return [
        Row(
            "rss",
            f"RSS growth with {retained / MiB:,.0f} MiB retained (budget {budget / MiB:,.0f} MiB)"
            " vs the bytes retained",
            "B",
            "B",
            [float(full_rss - empty_rss)],
            [float(retained)],
            Goal("<=", budget / retained + 0.25),
            details=details,
        ),
        Row(
            "cold_get_p50",
            "GET p50 of a prediction on disk vs one in memory",
            "ms",
            "ms",
            [latency["cold_p50"]],
            [latency["hot_p50"]],
            details={"latency_ms": latency},
        ),
        Row(
            "cold_get_p99",
            "GET p99 of a prediction on disk vs one in memory",
            "ms",
            "ms",
            [latency["cold_p99"]],
            [latency["hot_p99"]],
            details={"latency_ms": latency},
        ),
    ]


def fill_in_steps(
    ctx: Context, server: Server, namespace: str, budget: int
) -> tuple[list[tuple[int, int]], list[str]]:
    """(RSS, retained bytes) after each step, and every id, oldest first."""
    curve = [(server.rss_bytes(), 0)]
    ids: list[str] = []
    for retained in _step_sizes(budget):
        count = retained // RSS_INPUT_BYTES - len(ids)
        filled = asyncio.run(
            stream_fill.fill(
                ctx.rabbitmq_url,
                namespace,
                count,
                PER_MESSAGE,
                input_bytes=RSS_INPUT_BYTES,
                lag=PER_MESSAGE,
            )
        )
        ids += filled.ids
        _wait_applied(server, len(ids))
        curve.append((server.rss_bytes(), len(ids) * RSS_INPUT_BYTES))
    return curve, ids


def _step_sizes(budget: int) -> Iterator[int]:
    for share in RSS_STEPS:
        yield int(budget * share)


def _wait_applied(server: Server, count: int) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        found = _metrics(server)
        kept = found.get("results_memory_entries", 0) + found.get("results_disk_entries", 0)
        # Finished and written: every entry is on disk once its commit is done.
        if found.get("results_disk_entries", 0) >= count and kept >= count:
            return
        time.sleep(0.2)
    raise TimeoutError(f"the service did not apply {count} predictions")


_SAMPLE = re.compile(r"^([a-z_]+) ([0-9.e+-]+)$", re.MULTILINE)


def _metrics(server: Server) -> dict[str, float]:
    status, body = http_request(server.port, "GET", "/metrics")
    if status != 200:
        raise RuntimeError(f"/metrics answered {status}")
    return {name: float(value) for name, value in _SAMPLE.findall(body.decode())}


async def cold_and_hot(server: Server, ids: Sequence[str], requests: int) -> dict[str, float]:
    """p50 and p99 in ms of GETs of evicted ids (each once) and of the newest ids."""
    connection = await Connection.open("127.0.0.1", server.port)
    try:
        cold = await _timed_gets(connection, ids[:requests])
        newest = list(ids[-min(requests, 100) :])
        hot = await _timed_gets(connection, newest * (requests // len(newest) + 1))
    finally:
        await connection.close()
    return {
        "cold_p50": _percentile(cold, 50),
        "cold_p99": _percentile(cold, 99),
        "hot_p50": _percentile(hot, 50),
        "hot_p99": _percentile(hot, 99),
        "cold_requests": len(cold),
        "hot_requests": len(hot),
    }


async def _timed_gets(connection: Connection, ids: Sequence[str]) -> list[float]:
    took_ms = []
    for prediction_id in ids:
        request = encode_request("GET", f"/predict/{prediction_id}")
        started_s = time.perf_counter()
        reply = await connection.send(request)
        took_ms.append((time.perf_counter() - started_s) * 1000)
        if reply.status != 200 or len(reply.body) < RSS_INPUT_BYTES:
            raise RuntimeError(f"GET {prediction_id}: {reply.status} {reply.body[:200]!r}")
    return took_ms


def _percentile(values: Sequence[float], percent: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[percent - 1]
