"""Item 5 of the issue: process memory per stored finished prediction.

Measured two ways, both reported:

- process: the service (model delay 0) is filled through the real
  pipeline (async POST, task queue, worker, event stream read back), and
  its resident memory is read from /proc before and after. Warm-up
  predictions go in first, so buffers, caches and the allocator's first
  arenas are not charged to the stored predictions. This is the figure
  judged against the goal (1 KiB): it is what an operator pays.
- heap: the same number of Accepted + Done events applied to a
  `service.store.ResultStore` in this process under tracemalloc: the
  bytes the mapping itself keeps, without allocator slack.

Inputs are `bench input 00000001` (20 characters); results 4-5 digits.
"""

from __future__ import annotations

import asyncio
import gc
import random
import sys
import tempfile
import time
import tracemalloc
import uuid
from pathlib import Path

import msgspec

from bench.context import Context
from bench.pipeline_client import SubmitResult
from bench.procs import Server, delete_namespace, run_measured, running_service
from bench.report import Goal, Row
from service.disk import Identity
from service.schemas import Accepted, Done
from service.settings import Settings
from service.store import ResultStore

KIB = 1024
TIMEOUT_S = 1200
VERIFY_COUNT = 1000


def run(ctx: Context) -> list[Row]:
    sizes = ctx.sizes
    namespace = ctx.namespace("memory")
    try:
        with running_service(
            ctx.rabbitmq_url, namespace, ctx.log_dir, model_delay_min_s=0, model_delay_max_s=0
        ) as server:
            warm = fill(ctx, server, sizes.memory_warmup)
            rss_warm = server.rss_bytes()
            full = fill(ctx, server, sizes.memory_count - sizes.memory_warmup)
            rss_full = server.rss_bytes()
    finally:
        delete_namespace(ctx.rabbitmq_url, namespace)
    stored = sizes.memory_count - sizes.memory_warmup
    per_prediction = (rss_full - rss_warm) / stored
    details = {
        "stored": sizes.memory_count,
        "rss_after_warmup_bytes": rss_warm,
        "rss_full_bytes": rss_full,
        "heap_bytes_per_prediction": heap_bytes_per_prediction(sizes.memory_count),
        "fill_rate_per_s": full.count / full.makespan_s,
        "post_statuses": [warm.statuses, full.statuses],
        "get_statuses": [warm.verified, full.verified],
        "failed": warm.failed + full.failed,
    }
    return [
        Row(
            "memory",
            f"5. RSS per stored prediction ({sizes.memory_count:,} stored) vs 1 KiB",
            "B",
            "B",
            [per_prediction],
            [KIB],
            Goal("<=", 1.0),
            details=details,
        )
    ]


def fill(ctx: Context, server: Server, count: int) -> SubmitResult:
    """`count` finished predictions through the real pipeline."""
    command = [sys.executable, "-m", "bench.pipeline_client", "submit", "--port", str(server.port)]
    command += ["--count", str(count), "--connections", str(ctx.sizes.pipeline_connections)]
    command += ["--verify", str(VERIFY_COUNT), "--timeout", str(TIMEOUT_S)]
    finished = run_measured(command, TIMEOUT_S + 60)
    return msgspec.json.decode(finished.stdout, type=SubmitResult)


def heap_bytes_per_prediction(count: int) -> float:
    """Bytes a ResultStore keeps per finished prediction, by tracemalloc."""
    return asyncio.run(_traced_fill(count))


async def _traced_fill(count: int) -> float:
    # The default budget holds them all: this is the memory tier's cost per entry.
    with tempfile.TemporaryDirectory() as state_dir:
        store = ResultStore(ttl_s=86_400, memory_max_bytes=Settings().results_memory_max_bytes)
        await store.open(Path(state_dir) / "state.sqlite3", Identity("bench", "/"))
        try:
            gc.collect()
            tracemalloc.start()
            try:
                before, _ = tracemalloc.get_traced_memory()
                for index in range(count):
                    await _store_one(store, index)
                await store.flush()  # rows waiting for the disk are not what is kept
                gc.collect()
                after, _ = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
        finally:
            await store.close()
    if store.memory_entries != count:
        raise RuntimeError(f"kept {store.memory_entries} of {count} predictions in memory")
    return (after - before) / count


async def _store_one(store: ResultStore, index: int) -> None:
    # One id, input and result string per prediction, as in the service
    # (where the Done event's own strings replace the Accepted event's).
    prediction_id, text, now_s = str(uuid.uuid4()), f"bench input {index:08d}", time.time()
    result = str(random.randint(1000, 20000))
    await store.apply_logged([Accepted(prediction_id, text, now_s)])
    await store.apply_logged([Done(prediction_id, text, result, now_s)])
