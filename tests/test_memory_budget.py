"""RESULTS_MEMORY_MAX_BYTES bounds a replica's memory, whatever it retains.

A real `python -m service` takes 300 async predictions of 1 MB each, ten
times its budget: its resident memory stays near the budget plus the
process's own, and every prediction still answers with its whole input,
read back from disk.
"""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import anyio
import httpx

from tests.support import ServiceProcess, metric, settings_for_test

MIB = 2**20
BUDGET_BYTES = 32 * MIB
COUNT = 300
# The process itself (Python, uvicorn, aio-pika, SQLite's caches) and what
# is in flight at once: the follower's prefetch (STREAM_PREFETCH messages),
# the worker's (MODEL_CONCURRENCY tasks, 10 here), the requests being read.
OVERHEAD_BYTES = 200 * MIB


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def _input(i: int) -> str:
    return f"{i:06d}" + "x" * (MIB - 100)  # with the JSON around it, just under MAX_BODY_BYTES


async def test_memory_stays_within_the_budget_and_nothing_is_forgotten(rabbitmq_url: str) -> None:
    settings = settings_for_test(
        rabbitmq_url,
        results_memory_max_bytes=BUDGET_BYTES,
        model_concurrency=10,
        model_delay_min_s=0.01,
        model_delay_max_s=0.05,
    )
    service = ServiceProcess(settings)
    await service.start()
    assert service.process is not None
    pid = service.process.pid
    peak = 0
    try:
        async with httpx.AsyncClient(base_url=service.base_url, timeout=60) as client:
            ids = await _submit(client)
            with anyio.fail_after(120):  # every outcome read back from the stream
                while await metric(client, "results_disk_entries") < COUNT or await metric(
                    client, "task_queue_depth"
                ):
                    peak = max(peak, _rss_bytes(pid))
                    await asyncio.sleep(0.1)
            # Over it at most until the rows not yet on disk are (one commit).
            with anyio.fail_after(5):
                while await metric(client, "results_memory_bytes") > BUDGET_BYTES:
                    await asyncio.sleep(0.05)
            rss = _rss_bytes(pid)
            # Retained: 300 MB of inputs (and as much again in the outcomes on
            # the stream). Main kept them all in memory: RSS grew by ~1.2x that.
            assert rss <= BUDGET_BYTES + OVERHEAD_BYTES, rss / MIB
            assert peak <= BUDGET_BYTES + OVERHEAD_BYTES, peak / MIB
            for i in (0, 1, COUNT // 2, COUNT - 1):  # cold, from disk, whole
                response = await client.get(f"/predict/{ids[i]}")
                assert response.status_code == 200
                text = response.json()["output"]["input"]
                assert hashlib.sha256(text.encode()).digest() == _digest(i)
            assert await metric(client, "results_cold_reads_total") >= 3
            assert await metric(client, "results_disk_entries") == COUNT
    finally:
        await service.stop()


async def _submit(client: httpx.AsyncClient) -> list[str]:
    slots = asyncio.Semaphore(8)

    async def one(i: int) -> str:
        async with slots:
            body = b'{"input": "%s"}' % _input(i).encode()
            response = await client.post("/predict", content=body, headers={"Async-Mode": "true"})
            assert response.status_code == 202, response.text
            prediction_id: str = response.json()["prediction_id"]
            return prediction_id

    return list(await asyncio.gather(*(one(i) for i in range(COUNT))))


def _digest(i: int) -> bytes:
    return hashlib.sha256(_input(i).encode()).digest()
