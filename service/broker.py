"""The RabbitMQ link: connection, topology and confirmed publishing.

Topology, every name prefixed by BROKER_NAMESPACE (default `predictions`),
all inside the vhost that RABBITMQ_URL names:

    POST (async) --"task"--> [predictions] direct exchange
                               |--"task"--> predictions.tasks   (quorum work queue)
                               '--"task", "event"--> predictions.events (stream)
    worker outcome --"event"--> [predictions] --> predictions.events
    worker puts a task back --"retry"--> [predictions] --> predictions.tasks
    worker retries a failed task --"delay.N"--> [predictions] --> predictions.retry.N
                               (quorum; each message expires after its backoff,
                               then goes --"retry"--> predictions.tasks)
    worker gives a task up --"dead"--> [predictions] --> predictions.dead
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
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aio_pika
import aio_pika.abc
import aio_pika.robust_channel
import aiormq.channel
import aiormq.connection
import aiormq.exceptions
import anyio
from aio_pika.connection import make_url
from pamqp import commands as spec
from yarl import URL

from service.decision import DELAY_LEVELS
from service.metrics import Metrics
from service.schemas import Publishable, event_count, json_encoder
from service.settings import Settings

log = logging.getLogger(__name__)

TASK_KEY = "task"  # routes to the work queue and the stream
EVENT_KEY = "event"  # routes to the stream only
RETRY_KEY = "retry"  # routes to the work queue only: tasks a worker puts back
DEAD_KEY = "dead"  # routes to the dead-letter queue only: tasks a worker gave up
WEBHOOK_KEY = "webhook"  # routes to the webhook deliveries owed (with WEBHOOK_SECRET)
# Every queue and the stream keep copies on this many nodes of a cluster (all
# of them when it has fewer, one on a single node): one node may die without
# losing a message, and a majority (2 of 3) keeps them available.
REPLICAS = 3
QUORUM = {"x-queue-type": "quorum", "x-quorum-initial-group-size": REPLICAS}
# A delivery to retry waits in the delay queue of its wait's power of two
# (1 s, 2 s, ... 2**17 s, beyond any WEBHOOK_RETRY_FOR_S of a day or so):
# every message of one queue has a TTL within 2x of the others'.
WEBHOOK_DELAY_LEVELS = 18
# A failed task waits out its backoff in the delay queue of its level
# (service/decision.py): one queue per level, so that every message in one
# has about the same delay, since a queue expires messages only at its head.
# Retention deletes whole stream segments; small ones keep replay short.
STREAM_SEGMENT_BYTES = 8 * 1024 * 1024
CONNECT_BACKOFF_MAX_S = 5.0

# AMQP reply codes of a broker that closes the connection or a channel on us.
ACCESS_REFUSED = 403
NOT_ALLOWED = 530
# The code of each exception aiormq raises for a code it knows (it keeps only the text).
_REPLY_CODE_OF: dict[type[BaseException], int] = {
    exception: code
    for mapping in (aiormq.connection.EXCEPTION_MAPPING, aiormq.channel.EXCEPTION_MAPPING)
    for code, exception in mapping.items()
}
# RabbitMQ's words when it will not open the vhost. A limit reached says more
# after the user ("...refused for user 'u': connection limit (5) is reached")
# and passes with time: hence the anchor, and a retry for that one.
VHOST_NOT_FOUND = re.compile(r"\bvhost .* not found")
VHOST_REFUSED = re.compile(r"access to vhost '.*' refused for user '[^']*'$")


class BrokerUnavailable(Exception):
    """The broker could not take a message in time."""


class BrokerRefused(BrokerUnavailable):
    """The broker turns this service away; only an operator can change that."""


@dataclass(frozen=True)
class BrokerAddress:
    """Where RABBITMQ_URL points and as whom, without the password: for logs and errors."""

    host: str
    port: int
    vhost: str
    user: str
    tls: bool

    @classmethod
    def parse(cls, url: str) -> BrokerAddress:
        parsed = URL(url)
        # What the URL leaves out, aiormq fills in so.
        return cls(
            host=parsed.host or "localhost",
            port=parsed.port or aiormq.connection.DEFAULT_PORTS.get(parsed.scheme, 5672),
            vhost=parsed.path.removeprefix("/") or "/",
            user=parsed.user or "guest",
            tls=parsed.scheme == "amqps",
        )

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host  # an IPv6 address
        return f"{host}:{self.port}"


@dataclass(frozen=True)
class Names:
    exchange: str
    tasks: str
    events: str
    dead: str

    @classmethod
    def for_namespace(cls, namespace: str) -> Names:
        return cls(namespace, f"{namespace}.tasks", f"{namespace}.events", f"{namespace}.dead")

    def delay(self, level: int) -> str:
        """The delay queue of retries after `level` failed attempts."""
        return f"{self.exchange}.retry.{level}"

    @property
    def webhooks(self) -> str:
        return f"{self.exchange}.webhooks"

    def webhook_delay(self, level: int) -> str:
        """The delay queue of webhook retries waiting up to 2**level seconds."""
        return f"{self.exchange}.webhooks.delay.{level}"

    async def delete(self, channel: aio_pika.abc.AbstractChannel) -> None:
        """Remove every queue and exchange of this namespace (tests and benchmarks clean up)."""
        delays = [self.delay(level) for level in range(1, DELAY_LEVELS + 1)]
        delays += [self.webhook_delay(level) for level in range(WEBHOOK_DELAY_LEVELS)]
        for queue in (self.tasks, self.events, self.dead, self.webhooks, *delays):
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


def refusal(exc: BaseException, address: BrokerAddress) -> str | None:
    """What the broker refuses for good, said for an operator; None if a retry may help.

    Only a broker that is unreachable or overloaded (a connection limit
    reached, a vhost restarting) is worth waiting for.
    """
    if isinstance(exc, aiormq.exceptions.ProbableAuthenticationError):
        return (
            f"RabbitMQ refused login for user {address.user!r} at {address}: "
            "wrong password or unknown user (the broker's log says which)"
        )
    if isinstance(exc, aiormq.exceptions.AuthenticationError):
        return f"RabbitMQ at {address} offers no login mechanism aio-pika has: {exc.args[0]}"
    reply = close_reply(exc)
    return None if reply is None else _refused_access(*reply, address)


def _refused_access(code: int | None, text: str, address: BrokerAddress) -> str | None:
    user, vhost = address.user, address.vhost
    if code == NOT_ALLOWED and VHOST_NOT_FOUND.search(text):
        return f"RabbitMQ vhost {vhost!r} does not exist at {address}"
    if code == NOT_ALLOWED and VHOST_REFUSED.search(text):
        return f"user {user!r} has no permission on vhost {vhost!r} at {address}"
    if code == ACCESS_REFUSED:
        # It may open the vhost, but not declare, read or write what it needs.
        return f"user {user!r} lacks a permission on vhost {vhost!r} at {address}: {text}"
    return None


def close_reply(exc: BaseException) -> tuple[int | None, str] | None:
    """The reply code and text the broker closed the connection or a channel with, if it did."""
    if isinstance(exc, aiormq.exceptions.InvalidFrameError):
        frame = _close_frame_behind(exc)
        return None if frame is None else (frame.reply_code, frame.reply_text)
    closed = (aiormq.exceptions.ConnectionClosed, aiormq.exceptions.ChannelClosed)
    if not isinstance(exc, closed) or not exc.args:
        return None
    if len(exc.args) == 2:  # the classes for codes aiormq does not know: (code, text)
        return exc.args[0], str(exc.args[1])
    return _REPLY_CODE_OF.get(type(exc)), str(exc.args[0])


def _close_frame_behind(exc: BaseException) -> spec.Connection.Close | None:
    """The Connection.Close that an InvalidFrameError complains about.

    aiormq 7.2 checks that the reply to Connection.Open is an OpenOk before
    it looks for a Connection.Close, so a vhost the broker will not open
    arrives as "Expected one of ['Connection.OpenOk'], got <Connection.Close
    object at 0x...>": the broker's code and text are lost from the message.
    The frame is still a local of the function that raised it.
    """
    traceback = exc.__traceback__
    while traceback is not None:
        for value in traceback.tb_frame.f_locals.values():
            if isinstance(value, spec.Connection.Close):
                return value
        traceback = traceback.tb_next
    return None


class ConnectionNoise(logging.Filter):
    """Drops what aiormq and aio-pika log about a lost connection.

    The Broker says so in one WARNING line, and why reconnecting fails once
    per reason; the libraries would add an ERROR line, a traceback and a
    line per attempt. Everything else they log still shows (a blocked
    connection, a malformed frame).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not _is_connection_noise(record)


NOISY_LOGGERS = ("aiormq.connection", "aio_pika.robust_connection", "aio_pika.tools")
_connection_noise = ConnectionNoise()


def quiet_connection_noise() -> None:
    """Install ConnectionNoise on the libraries' loggers (once: addFilter skips a duplicate)."""
    for name in NOISY_LOGGERS:
        logging.getLogger(name).addFilter(_connection_noise)


def _is_connection_noise(record: logging.LogRecord) -> bool:
    message = str(record.msg)
    if record.name == "aiormq.connection":
        if message.startswith("Cancelling cause reader exited abnormally"):
            # A traceback; noise when it is that of a lost connection, not a malformed frame.
            return record.exc_info is not None and isinstance(record.exc_info[1], ConnectionError)
        return message.startswith(("Unexpected connection close", "error when creating transport"))
    if record.name == "aio_pika.robust_connection":
        return message.startswith("Connection attempt to")
    if record.name == "aio_pika.tools" and isinstance(record.args, tuple) and record.args:
        return _is_channel_reopened_too_soon(record.args)
    return False


def _is_channel_reopened_too_soon(args: tuple[object, ...]) -> bool:
    # A channel tries to reopen the moment its connection closes, and fails
    # for want of one ("No active transport in channel", "<Connection> closed");
    # the robust connection reopens every channel once it is back.
    callback = getattr(args[0], "callback", args[0])  # aio-pika's OneShotCallback wraps it
    reopening = (
        getattr(callback, "__func__", None) is aio_pika.robust_channel.RobustChannel._on_close
    )
    return reopening and any(isinstance(arg, RuntimeError) for arg in args[1:])


def describe(exc: BaseException | None) -> str:
    """An error of the broker link in one short line: the broker's own words if it gave any."""
    if exc is None:
        return "no reason given"
    reply = close_reply(exc)
    if reply is not None:
        return reply[1]
    return str(exc) or type(exc).__name__


class Broker:
    """One robust connection with two channels.

    The task channel publishes (with confirms) and consumes the work queue
    with a prefetch the worker sizes from its free model slots
    (service/intake.py); the event channel follows the stream with a
    larger prefetch. Prefetch is per channel in aio-pika's recovery,
    hence two channels rather than one.
    """

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        # No I/O here: `connect()` does it, from the lifespan's background task.
        self.settings = settings
        self._metrics = metrics
        self.names = Names.for_namespace(settings.broker_namespace)
        # The nodes RABBITMQ_URL names; each reconnection tries the next.
        self._urls = settings.rabbitmq_urls
        self._node = 0
        self.address = BrokerAddress.parse(self._urls[0])
        # Why reconnecting failed, each said once per outage (aio-pika retries every
        # BROKER_RECONNECT_INTERVAL_S, whatever the error).
        self._failures_logged: set[str] = set()
        self._connection: aio_pika.abc.AbstractRobustConnection | None = None
        self._up = asyncio.Event()
        self._down = asyncio.Event()
        # Run once the connection is back (its channels and consumers restored).
        self.on_reconnected: list[Callable[[], None]] = []
        self.closed = False  # by us, for good
        self.tasks_channel: aio_pika.abc.AbstractRobustChannel
        self.events_channel: aio_pika.abc.AbstractRobustChannel
        self.exchange: aio_pika.abc.AbstractExchange
        self.tasks_queue: aio_pika.abc.AbstractQueue
        # Declared with WEBHOOK_SECRET only (service/webhooks/).
        self.webhooks_channel: aio_pika.abc.AbstractRobustChannel | None = None
        self.webhooks_queue: aio_pika.abc.AbstractQueue | None = None
        self.events_queue: aio_pika.abc.AbstractRobustQueue

    async def connect(self) -> None:
        """Connect (retrying until BROKER_CONNECT_TIMEOUT_S) and declare the topology.

        Raises BrokerUnavailable with an operator-readable message on failure,
        BrokerRefused at once if the broker turns us away for good.
        """
        quiet_connection_noise()
        connection, self._node = await _connect_with_retry(self.settings, self._urls)
        self.address = BrokerAddress.parse(self._urls[self._node])
        try:
            await self._declare(connection)
        except aiormq.exceptions.AMQPError as exc:
            await connection.close()
            raise self._declare_failure(exc) from None
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

    async def publish(
        self, envelope: Publishable, routing_key: str, *, expires_after_s: float | None = None
    ) -> None:
        """Publish persistently, wait for the broker's confirm, and count it."""
        if not self.is_up:
            raise BrokerUnavailable("not connected to the broker")
        message = aio_pika.Message(
            json_encoder.encode(envelope),
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            content_type="application/json",
            expiration=expires_after_s,
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
        label = _metric_label(routing_key)
        self._metrics.messages_published.labels(label).inc()
        self._metrics.events_published.labels(label).inc(event_count(envelope))

    async def close(self) -> None:
        self.closed = True
        self._up.clear()
        if self._connection is not None:
            await self._connection.close()

    def _declare_failure(self, exc: aiormq.exceptions.AMQPError) -> Exception:
        """The error to stop the start with, in an operator's words where we have them."""
        if isinstance(exc, aio_pika.exceptions.ChannelPreconditionFailed):
            return BrokerUnavailable(
                f"the broker already has {self.names.exchange}.* declared with other "
                f"arguments (was RESULT_TTL_S or MAX_ATTEMPTS changed, or were they "
                f"declared by a version before replication?); use a new "
                f"BROKER_NAMESPACE or delete the old queues: {exc}"
            )
        refused = refusal(exc, self.address)
        return exc if refused is None else BrokerRefused(refused)

    async def _declare(self, connection: aio_pika.abc.AbstractRobustConnection) -> None:
        names, settings = self.names, self.settings
        self.tasks_channel = await _open_channel(connection, settings.model_concurrency)
        self.events_channel = await _open_channel(connection, settings.stream_prefetch)
        channel = self.tasks_channel
        self.exchange = await channel.declare_exchange(names.exchange, "direct", durable=True)
        dead_exchange = await channel.declare_exchange(names.dead, "fanout", durable=True)
        dead_queue = await channel.declare_queue(names.dead, durable=True, arguments=dict(QUORUM))
        await dead_queue.bind(dead_exchange)
        self.tasks_queue = await channel.declare_queue(
            names.tasks, durable=True, arguments=_work_queue_arguments(names, settings)
        )
        for key in (TASK_KEY, RETRY_KEY):
            await self.tasks_queue.bind(self.exchange, key)
        await dead_queue.bind(self.exchange, DEAD_KEY)
        for level in range(1, delay_levels(settings.max_attempts) + 1):
            delay_queue = await channel.declare_queue(
                names.delay(level), durable=True, arguments=_delay_queue_arguments(names)
            )
            await delay_queue.bind(self.exchange, delay_key(level))
        self.events_queue = await self.events_channel.declare_queue(
            names.events, durable=True, arguments=_stream_arguments(settings)
        )
        for key in (TASK_KEY, EVENT_KEY):
            await self.events_queue.bind(self.exchange, key)
        await self.events_queue.bind(dead_exchange)
        if settings.webhook_secret:
            await self._declare_webhooks(connection)

    async def _declare_webhooks(self, connection: aio_pika.abc.AbstractRobustConnection) -> None:
        names = self.names
        # A channel of its own: its prefetch is WEBHOOK_CONCURRENCY.
        channel = await _open_channel(connection, self.settings.webhook_concurrency)
        self.webhooks_channel = channel
        self.webhooks_queue = await channel.declare_queue(
            names.webhooks, durable=True, arguments=dict(QUORUM)
        )
        await self.webhooks_queue.bind(names.exchange, WEBHOOK_KEY)
        arguments = _delay_queue_arguments(names) | {"x-dead-letter-routing-key": WEBHOOK_KEY}
        for level in range(WEBHOOK_DELAY_LEVELS):
            delay_queue = await channel.declare_queue(
                names.webhook_delay(level), durable=True, arguments=arguments
            )
            await delay_queue.bind(names.exchange, webhook_delay_key(level))

    def _on_connection_lost(self, _: object, exc: BaseException | None = None) -> None:
        # Called when the connection drops, then once per failed attempt to reconnect.
        self._next_node()
        interval_s = self.settings.broker_reconnect_interval_s
        if self._up.is_set():
            log.warning(
                "lost the broker connection (%s); reconnecting every %g s",
                describe(exc),
                interval_s,
            )
        elif exc is not None and not isinstance(exc, asyncio.CancelledError):
            self._log_reconnect_failure(exc, interval_s)
        self._up.clear()
        self._down.set()

    def _next_node(self) -> None:
        """Point the next reconnection at the next node: the one lost may be down for good."""
        connection = self._connection
        if len(self._urls) == 1 or not isinstance(connection, aio_pika.RobustConnection):
            return
        if self.closed:
            return
        self._node = (self._node + 1) % len(self._urls)
        interval_s = self.settings.broker_reconnect_interval_s
        # aio-pika reads `url` afresh at each attempt.
        connection.url = make_url(self._urls[self._node], reconnect_interval=interval_s)
        self.address = BrokerAddress.parse(self._urls[self._node])

    def _log_reconnect_failure(self, exc: BaseException, interval_s: float) -> None:
        refused = refusal(exc, self.address)
        reason = refused or describe(exc)
        if reason in self._failures_logged:
            return
        self._failures_logged.add(reason)
        if refused:
            log.error("cannot reconnect: %s; retrying every %g s", refused, interval_s)
        else:
            log.warning("reconnecting failed (%s); retrying every %g s", reason, interval_s)

    def _on_reconnected(self, *_: Any) -> None:
        log.info("broker connection restored (%s)", self.address)  # which node, with several
        self._failures_logged.clear()
        self._down.clear()
        self._up.set()
        for callback in self.on_reconnected:
            callback()


def _work_queue_arguments(names: Names, settings: Settings) -> dict[str, Any]:
    return {
        **QUORUM,
        # The broker counts redeliveries (a crashed consumer's tasks included)
        # and dead-letters a task delivered more than this many extra times.
        "x-delivery-limit": settings.max_attempts - 1,
        "x-dead-letter-exchange": names.dead,
        # At-least-once dead-lettering keeps a task in the work queue until
        # the dead-letter targets have it; it requires reject-publish overflow.
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }


def _delay_queue_arguments(names: Names) -> dict[str, Any]:
    # Nobody consumes a delay queue: each message expires after its own
    # backoff (per-message TTL) and is dead-lettered back to the work queue.
    return {
        **QUORUM,
        "x-dead-letter-exchange": names.exchange,
        "x-dead-letter-routing-key": RETRY_KEY,
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }


def delay_levels(max_attempts: int) -> int:
    """How many delay queues a namespace has: a retry follows attempts 1..MAX_ATTEMPTS-1."""
    return min(max_attempts - 1, DELAY_LEVELS)


def delay_key(level: int) -> str:
    return f"delay.{level}"


def webhook_delay_key(level: int) -> str:
    return f"webhook.delay.{level}"


def _metric_label(routing_key: str) -> str:
    # One series for every delay level.
    if routing_key.startswith("webhook.delay."):
        return "webhook_delay"
    return "delay" if routing_key.startswith("delay.") else routing_key


def _stream_arguments(settings: Settings) -> dict[str, Any]:
    return {
        "x-queue-type": "stream",
        # Replicas on up to REPLICAS nodes, as the quorum queues.
        "x-initial-cluster-size": REPLICAS,
        "x-max-age": f"{math.ceil(settings.result_ttl_s)}s",
        "x-stream-max-segment-size-bytes": STREAM_SEGMENT_BYTES,
    }


async def _open_channel(
    connection: aio_pika.abc.AbstractRobustConnection, prefetch: int
) -> aio_pika.abc.AbstractRobustChannel:
    channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
    await channel.set_qos(prefetch_count=prefetch)
    return channel


async def _connect_with_retry(
    settings: Settings, urls: tuple[str, ...]
) -> tuple[aio_pika.abc.AbstractRobustConnection, int]:
    """The connection to the first node that answers, trying them in turn, and its index.

    Compose starts the broker and the service together; give the broker
    BROKER_CONNECT_TIMEOUT_S to come up, backing off after each round of
    the nodes. A refusal (login, vhost, permissions) waits for an
    operator, not for time.
    """
    deadline = time.monotonic() + settings.broker_connect_timeout_s
    delay_s = 0.2
    attempt = 0
    while True:
        node = attempt % len(urls)
        attempt += 1
        try:
            return await _connect_once(settings, urls[node]), node
        except aio_pika.exceptions.CONNECTION_EXCEPTIONS as exc:
            if (refused := refusal(exc, BrokerAddress.parse(urls[node]))) is not None:
                raise BrokerRefused(refused) from None
            remaining_s = deadline - time.monotonic()
            if remaining_s <= 0:
                raise BrokerUnavailable(
                    f"cannot reach RabbitMQ at {', '.join(map(redacted, urls))} after "
                    f"{settings.broker_connect_timeout_s:g} s: {describe(exc)}"
                ) from None
            if attempt % len(urls):
                continue  # the next node at once
            log.info("broker not reachable yet (%s); retrying in %.1f s", describe(exc), delay_s)
            await anyio.sleep(min(delay_s, remaining_s))
            delay_s = min(delay_s * 2, CONNECT_BACKOFF_MAX_S)


async def _connect_once(settings: Settings, url: str) -> aio_pika.abc.AbstractRobustConnection:
    # Built by hand rather than with connect_robust(): a robust connection
    # whose first attempt fails or is cancelled keeps a reconnect loop alive,
    # and only the object we hold here can close it.
    connection = aio_pika.RobustConnection(
        make_url(url, reconnect_interval=settings.broker_reconnect_interval_s),
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
