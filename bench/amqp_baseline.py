"""The async pipeline's baselines: aio-pika alone, in one process, no HTTP.

`python -m bench.amqp_baseline --mode simple|durable --count N ...` moves N
task messages through the broker and prints one JSON line with the time
from the first publish to the last message handled.

- simple: the issue's baseline. Persistent messages published with
  confirms to one durable (classic) queue and consumed with acks, on one
  channel with the service's prefetch. What the pipeline was before the
  event stream: accept = publish, worker = consume and ack.
- durable: the service's broker work without the service. The topology is
  declared by `service.broker.Broker`, so queue types and arguments are
  the service's own (direct exchange, quorum work queue, event stream);
  the traffic is plain aio-pika calls: a task is published once to the
  work queue and the stream, the worker publishes the outcome to the
  stream with a confirm and then acks, and a stream reader follows both
  events and acks in batches, as every replica does.

durable / simple is therefore the broker-side price of durability.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import time
import uuid
from collections.abc import Awaitable, Callable

import aio_pika
import aio_pika.abc
import msgspec
import uvloop

from service.broker import EVENT_KEY, TASK_KEY, Broker
from service.metrics import Metrics
from service.schemas import Accepted, Done, envelope_decoder, json_encoder
from service.settings import Settings

MessageT = aio_pika.abc.AbstractIncomingMessage
Publish = Callable[[bytes], Awaitable[object]]
# As the service's event follower: ack the stream every prefetch / 4 events.
STREAM_ACK_BATCH = Settings().stream_prefetch // 4
# The baselines publish one task per message, as the service did before batching.
accepted_decoder = msgspec.json.Decoder(Accepted)


class BaselineResult(msgspec.Struct):
    mode: str
    count: int
    elapsed_s: float


def task_body(index: int) -> bytes:
    """A task message as the service publishes it (an `Accepted` event)."""
    return json_encoder.encode(Accepted(str(uuid.uuid4()), f"bench input {index:08d}", time.time()))


async def publish_all(publish: Publish, count: int, concurrency: int) -> None:
    """Publish `count` tasks from `concurrency` publishers, each awaiting its confirm.

    The service publishes once per HTTP request, with as many confirms
    outstanding as requests in flight; this mirrors that.
    """
    indexes = iter(range(count))

    async def publisher() -> None:
        for index in indexes:
            await publish(task_body(index))

    await asyncio.gather(*(publisher() for _ in range(concurrency)))


async def run_simple(url: str, queue_name: str, count: int, concurrency: int) -> float:
    connection = await aio_pika.connect_robust(url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await channel.set_qos(prefetch_count=Settings().model_concurrency)
        queue = await channel.declare_queue(queue_name, durable=True)
        counter = _Countdown(count)

        async def on_task(message: MessageT) -> None:
            accepted_decoder.decode(message.body)  # the worker must read the task
            await message.ack()
            counter.tick()

        async def publish(body: bytes) -> None:
            message = aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
            await channel.default_exchange.publish(message, queue_name)

        consumer_tag = await queue.consume(on_task)
        started_s = time.perf_counter()
        await publish_all(publish, count, concurrency)
        await counter.finished.wait()
        elapsed_s = time.perf_counter() - started_s
        await queue.cancel(consumer_tag)
        await queue.delete(if_unused=False, if_empty=False)
    return elapsed_s


async def run_durable(url: str, namespace: str, count: int, concurrency: int) -> float:
    broker = Broker(Settings(rabbitmq_url=url, broker_namespace=namespace), Metrics())
    await broker.connect()
    try:
        return await _durable_traffic(broker, count, concurrency)
    finally:
        await broker.close()


async def _durable_traffic(broker: Broker, count: int, concurrency: int) -> float:
    outcomes = _Countdown(count)
    unacked = itertools.count(1)

    async def on_task(message: MessageT) -> None:
        task = accepted_decoder.decode(message.body)
        done = Done(task.prediction_id, task.input, "12345", time.time())
        await broker.exchange.publish(_persistent(json_encoder.encode(done)), EVENT_KEY)
        await message.ack()

    async def on_event(message: MessageT) -> None:
        if isinstance(envelope_decoder.decode(message.body), Done):
            outcomes.tick()
        if next(unacked) % STREAM_ACK_BATCH == 0 or outcomes.finished.is_set():
            await message.ack(multiple=True)

    async def publish(body: bytes) -> None:
        await broker.exchange.publish(_persistent(body), TASK_KEY)

    await broker.events_queue.consume(
        on_event, arguments={"x-stream-offset": "first"}, robust=False
    )
    await broker.tasks_queue.consume(on_task)
    started_s = time.perf_counter()
    await publish_all(publish, count, concurrency)
    await outcomes.finished.wait()
    return time.perf_counter() - started_s


def _persistent(body: bytes) -> aio_pika.Message:
    return aio_pika.Message(
        body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT, content_type="application/json"
    )


class _Countdown:
    def __init__(self, count: int) -> None:
        self.remaining = count
        self.finished = asyncio.Event()

    def tick(self) -> None:
        self.remaining -= 1
        if self.remaining <= 0:
            self.finished.set()


async def run(mode: str, url: str, namespace: str, count: int, concurrency: int) -> float:
    if mode == "simple":
        return await run_simple(url, f"{namespace}.simple", count, concurrency)
    return await run_durable(url, namespace, count, concurrency)


def main() -> None:
    parser = argparse.ArgumentParser(description="aio-pika alone: the async pipeline's baseline.")
    parser.add_argument("--mode", choices=["simple", "durable"], required=True)
    parser.add_argument("--rabbitmq-url", required=True)
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    # uvloop, as under uvicorn in the service.
    elapsed_s = uvloop.run(
        run(args.mode, args.rabbitmq_url, args.namespace, args.count, args.concurrency)
    )
    print(msgspec.json.encode(BaselineResult(args.mode, args.count, elapsed_s)).decode())


if __name__ == "__main__":
    main()
