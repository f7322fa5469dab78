"""Delivers the webhooks owed: a consumer of the broker's webhook queue.

Each message is one delivery owed. A try POSTs the prediction's status
body as this replica reads it from the log, signed; what follows is
`schedule.judge`'s verdict. A retry is published to the delay queue of
its wait before the message is acked, so a delivery is always on the
broker somewhere until it is delivered, gone or dead: a kill -9 in the
middle hands the message to another replica.

Limits: WEBHOOK_CONCURRENCY deliveries at once (the consumer's prefetch),
and WEBHOOK_ENDPOINT_CONCURRENCY to one endpoint. A delivery to an
endpoint that has all of its share busy waits in the delay queue for a
second instead of holding a share of the total: a slow or dead receiver
delays only its own deliveries.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable

import aio_pika.abc
import aio_pika.exceptions
import aiohttp
import msgspec

from service.broker import WEBHOOK_DELAY_LEVELS, Broker, BrokerUnavailable, webhook_delay_key
from service.metrics import Metrics
from service.schemas import PredictionStatus, WebhookJob, json_encoder, webhook_job_decoder
from service.settings import Settings, webhook_key
from service.webhooks.addresses import (
    PublicResolver,
    Unresolvable,
    WebhookRefused,
    check_public,
)
from service.webhooks.endpoints import Endpoints
from service.webhooks.schedule import Dead, Delivered, Gone, RetryLater, Verdict, judge
from service.webhooks.signing import signed_headers

log = logging.getLogger(__name__)

# Of a receiver's answer, at most this much is read (and then dropped).
MAX_RESPONSE_BYTES = 64 * 1024
# A delivery that found its endpoint busy, or the prediction's state not
# readable yet, waits this long; the try is not counted.
PAUSE_S = 1.0
# How often the deliveries waiting in the broker are counted, for /metrics.
OWED_COUNT_EVERY_S = 5.0

StatusOf = Callable[[str], Awaitable[PredictionStatus | None]]


class NotYet(Exception):
    """The status cannot be told yet (this replica's view lags, or is rebuilt)."""


class WebhookSender:
    def __init__(
        self,
        broker: Broker,
        settings: Settings,
        metrics: Metrics,
        status_of: StatusOf,
        read_up_to_now: Callable[[], Awaitable[None]],
    ) -> None:
        key = webhook_key(settings.webhook_secret)
        assert key is not None, "created only with a valid WEBHOOK_SECRET"
        self._key = key
        self._broker = broker
        self._settings = settings
        self._metrics = metrics
        self._status_of = status_of
        self._read_up_to_now = read_up_to_now
        self._endpoints = Endpoints(
            settings.webhook_endpoint_concurrency, max(settings.webhook_concurrency // 4, 1)
        )
        self._session: aiohttp.ClientSession | None = None
        self._consumer_tag: str | None = None
        self._jitter = random.Random()
        self.held = 0  # deliveries taken from the queue and not settled yet
        self.in_broker = 0  # deliveries waiting in the broker's queues, at the last count
        self._counting: asyncio.Task[None] | None = None

    async def start(self) -> None:
        settings = self._settings
        connector = aiohttp.TCPConnector(
            resolver=PublicResolver(settings.webhook_allow_private_networks),
            limit=settings.webhook_concurrency,
            limit_per_host=settings.webhook_endpoint_concurrency,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=settings.webhook_timeout_s),
            headers={"user-agent": "prediction-service-webhooks"},
        )
        queue = self._broker.webhooks_queue
        assert queue is not None
        self._consumer_tag = await queue.consume(self._on_message)
        self._counting = asyncio.create_task(self._count_owed())

    @property
    def owed(self) -> int:
        """Deliveries owed now: waiting in the broker (every replica's), or tried here."""
        return self.in_broker + self.held

    async def _count_owed(self) -> None:
        names = self._broker.names
        queues = [names.webhooks] + [names.webhook_delay(n) for n in range(WEBHOOK_DELAY_LEVELS)]
        while True:
            channel = self._broker.webhooks_channel
            try:
                assert channel is not None
                underlay = await channel.get_underlay_channel()
                counts = [await underlay.queue_declare(name, passive=True) for name in queues]
                self.in_broker = sum(count.message_count or 0 for count in counts)
            except Exception as exc:  # the connection is down: keep the last count
                log.debug("could not count the webhook deliveries owed: %r", exc)
            await asyncio.sleep(OWED_COUNT_EVERY_S)

    async def stop(self) -> None:
        """Take no more; deliveries in progress are dropped, their messages redelivered."""
        if self._counting is not None:
            self._counting.cancel()
        queue, tag = self._broker.webhooks_queue, self._consumer_tag
        if queue is not None and tag is not None:
            try:
                await queue.cancel(tag)
            except (aio_pika.exceptions.AMQPError, *aio_pika.exceptions.CONNECTION_EXCEPTIONS):
                log.info("could not cancel the webhook consumer; the connection closes anyway")
        if self._session is not None:
            await self._session.close()

    async def _on_message(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        self.held += 1
        try:
            await self._handle(message)
        except BrokerUnavailable as exc:
            # Its retry could not be queued. Handed out again after a pause (at
            # once if the connection is gone), not at once: a broker that takes
            # no publishes must not turn into a storm of tries.
            log.warning("could not queue a webhook retry (%s); tried again soon", exc)
            if _channel_open(message):
                await asyncio.sleep(self._settings.broker_reconnect_interval_s)
            await self._settle(message.nack(requeue=True))
        except Exception:
            # A bug: acked, so that it does not circle between replicas for good.
            log.exception("giving up a webhook delivery that could not be handled")
            await self._settle(message.ack())
        except asyncio.CancelledError:
            # A closing channel cancels its consumers' tasks (aiormq): the try
            # is cut off, and the broker has the message back.
            if not _channel_open(message):
                self.in_broker += 1
            raise
        finally:
            self.held -= 1

    async def _handle(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        try:
            job = webhook_job_decoder.decode(message.body)
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
            log.error("dropping an undecodable webhook delivery: %s", exc)
            await self._settle(message.ack())
            return
        async with self._endpoints.turn(job.url) as my_turn:
            if my_turn:
                await self._try_and_settle(job)
            else:
                await self._wait_and_retry(job, "its endpoint is busy")
        await self._settle(message.ack())

    async def _settle(self, settling: Awaitable[object]) -> None:
        """Ack or nack; if the message's channel closed meanwhile, the broker
        has put it back already, and it counts as owed there until the next count."""
        try:
            await settling
        except (aio_pika.exceptions.AMQPError, *aio_pika.exceptions.CONNECTION_EXCEPTIONS):
            log.info("a webhook delivery's channel closed before it was settled; it comes again")
            self.in_broker += 1

    async def _try_and_settle(self, job: WebhookJob) -> None:
        try:
            body = await self._body(job)
        except NotYet as exc:
            await self._wait_and_retry(job, str(exc))
            return
        if body is None:
            self._count(job, "dead")
            log.warning("webhook given up: the prediction is no longer known", extra=_about(job))
            return
        tried = msgspec.structs.replace(job, tries=job.tries + 1)
        try:
            # Again at delivery: settings may differ from the replica that took
            # it, and aiohttp resolves no literal address (PublicResolver).
            await check_public(job.url, self._settings.webhook_allow_private_networks)
        except Unresolvable:
            pass  # the try fails below, and is retried
        except WebhookRefused as exc:
            await self._carry_out(tried, Dead(f"refused: {exc}"))
            return
        verdict = await self._post(tried, body)
        await self._carry_out(tried, verdict)

    async def _body(self, job: WebhookJob) -> bytes | None:
        """The status body, once this replica's view has the event (its log is read
        up to the job: the event was on the stream before the job was queued)."""
        try:
            status = await self._status_of(job.prediction_id)
            if status is not None and not _tells(job, status):
                await self._read_up_to_now()
                status = await self._status_of(job.prediction_id)
        except Exception as exc:  # the view cannot tell right now (an ApiError 503)
            raise NotYet(f"the prediction's status cannot be read ({exc})") from None
        if status is None:
            return None
        if not _tells(job, status):
            raise NotYet(f"this replica's view does not show the {job.event} yet")
        return json_encoder.encode(status)

    async def _post(self, job: WebhookJob, body: bytes) -> Verdict:
        assert self._session is not None
        now_s = time.time()
        headers = signed_headers(self._key, job.webhook_id, int(now_s), body)
        status: int | None = None
        retry_after: str | None = None
        error = ""
        try:
            async with self._session.post(
                job.url, data=body, headers=headers, allow_redirects=False
            ) as response:
                await response.content.read(MAX_RESPONSE_BYTES)
                status, retry_after = response.status, response.headers.get("Retry-After")
        except TimeoutError:
            error = f"no answer within {self._settings.webhook_timeout_s:g} s"
        except (aiohttp.ClientError, OSError, ValueError) as exc:  # ValueError: a bad URL
            error = f"{type(exc).__name__}: {exc}"
        return judge(
            status,
            retry_after,
            error,
            tries=job.tries,
            owed_for_s=now_s - job.first_at_s,
            retry_for_s=self._settings.webhook_retry_for_s,
            jitter=self._jitter.random(),
            now_s=now_s,
        )

    async def _carry_out(self, job: WebhookJob, verdict: Verdict) -> None:
        if isinstance(verdict, Delivered):
            self._count(job, "delivered")
            self._metrics.webhook_latency.observe(max(time.time() - job.first_at_s, 0.0))
        elif isinstance(verdict, Gone):
            self._count(job, "gone")
            log.info("webhook receiver answered 410: no more tries", extra=_about(job))
        elif isinstance(verdict, Dead):
            self._count(job, "dead")
            log.warning("webhook given up: %s", verdict.reason, extra=_about(job))
        else:
            await self._retry(job, verdict)

    async def _retry(self, job: WebhookJob, verdict: RetryLater) -> None:
        await self._broker.publish(
            job, webhook_delay_key(verdict.level), expires_after_s=verdict.delay_s
        )
        self._count(job, "retried")
        log.info(
            "webhook try %d failed (%s); next in %.1f s",
            job.tries,
            verdict.reason,
            verdict.delay_s,
            extra=_about(job),
        )

    async def _wait_and_retry(self, job: WebhookJob, why: str) -> None:
        log.debug("webhook delivery waits %g s: %s", PAUSE_S, why, extra=_about(job))
        await self._broker.publish(job, webhook_delay_key(0), expires_after_s=PAUSE_S)

    def _count(self, job: WebhookJob, outcome: str) -> None:
        self._metrics.webhook_deliveries.labels(job.event, outcome).inc()


def _channel_open(message: aio_pika.abc.AbstractIncomingMessage) -> bool:
    """Whether the message is still ours: once its channel closes, the broker has it back."""
    try:
        return not message.channel.is_closed
    except aio_pika.exceptions.ChannelInvalidStateError:  # closed
        return False


def _tells(job: WebhookJob, status: PredictionStatus) -> bool:
    """Whether the status shows the event: begun for a start, ended for a completed."""
    if job.event == "start":
        return status.status != "queued"
    return status.status not in ("queued", "processing")


def _about(job: WebhookJob) -> dict[str, str]:
    return {"prediction_id": job.prediction_id, "webhook_id": job.webhook_id}
