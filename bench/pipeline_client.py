"""The client side of the async pipeline and capacity benchmarks.

`python -m bench.pipeline_client submit ...` POSTs N async predictions and
times them from the first request to the last result stored.
`python -m bench.pipeline_client capacity ...` sends async and sync
predictions all at once and times the batch until every one is finished.
Both print one JSON line.

"Result stored" is read from the service's own /metrics: every async
prediction counted as completed or failed, and none left pending in the
results mapping (`task_queue_depth` is 0). Polling /metrics costs the
service one small request per poll, instead of one GET per prediction;
afterwards (untimed) GETs check that the predictions really answer 200.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import random
import time
from collections.abc import Iterator

import anyio
import msgspec
import uvloop

from bench.httpclient import Connection, encode_request

HOST = "127.0.0.1"
POLL_INTERVAL_S = 0.02
COMPLETED = 'predictions_completed_total{mode="async"}'
FAILED = 'predictions_failed_total{mode="async"}'
PENDING = "task_queue_depth"
MODEL_SECONDS = "model_latency_seconds_sum"
PUT_BACK = "tasks_put_back_total{"
MODEL_CALLS = "model_latency_seconds_count"
ASYNC_HEADERS = {"Content-Type": "application/json", "Async-Mode": "true"}
SYNC_HEADERS = {"Content-Type": "application/json"}

Statuses = dict[int, int]


class SubmitResult(msgspec.Struct):
    count: int
    statuses: Statuses  # of the POSTs
    accept_s: float  # first POST sent to last 202 received
    makespan_s: float  # first POST sent to last result stored
    failed: int  # predictions the model failed, per /metrics
    verified: Statuses  # GET /predict/{id} of the ids checked afterwards


class CapacityResult(msgspec.Struct):
    async_count: int
    sync_count: int
    async_statuses: Statuses
    sync_statuses: Statuses
    accept_s: float  # until the last 202 (all async POSTs accepted)
    sync_max_s: float  # the slowest sync answer
    makespan_s: float  # until every prediction is finished
    model_seconds: float  # sum of the model's waits: what one serial worker would take
    model_calls: int
    failed: int
    verified: Statuses
    put_back: int = 0  # tasks a worker handed back to the work queue, every reason


def body_of(index: int) -> bytes:
    return b'{"input":"bench input %08d"}' % index


async def scrape(connection: Connection) -> dict[str, float]:
    """The service's /metrics as {series: value}."""
    reply = await connection.send(encode_request("GET", "/metrics"))
    series = {}
    for line in reply.body.decode().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            series[name] = float(value)
    return series


async def scrape_once(port: int) -> dict[str, float]:
    # A fresh connection: an idle one may have met uvicorn's keep-alive timeout.
    connection = await Connection.open(HOST, port)
    try:
        return await scrape(connection)
    finally:
        await connection.close()


async def wait_stored(
    port: int, before: dict[str, float], count: int, timeout_s: float
) -> dict[str, float]:
    """Poll /metrics until `count` more async predictions are finished and none pending."""
    connection = await Connection.open(HOST, port)
    try:
        with anyio.fail_after(timeout_s):
            while True:
                now = await scrape(connection)
                finished = sum(now.get(key, 0) - before.get(key, 0) for key in (COMPLETED, FAILED))
                if finished >= count and now.get(PENDING, 0) == 0:
                    return now
                await asyncio.sleep(POLL_INTERVAL_S)
    finally:
        await connection.close()


async def post_async(
    port: int, indexes: Iterator[int], connections: int
) -> tuple[list[str], Statuses]:
    """POST every index as an async prediction over `connections` keep-alive connections."""
    ids: list[str] = []
    statuses: collections.Counter[int] = collections.Counter()

    async def worker() -> None:
        connection = await Connection.open(HOST, port)
        try:
            for index in indexes:
                request = encode_request("POST", "/predict", body_of(index), ASYNC_HEADERS)
                reply = await connection.send(request)
                statuses[reply.status] += 1
                if reply.status == 202:
                    ids.append(msgspec.json.decode(reply.body)["prediction_id"])
        finally:
            await connection.close()

    await asyncio.gather(*(worker() for _ in range(connections)))
    return ids, dict(statuses)


async def verify(port: int, ids: list[str], connections: int) -> Statuses:
    """GET every id once; the statuses answered."""
    statuses: collections.Counter[int] = collections.Counter()
    pending = iter(ids)

    async def worker() -> None:
        connection = await Connection.open(HOST, port)
        try:
            for prediction_id in pending:
                reply = await connection.send(encode_request("GET", f"/predict/{prediction_id}"))
                statuses[reply.status] += 1
        finally:
            await connection.close()

    await asyncio.gather(*(worker() for _ in range(min(connections, len(ids)) or 1)))
    return dict(statuses)


async def submit(
    port: int, count: int, concurrency: int, verify_count: int, timeout_s: float
) -> SubmitResult:
    before = await scrape_once(port)
    started_s = time.perf_counter()
    ids, statuses = await post_async(port, iter(range(count)), concurrency)
    accept_s = time.perf_counter() - started_s
    after = await wait_stored(port, before, len(ids), timeout_s)
    makespan_s = time.perf_counter() - started_s
    checked = random.sample(ids, min(verify_count, len(ids)))
    verified = await verify(port, checked, concurrency)
    failed = int(after.get(FAILED, 0) - before.get(FAILED, 0))
    return SubmitResult(count, statuses, accept_s, makespan_s, failed, verified)


async def post_sync(port: int, index: int, started_s: float) -> tuple[int, float]:
    """One sync prediction on its own connection: (status, seconds since `started_s`)."""
    connection = await Connection.open(HOST, port)
    try:
        reply = await connection.send(
            encode_request("POST", "/predict", body_of(index), SYNC_HEADERS)
        )
    finally:
        await connection.close()
    return reply.status, time.perf_counter() - started_s


async def capacity(
    port: int, async_count: int, sync_count: int, connections: int, timeout_s: float
) -> CapacityResult:
    before = await scrape_once(port)
    started_s = time.perf_counter()
    with anyio.fail_after(timeout_s):
        sync_answers, (ids, async_statuses, accept_s) = await asyncio.gather(
            asyncio.gather(*(post_sync(port, -i - 1, started_s) for i in range(sync_count))),
            _accept_all(port, async_count, connections, started_s),
        )
    after = await wait_stored(port, before, len(ids), timeout_s)
    stored_s = time.perf_counter() - started_s
    sync_max_s = max((elapsed_s for _, elapsed_s in sync_answers), default=0.0)
    return CapacityResult(
        async_count=async_count,
        sync_count=sync_count,
        async_statuses=async_statuses,
        sync_statuses=dict(collections.Counter(status for status, _ in sync_answers)),
        accept_s=accept_s,
        sync_max_s=sync_max_s,
        makespan_s=max(stored_s, sync_max_s),
        model_seconds=after.get(MODEL_SECONDS, 0) - before.get(MODEL_SECONDS, 0),
        model_calls=int(after.get(MODEL_CALLS, 0) - before.get(MODEL_CALLS, 0)),
        failed=int(after.get(FAILED, 0) - before.get(FAILED, 0)),
        verified=await verify(port, ids, connections),
        put_back=int(_put_back(after) - _put_back(before)),
    )


def _put_back(series: dict[str, float]) -> float:
    return sum(value for name, value in series.items() if name.startswith(PUT_BACK))


async def _accept_all(
    port: int, count: int, connections: int, started_s: float
) -> tuple[list[str], Statuses, float]:
    """The async POSTs, and the seconds from `started_s` to the last 202."""
    ids, statuses = await post_async(port, iter(range(count)), connections)
    return ids, statuses, time.perf_counter() - started_s


def main() -> None:
    parser = argparse.ArgumentParser(description="Async pipeline and capacity client.")
    parser.add_argument("mode", choices=["submit", "capacity"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--count", type=int, default=1000, help="async predictions")
    parser.add_argument("--sync-count", type=int, default=0, help="sync predictions (capacity)")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--verify", type=int, default=1000, help="ids to GET afterwards (submit)")
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args()
    result: SubmitResult | CapacityResult
    if args.mode == "submit":
        result = uvloop.run(
            submit(args.port, args.count, args.connections, args.verify, args.timeout)
        )
    else:
        result = uvloop.run(
            capacity(args.port, args.count, args.sync_count, args.connections, args.timeout)
        )
    print(msgspec.json.encode(result).decode())


if __name__ == "__main__":
    main()
