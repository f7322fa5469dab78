"""The worker: takes tasks from the work queue and records their outcome.

A task is acked only once its outcome is in the mapping and confirmed on
the event stream. A model failure is retried (requeued) until the task's
last attempt, then recorded as failed and rejected into the dead-letter
queue. A message that cannot be decoded is rejected there at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import aio_pika.abc
import anyio
import anyio.abc
import msgspec

from service.broker import Broker, BrokerUnavailable
from service.journal import Journal, outcome_of
from service.metrics import Metrics
from service.model import ModelError, ModelRunner
from service.schemas import Accepted, Done, Failed, Outcome, task_decoder

log = logging.getLogger(__name__)

MessageT = aio_pika.abc.AbstractIncomingMessage


class TaskConsumer:
    def __init__(
        self,
        broker: Broker,
        journal: Journal,
        runner: ModelRunner,
        metrics: Metrics,
        *,
        max_attempts: int,
        shutdown_grace_s: float,
    ) -> None:
        self._broker = broker
        self._journal = journal
        self._runner = runner
        self._metrics = metrics
        self._max_attempts = max_attempts
        self._shutdown_grace_s = shutdown_grace_s
        self._handling = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._drained = asyncio.Event()
        self._running = False
        self.consuming = False

    async def run(
        self, stopping: asyncio.Event, *, task_status: anyio.abc.TaskStatus[None]
    ) -> None:
        """Consume until `stopping` is set or the task is cancelled, then drain."""
        queue = self._broker.tasks_queue
        self._drained.clear()
        consumer_tag = await queue.consume(self._on_message)
        self._running = self.consuming = True
        task_status.started()
        try:
            await stopping.wait()
        finally:
            self.consuming = False
            with anyio.CancelScope(shield=True):
                await self._drain(queue, consumer_tag)
            self._running = False
            self._drained.set()

    async def wait_drained(self) -> None:
        """Return once a started consumer has drained (at once if it never started)."""
        if self._running:
            await self._drained.wait()

    async def _drain(self, queue: aio_pika.abc.AbstractQueue, consumer_tag: str) -> None:
        # Stop deliveries, then give running tasks the grace period. Whatever
        # is still running after it stays unacked: closing the connection
        # hands it back to the broker for another replica or the next start.
        try:
            with anyio.fail_after(self._broker.settings.publish_timeout_s):
                await queue.cancel(consumer_tag)
        except (TimeoutError, *aio_pika.exceptions.CONNECTION_EXCEPTIONS) as exc:
            log.warning("could not cancel the task consumer cleanly: %r", exc)
        with anyio.move_on_after(self._shutdown_grace_s) as scope:
            await self._idle.wait()
        if scope.cancelled_caught:
            log.warning(
                "%d task(s) still running after the grace period; left for redelivery",
                self._handling,
            )

    async def _on_message(self, message: MessageT) -> None:
        self._handling += 1
        self._idle.clear()
        try:
            await self._handle(message)
        finally:
            self._handling -= 1
            if not self._handling:
                self._idle.set()

    async def _handle(self, message: MessageT) -> None:
        try:
            task = task_decoder.decode(message.body)
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:
            log.warning("dead-lettering an undecodable task message: %s", exc)
            self._metrics.dead_lettered.labels("undecodable").inc()
            await _settle(message.reject(requeue=False))
            return
        try:
            await self._process(task, message)
        except BrokerUnavailable as exc:
            # The outcome is in the mapping; a redelivery publishes it again.
            log.warning("could not record %s: %s", task.prediction_id, exc)
            await _settle(message.nack(requeue=True))

    async def _process(self, task: Accepted, message: MessageT) -> None:
        known = self._journal.store.get(task.prediction_id)
        if known is not None and known.finished:
            # Redelivered after its outcome was recorded: publish the outcome
            # again (it may never have reached the stream) and do not rerun.
            await self._journal.record(outcome_of(task.prediction_id, known))
            await _settle(message.ack())
            return
        attempt = _attempt(message)
        outcome = await self._predict(task, last_attempt=attempt >= self._max_attempts)
        if outcome is None:
            await _settle(message.nack(requeue=True))
            return
        await self._journal.record(outcome)
        extra = {"prediction_id": task.prediction_id}
        if isinstance(outcome, Done):
            log.info("prediction done", extra=extra)
            await _settle(message.ack())
        else:
            log.warning("prediction failed after %d attempt(s)", attempt, extra=extra)
            self._metrics.dead_lettered.labels("model_failed").inc()
            await _settle(message.reject(requeue=False))

    async def _predict(self, task: Accepted, *, last_attempt: bool) -> Outcome | None:
        """The outcome to record, or None to retry the task."""
        try:
            result = await self._runner.predict(task.input)
        except ModelError as exc:
            log.warning(
                "model failed on %s: %s",
                task.prediction_id,
                exc,
                extra={"prediction_id": task.prediction_id},
            )
            if not last_attempt:
                return None
            self._metrics.failed_async.inc()
            return Failed(task.prediction_id, task.input, str(exc), time.time())
        self._metrics.completed_async.inc()
        return Done(task.prediction_id, task.input, result, time.time())


def _attempt(message: MessageT) -> int:
    # Quorum queues count earlier deliveries in x-delivery-count.
    previous: Any = (message.headers or {}).get("x-delivery-count", 0)
    return (previous if isinstance(previous, int) else 0) + 1


async def _settle(acknowledgement: Any) -> None:
    # The channel may have closed under us (broker restart); the broker then
    # redelivers the message, so a failed ack is not an error to propagate.
    try:
        await acknowledgement
    except aio_pika.exceptions.CONNECTION_EXCEPTIONS as exc:
        log.info("could not settle a message, it will be redelivered: %r", exc)
