"""The RabbitMQ link: connection, topology and confirmed publishing.

Topology, every name prefixed by BROKER_NAMESPACE (default `predictions`),
all inside the vhost that RABBITMQ_URL names:

    POST (async) --"task"--> [predictions] direct exchange
                               |--"task"--> predictions.tasks   (quorum work queue)
                               '--"task", "event"--> predictions.events (stream)
    worker outcome --"event"--> [predictions] --> predictions.events
    worker puts a task back --"retry"--> [predictions] --> predictions.tasks
    predictions.tasks --dead letters--> [predictions.dead] fanout
                               |--> predictions.dead    (quorum, for operators)
                               '--> predictions.events  (so replicas see the failure)

A task is published once and reaches both the work queue and the event
stream, so "accepted" is on record the moment the broker confirms it.
Tasks accepted together travel as one message (service/outbox.py); a
worker splits such a batch back into tasks of their own when it cannot or
should not run it whole, and those go to the work queue only.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

import aio_pika
import aio_pika.abc
import anyio
from aio_pika.connection import make_url
from yarl import URL

from service.schemas import Message, json_encoder
from service.settings import Settings

log = logging.getLogger(__name__)

TASK_KEY = "task"  # routes to the work queue and the stream
EVENT_KEY = "event"  # routes to the stream only
RETRY_KEY = "retry"  # routes to the work queue only: tasks a worker puts back
# Retention deletes whole stream segments; small ones keep replay short.
STREAM_SEGMENT_BYTES = 8 * 1024 * 1024
CONNECT_BACKOFF_MAX_S = 5.0


class BrokerUnavailable(Exception):
    """The broker could not take a message in time."""


@dataclass(frozen=True)
class Names:
    exchange: str
    tasks: str
    events: str
    dead: str

    @classmethod
    def for_namespace(cls, namespace: str) -> Names:
        return cls(namespace, f"{namespace}.tasks", f"{namespace}.events", f"{namespace}.dead")

    async def delete(self, channel: aio_pika.abc.AbstractChannel) -> None:
        """Remove every queue and exchange of this namespace (tests and benchmarks clean up)."""
        for queue in (self.tasks, self.events, self.dead):
            await channel.queue_delete(queue)
        for exchange in (self.exchange, self.dead):
            await channel.exchange_delete(exchange)


def connection_name(settings: Settings) -> str:
    """How this replica's connection appears in `rabbitmqctl list_connections`.

    The namespace, then which replica: its host and process id.
    """
    return f"{connection_prefix(settings)}{socket.gethostname()}/{os.getpid()}"


def connection_prefix(settings: Settings) -> str:
    """What the names of every replica's connection of this namespace start with."""
    return f"prediction-service/{settings.broker_namespace}/"


def redacted(url: str) -> str:
    """The URL without its password, for logs and error messages."""
    parsed = URL(url)
    return str(parsed.with_password("***")) if parsed.password else url


class Broker:
    """One robust connection with two channels.

    The task channel publishes (with confirms) and consumes the work queue
    with prefetch MODEL_CONCURRENCY; the event channel follows the stream
    with a larger prefetch. Prefetch is per channel in aio-pika's recovery,
    hence two channels rather than one.
    """

    def __init__(self, settings: Settings) -> None:
        # No I/O here: `connect()` does it, from the lifespan's background task.
        self.settings = settings
        self.names = Names.for_namespace(settings.broker_namespace)
        self._connection: aio_pika.abc.AbstractRobustConnection | None = None
        self._up = asyncio.Event()
        self._down = asyncio.Event()
        self.tasks_channel: aio_pika.abc.AbstractRobustChannel
        self.events_channel: aio_pika.abc.AbstractRobustChannel
        self.exchange: aio_pika.abc.AbstractExchange
        self.tasks_queue: aio_pika.abc.AbstractQueue
        self.events_queue: aio_pika.abc.AbstractRobustQueue

    async def connect(self) -> None:
        """Connect (retrying until BROKER_CONNECT_TIMEOUT_S) and declare the topology.

        Raises BrokerUnavailable with an operator-readable message on failure.
        """
        connection = await _connect_with_retry(self.settings)
        try:
            await self._declare(connection)
        except aio_pika.exceptions.ChannelPreconditionFailed as exc:
            await connection.close()
            raise BrokerUnavailable(
                f"the broker already has {self.names.exchange}.* declared with other "
                f"arguments (was RESULT_TTL_S or MAX_ATTEMPTS changed?); use a new "
                f"BROKER_NAMESPACE or delete the old queues: {exc}"
            ) from None
        except BaseException:
            await connection.close()
            raise
        connection.close_callbacks.add(self._on_connection_lost)
        connection.reconnect_callbacks.add(self._on_reconnected)
        self._connection = connection
        self._up.set()

    @property
    def is_up(self) -> bool:
        return self._up.is_set() and not self.tasks_channel.is_closed

    async def wait_up(self) -> None:
        await self._up.wait()

    async def wait_down(self) -> None:
        await self._down.wait()

    async def publish(self, event: Message, routing_key: str) -> None:
        """Publish persistently and wait for the broker's confirm."""
        if not self.is_up:
            raise BrokerUnavailable("not connected to the broker")
        message = aio_pika.Message(
            json_encoder.encode(event),
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            content_type="application/json",
        )
        try:
            # aiormq bounds the confirm wait itself; an anyio.fail_after
            # around it cost 9 us a publish, two publishes a prediction.
            await self.exchange.publish(
                message, routing_key, timeout=self.settings.publish_timeout_s
            )
        except TimeoutError:
            raise BrokerUnavailable("the broker did not confirm in time") from None
        except aio_pika.exceptions.CONNECTION_EXCEPTIONS as exc:
            raise BrokerUnavailable(f"the broker refused the message: {exc!r}") from None

    async def close(self) -> None:
        self._up.clear()
        if self._connection is not None:
            await self._connection.close()

    async def _declare(self, connection: aio_pika.abc.AbstractRobustConnection) -> None:
        names, settings = self.names, self.settings
        self.tasks_channel = await _open_channel(connection, settings.model_concurrency)
        self.events_channel = await _open_channel(connection, settings.stream_prefetch)
        channel = self.tasks_channel
        self.exchange = await channel.declare_exchange(names.exchange, "direct", durable=True)
        dead_exchange = await channel.declare_exchange(names.dead, "fanout", durable=True)
        dead_queue = await channel.declare_queue(
            names.dead, durable=True, arguments={"x-queue-type": "quorum"}
        )
        await dead_queue.bind(dead_exchange)
        self.tasks_queue = await channel.declare_queue(
            names.tasks, durable=True, arguments=_work_queue_arguments(names, settings)
        )
        for key in (TASK_KEY, RETRY_KEY):
            await self.tasks_queue.bind(self.exchange, key)
        self.events_queue = await self.events_channel.declare_queue(
            names.events, durable=True, arguments=_stream_arguments(settings)
        )
        for key in (TASK_KEY, EVENT_KEY):
            await self.events_queue.bind(self.exchange, key)
        await self.events_queue.bind(dead_exchange)

    def _on_connection_lost(self, *_: Any) -> None:
        if self._up.is_set():
            log.warning("lost the broker connection; reconnecting")
        self._up.clear()
        self._down.set()

    def _on_reconnected(self, *_: Any) -> None:
        log.info("broker connection restored")
        self._down.clear()
        self._up.set()


def _work_queue_arguments(names: Names, settings: Settings) -> dict[str, Any]:
    return {
        "x-queue-type": "quorum",
        # The broker counts redeliveries (a crashed consumer's tasks included)
        # and dead-letters a task delivered more than this many extra times.
        "x-delivery-limit": settings.max_attempts - 1,
        "x-dead-letter-exchange": names.dead,
        # At-least-once dead-lettering keeps a task in the work queue until
        # the dead-letter targets have it; it requires reject-publish overflow.
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }


def _stream_arguments(settings: Settings) -> dict[str, Any]:
    return {
        "x-queue-type": "stream",
        "x-max-age": f"{math.ceil(settings.result_ttl_s)}s",
        "x-stream-max-segment-size-bytes": STREAM_SEGMENT_BYTES,
    }


async def _open_channel(
    connection: aio_pika.abc.AbstractRobustConnection, prefetch: int
) -> aio_pika.abc.AbstractRobustChannel:
    channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
    await channel.set_qos(prefetch_count=prefetch)
    return channel


async def _connect_with_retry(settings: Settings) -> aio_pika.abc.AbstractRobustConnection:
    # Compose starts the broker and the service together; give the broker
    # BROKER_CONNECT_TIMEOUT_S to come up, backing off between attempts.
    deadline = time.monotonic() + settings.broker_connect_timeout_s
    delay_s = 0.2
    while True:
        try:
            return await _connect_once(settings)
        except aio_pika.exceptions.CONNECTION_EXCEPTIONS as exc:
            remaining_s = deadline - time.monotonic()
            if remaining_s <= 0:
                raise BrokerUnavailable(
                    f"cannot reach RabbitMQ at {redacted(settings.rabbitmq_url)} after "
                    f"{settings.broker_connect_timeout_s:g} s: {exc}"
                ) from None
            log.info("broker not reachable yet (%s); retrying in %.1f s", exc, delay_s)
            await anyio.sleep(min(delay_s, remaining_s))
            delay_s = min(delay_s * 2, CONNECT_BACKOFF_MAX_S)


async def _connect_once(settings: Settings) -> aio_pika.abc.AbstractRobustConnection:
    # Built by hand rather than with connect_robust(): a robust connection
    # whose first attempt fails or is cancelled keeps a reconnect loop alive,
    # and only the object we hold here can close it.
    connection = aio_pika.RobustConnection(
        make_url(settings.rabbitmq_url, reconnect_interval=settings.broker_reconnect_interval_s),
        client_properties={"connection_name": connection_name(settings)},
    )
    try:
        with anyio.fail_after(max(settings.publish_timeout_s, 5)):
            await connection.connect()
    except BaseException:
        with anyio.CancelScope(shield=True):
            await connection.close()
        raise
    return connection
