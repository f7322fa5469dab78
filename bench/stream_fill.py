"""Fill a namespace's event stream with finished predictions, fast.

A restart benchmark needs hundreds of thousands of retained predictions;
sending them through the HTTP pipeline would take minutes. This writes
what that pipeline would leave on the stream, an `accepted` and a `done`
event per prediction, straight to the exchange (routing key `event`, so
no worker sees them), through the service's own Broker, which declares
the namespace's topology as the service would. `per_message` is 1 as an
idle service publishes, or more as batching does under load. A
prediction's `done` follows its `accepted` by `lag` predictions, as a
model's latency spreads them on a real stream (the default, 2,000: a
13.5 s model at 150 predictions/s).

    python -m bench.stream_fill --namespace NS --count 100000 --per-message 64
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import time
import uuid
from dataclasses import dataclass

from service.broker import EVENT_KEY, Broker
from service.metrics import Metrics
from service.schemas import Accepted, Done, Event, batched
from service.settings import Settings

IN_FLIGHT = 256  # publishes awaiting their confirm at once
DEFAULT_LAG = 2_000


async def fill(
    rabbitmq_url: str,
    namespace: str,
    count: int,
    per_message: int,
    *,
    input_bytes: int = 20,
    lag: int = DEFAULT_LAG,
) -> Filled:
    """The predictions' ids, in the order they were accepted, and the messages sent."""
    settings = Settings(rabbitmq_url=rabbitmq_url, broker_namespace=namespace)
    broker = Broker(settings, Metrics())
    await broker.connect()
    try:
        slots = asyncio.Semaphore(IN_FLIGHT)
        sends: list[asyncio.Task[None]] = []
        ids, messages = _messages(count, per_message, input_bytes, lag)
        for events in messages:
            await slots.acquire()
            sends.append(asyncio.create_task(_send(broker, events, slots)))
        await asyncio.gather(*sends)
    finally:
        await broker.close()
    return Filled(ids, len(messages))


@dataclass(frozen=True)
class Filled:
    ids: list[str]
    messages: int


async def _send(broker: Broker, events: list[Event], slots: asyncio.Semaphore) -> None:
    try:
        await broker.publish(batched(events), EVENT_KEY)
    finally:
        slots.release()


def _messages(
    count: int, per_message: int, input_bytes: int, lag: int
) -> tuple[list[str], list[list[Event]]]:
    """Tasks and outcomes, `per_message` to a message, each outcome `lag` predictions late."""
    now_s = time.time()
    ids = [str(uuid.uuid4()) for _ in range(count)]
    inputs = [f"bench input {i:08d}".ljust(input_bytes, "x") for i in range(count)]
    accepted: list[Event] = [Accepted(p, text, now_s) for p, text in zip(ids, inputs, strict=True)]
    done: list[Event] = [
        Done(p, text, str(random.randint(1000, 20000)), now_s)
        for p, text in zip(ids, inputs, strict=True)
    ]
    messages: list[list[Event]] = []
    for start in range(0, count + lag, per_message):
        if start < count:
            messages.append(accepted[start : start + per_message])
        late = start - lag
        if late + per_message > 0 and late < count:
            messages.append(done[max(late, 0) : late + per_message])
    return ids, messages


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.stream_fill", description=__doc__)
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--per-message", type=int, default=64)
    parser.add_argument("--input-bytes", type=int, default=20)
    parser.add_argument("--lag", type=int, default=DEFAULT_LAG, help="outcomes trail by this")
    default_url = os.environ.get("RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument("--rabbitmq-url", default=default_url)
    args = parser.parse_args()
    asyncio.run(
        fill(
            args.rabbitmq_url,
            args.namespace,
            args.count,
            args.per_message,
            input_bytes=args.input_bytes,
            lag=args.lag,
        )
    )


if __name__ == "__main__":
    main()
