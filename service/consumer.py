"""The worker: takes tasks from the work queue and records their outcome.

A message carries one task or a batch of tasks accepted together. It is
acked only once every task in it has its outcome in the mapping and
confirmed on the event stream, or has been put back on the work queue.

A lone task whose model fails is requeued until its last attempt, then
recorded as failed and rejected into the dead-letter queue. A batch never
makes its tasks share a fate: a task that fails in one, the tasks beyond
this replica's free model slots, and every task of a batch that comes
back after a crash are put back as messages of their own, carrying the
attempts they have spent. A message that cannot be decoded is rejected
into the dead-letter queue at once. A model run outlives a dropped
connection, and the task's redelivery takes its answer (see InFlight).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aio_pika.abc
import anyio
import anyio.abc
import msgspec

from service.broker import RETRY_KEY, Broker, BrokerUnavailable
from service.journal import Journal, outcome_of
from service.metrics import Metrics
from service.model import ModelError, ModelRunner
from service.schemas import (
    Accepted,
    Done,
    Failed,
    Message,
    Outcome,
    TaskBatch,
    batched,
    events_of,
    task_decoder,
)
from service.store import Prediction, StateUnavailable

log = logging.getLogger(__name__)

# The longest a message waits for a free model slot before going back.
PARK_MAX_S = 1.0
# Pause between attempts to publish an outcome the broker did not confirm.
OUTCOME_RETRY_S = 1.0

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
        self._runs = InFlight(runner)
        self._metrics = metrics
        self._max_attempts = max_attempts
        self._shutdown_grace_s = shutdown_grace_s
        self._handling = 0  # messages
        self._handlings: set[asyncio.Task[None]] = set()
        self._holding = 0  # their tasks taken to run here, at most MODEL_CONCURRENCY
        self._slot_freed = asyncio.Event()
        self._stopping = asyncio.Event()
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
        self._stopping = stopping
        consumer_tag = await queue.consume(self._on_message)
        self._running = self.consuming = True
        task_status.started()
        try:
            await stopping.wait()
        finally:
            self.consuming = False
            self._slot_freed.set()  # parked messages go back, uncharged
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
        # aio-pika cancels this callback when its connection drops, and the
        # broker delivers the message again after the reconnection. The
        # handling goes on in a task of its own, so a model run of 10-17 s
        # is not thrown away: the redelivery waits for it (see InFlight), or
        # finds its outcome in the mapping.
        handling = asyncio.create_task(self._handle_counted(message))
        self._handlings.add(handling)  # the loop keeps only a weak reference
        handling.add_done_callback(self._handlings.discard)
        await asyncio.shield(handling)

    async def _handle_counted(self, message: MessageT) -> None:
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
            tasks = _tasks_in(task_decoder.decode(message.body))
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
            log.warning("dead-lettering an undecodable task message: %s", exc)
            self._metrics.dead_lettered.labels("undecodable").inc()
            await _settle(message.reject(requeue=False))
            return
        redeliveries = _redeliveries(message)
        try:
            if len(tasks) > 1 and redeliveries:
                # A batch came back, so one of its tasks may be what stopped
                # the last worker. Apart, each gets a delivery count of its
                # own, so a task that keeps crashing workers is dead-lettered
                # alone. None is charged for this return: the broker cannot
                # say which task (if any) was at fault, and a task parked
                # behind the model never ran.
                await self._put_back(tasks, message)
                self._metrics.put_back_redelivered.inc(len(tasks))
                await _settle(message.ack())
                return
            await self._take_and_process(tasks, message, redeliveries)
        except _DeliveryLost:
            # The connection dropped before the tasks were put back: the
            # broker has the message back and delivers it again.
            return

    async def _take_and_process(
        self, tasks: list[Accepted], message: MessageT, redeliveries: int
    ) -> None:
        # Take as many tasks as there are free model slots, once there is
        # one, and put the rest back for whichever replica is free first:
        # a batch must not queue behind this replica's model while another
        # replica idles. The slots stay reserved until the tasks are done.
        slots = self._broker.settings.model_concurrency
        if not await self._wait_for_slot(slots):
            # Stopping, or parked too long: hand the message back, uncharged.
            # (A redelivered task keeps the count the broker had for it.)
            tasks = [_charged(task, task.attempts + redeliveries) for task in tasks]
            await self._put_back([batched(tasks)], message)
            self._metrics.put_back_busy.inc(len(tasks))
            await _settle(message.ack())
            return
        now, later = tasks[: slots - self._holding], tasks[slots - self._holding :]
        self._holding += len(now)
        try:
            if later:
                await self._put_back([batched(later)], message)
                self._metrics.put_back_busy.inc(len(later))
            await self._process(now, message, redeliveries, alone=len(tasks) == 1)
        finally:
            self._holding -= len(now)
            self._slot_freed.set()

    async def _wait_for_slot(self, slots: int) -> bool:
        """True once a model slot is free; False if stopping or after PARK_MAX_S.

        Prefetch counts messages, not tasks, so a busy replica could park
        many batches while a replica started later idles. Parking at most
        PARK_MAX_S lets them circulate (uncharged) to whoever is free.
        """
        with anyio.move_on_after(PARK_MAX_S):
            while self._holding >= slots and not self._stopping.is_set():
                self._slot_freed.clear()
                await self._slot_freed.wait()
        return self._holding < slots and not self._stopping.is_set()

    async def _put_back(self, messages: Sequence[Message], original: MessageT) -> None:
        """Publish to the work queue alone: the stream already has these tasks.

        Retried until confirmed, as long as `original` can still be settled:
        requeueing it instead would count a delivery, and the broker would
        dead-letter tasks that merely waited for a reconnection. Raises
        _DeliveryLost once its channel has closed.
        """
        pending = list(messages)
        while True:
            # Every publish is awaited before an error is raised, so none is
            # still in flight when the caller settles the original message.
            results = await asyncio.gather(
                *(self._broker.publish(m, RETRY_KEY) for m in pending), return_exceptions=True
            )
            unconfirmed: list[Message] = []
            for put_back, result in zip(pending, results, strict=True):
                if result is None:
                    self._metrics.messages_published.labels(RETRY_KEY).inc()
                    self._metrics.events_published.labels(RETRY_KEY).inc(len(events_of(put_back)))
                elif isinstance(result, BrokerUnavailable):
                    unconfirmed.append(put_back)
                else:
                    raise result
            pending = unconfirmed
            if not pending:
                return
            log.warning("could not put %d message(s) back on the work queue", len(pending))
            if _delivery_lost(original):
                raise _DeliveryLost
            await self._until_broker_may_confirm()

    async def _process(
        self, tasks: list[Accepted], message: MessageT, redeliveries: int, *, alone: bool
    ) -> None:
        # Every task runs to its end before the message is settled: one
        # task's failed confirm must not settle the batch under the others.
        steps = await asyncio.gather(*(self._run(t, message, redeliveries, alone) for t in tasks))
        if any(step.delivery_lost for step in steps):
            # The broker took the message back when its channel closed, and
            # delivers it again: nothing to settle, and nothing to put back
            # (the redelivery runs what has no outcome yet).
            return
        if alone:
            await self._settle_alone(steps[0], message)
            return
        retries = [step.retry for step in steps if step.retry is not None]
        if retries:
            await self._put_back(retries, message)
            self._metrics.put_back_failed.inc(len(retries))
        await _settle(message.ack())

    async def _settle_alone(self, step: _Step, message: MessageT) -> None:
        if step.retry is not None:
            # Requeued: the broker counts the attempt in x-delivery-count.
            await _settle(message.nack(requeue=True))
        elif step.gave_up:
            self._metrics.dead_lettered.labels("model_failed").inc()
            await _settle(message.reject(requeue=False))
        else:
            await _settle(message.ack())

    async def _run(
        self, task: Accepted, message: MessageT, redeliveries: int, alone: bool
    ) -> _Step:
        step = await self._step(task, redeliveries, alone)
        if step.outcome is None:
            return step
        # Recorded as soon as it is known, not when the whole batch is: if a
        # batch-mate then crashes the worker, this outcome survives. (Outcomes
        # of the same loop turn still share one message.) A known outcome is
        # never requeued: each requeue counts a delivery, and enough of those
        # dead-letter a task whose outcome is known, failing it everywhere.
        # It is published even when the message's channel has closed: the
        # broker may hand the redelivery to another replica, which must find
        # this outcome on the stream rather than run the model again.
        try:
            await self._record(step.outcome)
        finally:
            self._runs.forget(task.prediction_id)
        if _delivery_lost(message):
            # The broker has the message back; its redelivery finds the outcome.
            return dataclasses.replace(step, delivery_lost=True)
        return step

    async def _record(self, outcome: Outcome) -> None:
        """Publish an outcome, retrying until the broker confirms it."""
        while True:
            try:
                await self._journal.record((outcome,))
                return
            except BrokerUnavailable as exc:
                extra = {"prediction_id": outcome.prediction_id}
                log.warning("could not record an outcome: %s", exc, extra=extra)
            await self._until_broker_may_confirm()

    async def _until_broker_may_confirm(self) -> None:
        """Wait for a reconnection, or OUTCOME_RETRY_S if connected.

        Connected but unconfirmed means an alarm (memory, disk) blocks
        publishers. Not connected, on a message's still open channel, means
        aio-pika has restored the consumer but not yet told the broker link.
        """
        if self._broker.is_up:
            await anyio.sleep(OUTCOME_RETRY_S)
            return
        with anyio.move_on_after(OUTCOME_RETRY_S):
            await self._broker.wait_up()

    async def _step(self, task: Accepted, redeliveries: int, alone: bool) -> _Step:
        """Run one task, unless its outcome is known or its attempts are used up."""
        known = await self._known_outcome(task.prediction_id)
        if known is not None:
            # Redelivered after its outcome was recorded: publish the outcome
            # again (it may never have reached the stream) and do not rerun.
            return _Step(outcome=outcome_of(task.prediction_id, known))
        attempt = task.attempts + redeliveries + 1
        # A run still kept here is the attempt the broker counted when the
        # connection dropped, not a spent one: take its answer below.
        if attempt > self._max_attempts and task.prediction_id not in self._runs:
            # Used up on earlier deliveries that ended without an outcome
            # (a crashed worker) or after a batch put the task back.
            spent = attempt - 1
            error = task.last_error or f"the worker stopped during each of {spent} attempts"
            return self._give_up(task, spent, error)
        try:
            result, joined = await self._runs.predict(task.prediction_id, task.input)
        except ModelError as exc:
            log.warning(
                "model failed on %s: %s",
                task.prediction_id,
                exc,
                extra={"prediction_id": task.prediction_id},
            )
            if not alone:
                # Back on the work queue as a task of its own, one attempt spent.
                return _Step(retry=_charged(task, attempt, str(exc)))
            if attempt >= self._max_attempts:
                return self._give_up(task, attempt, str(exc))
            return _Step(retry=task)
        return self._done(task, result, joined=joined)

    async def _known_outcome(self, prediction_id: str) -> Prediction | None:
        try:
            known = await self._journal.store.lookup(prediction_id)
        except StateUnavailable:
            return None  # running it again is waste, not harm: the first outcome wins
        return known if isinstance(known, Prediction) else None

    def _done(self, task: Accepted, result: str, *, joined: bool) -> _Step:
        outcome = Done(task.prediction_id, task.input, result, time.time())
        if joined:
            # Joined the run of an earlier delivery, which counts it
            # (InFlight); this delivery publishes it too.
            return _Step(outcome=outcome)
        self._metrics.completed_async.inc()
        log.info("prediction done", extra={"prediction_id": task.prediction_id})
        return _Step(outcome=outcome)

    def _give_up(self, task: Accepted, attempts: int, error: str) -> _Step:
        log.warning(
            "prediction failed after %d attempt(s)",
            attempts,
            extra={"prediction_id": task.prediction_id},
        )
        self._metrics.failed_async.inc()
        failed = Failed(task.prediction_id, task.input, error, time.time())
        return _Step(outcome=failed, gave_up=True)


class InFlight:
    """The model runs here whose outcome is not on the stream yet, by prediction id.

    After a dropped connection the broker delivers a task again while the
    first delivery's handling still runs its model (TaskConsumer._on_message
    keeps it going), or still waits for the broker to confirm its outcome.
    The redelivery takes that run's answer instead of starting the model a
    second time. A run is kept until `forget`, once its outcome is
    published; outcomes are applied only when read back from the stream,
    so until then this is the only place that knows it. A plain future per
    run: a task per run cost a fifth of the async pipeline's throughput.
    """

    def __init__(self, runner: ModelRunner) -> None:
        self._runner = runner
        self._runs: dict[str, asyncio.Future[str]] = {}

    def __contains__(self, prediction_id: str) -> bool:
        return prediction_id in self._runs

    async def predict(self, prediction_id: str, input: str) -> tuple[str, bool]:
        """The model's answer, and whether it came from a run already kept here."""
        running = self._runs.get(prediction_id)
        if running is not None:
            # Shielded: a waiter cancelled with its connection leaves the run be.
            return await asyncio.shield(running), True
        run: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._runs[prediction_id] = run
        try:
            result = await self._runner.predict(input)
        except asyncio.CancelledError:
            run.cancel()
            del self._runs[prediction_id]
            raise
        except BaseException as exc:
            # A failed run is not kept: the next delivery tries again.
            run.set_exception(exc)
            run.exception()  # retrieved, so asyncio does not log it if nobody waits
            del self._runs[prediction_id]
            raise
        run.set_result(result)
        return result, False

    def forget(self, prediction_id: str) -> None:
        """The run's outcome is on the stream: a later delivery finds it there.

        (One between the broker's confirm and the follower reading it back,
        a few ms, would run the model again: wasted, not wrong.)
        """
        run = self._runs.get(prediction_id)
        if run is not None and run.done():
            del self._runs[prediction_id]


@dataclass(frozen=True)
class _Step:
    """What became of one task of a message."""

    outcome: Outcome | None = None  # to record
    retry: Accepted | None = None  # to run again later
    gave_up: bool = False  # failed for good on this delivery
    delivery_lost: bool = False  # its message's channel closed before the outcome was recorded


def _tasks_in(message: Accepted | TaskBatch) -> list[Accepted]:
    return message.tasks if isinstance(message, TaskBatch) else [message]


def _charged(task: Accepted, spent: int, last_error: str = "") -> Accepted:
    """The task with `spent` attempts used, to go back on the work queue alone."""
    return msgspec.structs.replace(task, attempts=spent, last_error=last_error or task.last_error)


class _DeliveryLost(Exception):
    """The channel a message came on closed before it could be settled."""


def _delivery_lost(message: MessageT) -> bool:
    """Whether the channel the message came on has closed (the broker has it back)."""
    try:
        message.channel  # noqa: B018 - raises once the channel is closed
    except aio_pika.exceptions.ChannelInvalidStateError:
        return True
    return False


def _redeliveries(message: MessageT) -> int:
    # Quorum queues count earlier deliveries of this message in x-delivery-count.
    previous: Any = (message.headers or {}).get("x-delivery-count", 0)
    return previous if isinstance(previous, int) else 0


async def _settle(acknowledgement: Any) -> None:
    # The channel may have closed under us (broker restart); the broker then
    # redelivers the message, so a failed ack is not an error to propagate.
    try:
        await acknowledgement
    except aio_pika.exceptions.CONNECTION_EXCEPTIONS as exc:
        log.info("could not settle a message, it will be redelivered: %r", exc)
