"""The cost of scale: every replica reads the whole event stream.

For 0, 1, 2 and 4 replicas (`python -m service`, default settings) on one
namespace, the same stream is written (`bench/stream_fill.py`: an accepted
and a done event per prediction, batched as under load), and timed until
every replica has read it all. Reported per replica count:

- events each replica reads per second, against one replica's rate;
- the broker's CPU seconds per million events delivered to a replica:
  the broker's CPU over the run, less the run with no replica (writing
  the stream alone), divided by the events all replicas read.

    python -m bench --only fanout
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Iterator

from bench.context import Context
from bench.procs import Server, broker_pid, delete_namespace, http_request, process_cpu_s
from bench.procs import running_service as service
from bench.report import Row
from bench.stream_fill import fill

REPLICAS = (1, 2, 4)
READ_TIMEOUT_S = 300
_EVENTS = re.compile(r"^event_stream_events_total ([0-9.e+-]+)$", re.MULTILINE)


def run(ctx: Context) -> list[Row]:
    count = ctx.sizes.fanout_count
    pid = broker_pid()
    alone_cpu_s = _broker_cpu_s(ctx, 0, count, pid)[1]
    rates: dict[int, float] = {}
    cpu_per_million: dict[int, float] = {}
    for replicas in REPLICAS:
        rate, cpu_s = _broker_cpu_s(ctx, replicas, count, pid)
        rates[replicas] = rate
        events = 2 * count * replicas
        cpu_per_million[replicas] = max(cpu_s - alone_cpu_s, 0.0) / events * 1e6
    details = {
        "predictions": count,
        "events_per_replica": 2 * count,
        "read_events_per_s": rates,
        "broker_cpu_s_per_million_events_read": cpu_per_million,
        "broker_cpu_s_writing_alone": alone_cpu_s,
    }
    return [
        Row(
            f"fanout_{replicas}",
            f"stream read by each of {replicas} replica(s) vs by one",
            "events/s",
            "events/s (1)",
            [rates[replicas]],
            [rates[1]],
            details=details | {"broker_cpu_s_per_million": cpu_per_million[replicas]},
        )
        for replicas in REPLICAS
    ]


def _broker_cpu_s(ctx: Context, replicas: int, count: int, pid: int | None) -> tuple[float, float]:
    """(events each replica read per second, broker CPU s) for one run."""
    namespace = ctx.namespace(f"fanout-{replicas}")
    try:
        with _replicas(ctx, namespace, replicas) as servers:
            before = [_events_read(s) for s in servers]
            cpu_before = process_cpu_s(pid) if pid else 0.0
            started_s = time.perf_counter()
            asyncio.run(fill(ctx.rabbitmq_url, namespace, count, per_message=64))
            for server, already in zip(servers, before, strict=True):
                _wait_read(server, already + 2 * count)
            elapsed_s = time.perf_counter() - started_s
            cpu_s = (process_cpu_s(pid) - cpu_before) if pid else 0.0
    finally:
        delete_namespace(ctx.rabbitmq_url, namespace)
    return 2 * count / elapsed_s, cpu_s


@contextlib.contextmanager
def _replicas(ctx: Context, namespace: str, count: int) -> Iterator[list[Server]]:
    with contextlib.ExitStack() as stack:
        yield [
            stack.enter_context(service(ctx.rabbitmq_url, namespace, ctx.log_dir))
            for _ in range(count)
        ]


def _events_read(server: Server) -> float:
    status, body = http_request(server.port, "GET", "/metrics")
    if status != 200:
        raise RuntimeError(f"/metrics answered {status}")
    found = _EVENTS.search(body.decode())
    return float(found[1]) if found else 0.0


def _wait_read(server: Server, events: float) -> None:
    deadline = time.monotonic() + READ_TIMEOUT_S
    while _events_read(server) < events:
        if time.monotonic() > deadline:
            raise TimeoutError(f"a replica did not read {events:.0f} events")
        time.sleep(0.05)
