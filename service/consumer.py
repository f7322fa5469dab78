"""The worker's AMQP side: takes task messages, carries out the decisions, settles.

What becomes of each task is decided in service/decision.py, without the
broker. Here a message goes through three steps, in this order:

1. `_on_message`: decode it (an undecodable one is dead-lettered at once)
   and ask `on_delivery` whether to take its tasks or split a batch that
   came back from a worker that died.
2. `_handle_task`, for each task taken: `decide` before the run (known
   outcome, attempts used up, or run), wait in line for a model slot, run,
   `decide` again, and `_carry_out` the decision: publish the outcome (and
   a copy of a task given up to the dead-letter queue), or put the task in
   the delay queue of its retry.
3. `_settle`: the one place a message is acked or rejected, once every
   task of it has its end confirmed by the broker. If the channel it came
   on has closed meanwhile, the broker has it back and delivers it again;
   the redelivery finds the outcome on the stream, or joins the run still
   going here (service/inflight.py).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import aio_pika.abc
import aio_pika.exceptions
import anyio
import msgspec

from service.broker import (
    DEAD_KEY,
    RETRY_KEY,
    WEBHOOK_KEY,
    Broker,
    BrokerUnavailable,
    delay_key,
)
from service.decision import (
    Decision,
    Known,
    NotRun,
    Policy,
    Raised,
    Ran,
    Record,
    Retry,
    Run,
    Seen,
    Split,
    Take,
    admit,
    charge,
    decide,
    on_delivery,
)
from service.inflight import InFlight, RunCanceled
from service.intake import Intake
from service.journal import Journal, outcome_of
from service.metrics import Metrics
from service.model import ModelError, ModelRunner
from service.schemas import (
    Accepted,
    Canceled,
    Failed,
    Publishable,
    Started,
    TaskBatch,
    WebhookEvent,
    WebhookJob,
    batched,
    task_decoder,
)
from service.slots import ModelSlots, SlotsClosed
from service.store import Pending, Prediction, StateUnavailable

log = logging.getLogger(__name__)

# Pause between attempts to publish what the broker did not confirm.
PUBLISH_RETRY_S = 1.0
MIN_RETRY_PAUSE_S = 0.1
# Loop turns from a delivery's frame to its callback (aiormq, then aio-pika).
HANDOFF_STEPS = 3

MessageT = aio_pika.abc.AbstractIncomingMessage


class DeliveryLost(Exception):
    """The channel a message came on closed: the broker delivers it again."""


class TaskWorker:
    def __init__(
        self,
        broker: Broker,
        journal: Journal,
        runner: ModelRunner,
        metrics: Metrics,
        policy: Policy,
        *,
        read_log_up_to_now: Callable[[], Awaitable[None]],
    ) -> None:
        self._broker = broker
        self._read_log_up_to_now = read_log_up_to_now
        self._journal = journal
        self._metrics = metrics
        self._policy = policy
        self._runs = InFlight(runner)
        self._slots = ModelSlots(broker.settings.model_concurrency)
        self.intake = Intake(broker, self._slots, self._on_message)
        self._handling = 0  # messages delivered and not yet settled
        self._idle = asyncio.Event()
        self._idle.set()
        self._jitter = random.Random()
        self._not_started = NotStarted()

    @property
    def consuming(self) -> bool:
        return self.intake.started

    async def start(self) -> None:
        await self.intake.start()

    def stop_canceled_run(self, prediction_id: str) -> None:
        """A prediction was canceled: stop its model run, if it runs here."""
        if self._runs.cancel(prediction_id):
            self._metrics.canceled_runs.inc()
            log.info("model run stopped: canceled", extra={"prediction_id": prediction_id})

    async def stop(self, grace_s: float) -> None:
        """Take nothing more, put back what waits for a slot, give runs `grace_s` to end.

        A run still going after that stays unacked: closing the connection
        hands its message back to the broker, for another replica or the
        next start (and counts that delivery as an attempt).
        """
        try:
            with anyio.fail_after(self._broker.settings.publish_timeout_s):
                await self.intake.stop()
        except (TimeoutError, *aio_pika.exceptions.CONNECTION_EXCEPTIONS) as exc:
            log.warning("could not cancel the task consumer cleanly: %r", exc)
        # Deliveries that came before the cancel's answer have their callback
        # scheduled, not yet started: let them start, and be counted.
        for _ in range(HANDOFF_STEPS):
            await asyncio.sleep(0)
        self._slots.close()
        with anyio.move_on_after(grace_s) as scope:
            await self._idle.wait()
        if scope.cancelled_caught:
            log.warning(
                "%d task message(s) still handled after the grace period; left for redelivery",
                self._handling,
            )

    # -- 1. a message arrives ------------------------------------------------

    async def _on_message(self, message: MessageT) -> None:
        # Counted before any await, so a stop that waits for handlings to
        # end sees this one. aio-pika cancels this callback when its
        # connection drops, and the broker delivers the message again after
        # the reconnection. The handling goes on in a task of its own, so a
        # model run of 10-17 s is not thrown away: the redelivery joins it.
        self._handling += 1
        self._idle.clear()
        await asyncio.shield(asyncio.ensure_future(self._handle_message(message)))

    async def _handle_message(self, message: MessageT) -> None:
        try:
            await self._take(message)
        except Exception:
            # A bug, or a store that failed under us: back to the broker,
            # counted like the crash it nearly is.
            log.exception("could not handle a task message; returning it to the queue")
            await self._settle(message, requeue=True)
        finally:
            self._handling -= 1
            if not self._handling:
                self._idle.set()

    async def _take(self, message: MessageT) -> None:
        try:
            tasks = _tasks_in(task_decoder.decode(message.body))
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
            log.warning("dead-lettering an undecodable task message: %s", exc)
            self._metrics.dead_lettered.labels("undecodable").inc()
            self.intake.delivered(message, 1)
            await self._settle(message, dead_letter=True)
            return
        # Returns this replica knows were not runs: tasks that were still
        # waiting for a slot when their message's connection dropped.
        not_started = {t.prediction_id: self._not_started.pop(t.prediction_id, 0) for t in tasks}
        plan = on_delivery(tasks, _redeliveries(message), not_started)
        kept, bounced = ([], []) if isinstance(plan, Split) else admit(plan, self._slots.free)
        # Counted at once, so that the intake asks for no more than the slots left.
        self._slots.reserve(len(kept))
        self.intake.delivered(message, len(tasks))
        try:
            await self._take_tasks(message, plan, kept, bounced)
        except DeliveryLost:
            self.intake.lost(message)  # the broker has it back; nothing to settle
        else:
            await self._settle(message)

    async def _take_tasks(
        self,
        message: MessageT,
        plan: Take | Split,
        kept: list[tuple[Accepted, int]],
        bounced: list[Accepted],
    ) -> None:
        if isinstance(plan, Split):
            await self._put_back(plan.tasks, RETRY_KEY, message)
            self._metrics.put_back_redelivered.inc(len(plan.tasks))
            return
        if bounced:
            try:
                await self._put_back([batched(bounced)], RETRY_KEY, message)
            except BaseException:
                for _ in kept:
                    self._slots.unreserve()
                raise
            self._metrics.put_back_busy.inc(len(bounced))
        # Every task runs to its end before the message is settled: one
        # task's lost delivery must not settle the message under the others.
        ends = await asyncio.gather(
            *(self._handle_task(task, crashes, message) for task, crashes in kept),
            return_exceptions=True,
        )
        for end in ends:
            if isinstance(end, BaseException):
                raise end

    # -- 2. each task --------------------------------------------------------

    async def _handle_task(self, task: Accepted, crashes: int, message: MessageT) -> None:
        """Decide, run (or join a run going here), decide again, carry it out."""
        reserved = True  # the slot counted for this task when its message came
        try:
            if task.nonce and await self._lost_to_an_earlier_submit(task, message):
                return
            running = self._runs.running(task.prediction_id)
            seen = await self._seen_before_run(task, running)
            decision: Decision | None = self._decide(task, crashes, seen)
            if isinstance(decision, Run) and running is not None:
                joined = await self._join(task, crashes, running)
                # Gone (cancelled): decide as a new run, attempts checked.
                decision = joined or self._decide(task, crashes, NotRun())
            if isinstance(decision, Run):
                reserved = False  # the slot's line takes it over
                decision = await self._run_in_slot(task, crashes, decision, message)
        finally:
            if reserved:
                self._slots.unreserve()
        if decision is not None:
            await self._carry_out(task, decision, message)

    async def _lost_to_an_earlier_submit(self, task: Accepted, message: MessageT) -> bool:
        """Whether another replica's task with the same idempotency key came first.

        Both carry the id the key gives; the first on the stream is the
        prediction, and only its task runs. Read up to now first: this
        task's own event is on the stream before its message was delivered.
        """
        while True:
            try:
                await self._read_log_up_to_now()
                break
            except BrokerUnavailable:
                if self._broker.closed or _delivery_lost(message):
                    raise DeliveryLost from None
                await self._until_broker_may_confirm()
        stub = self._journal.store.get(task.prediction_id)
        if isinstance(stub, Pending) and stub.nonce and stub.nonce != task.nonce:
            log.debug("skipping a task of a repeated submit", extra=_about(task))
            return True
        return False

    async def _join(
        self, task: Accepted, crashes: int, running: asyncio.Future[str]
    ) -> Decision | None:
        """The outcome of the run an earlier delivery started here; None if it is gone.

        The run holds its slot already, so joining takes none. (The earlier
        delivery's handling sees the same outcome, but its message is the
        broker's again: only outcomes are published from there.)
        """
        await asyncio.wait([running])  # a cancelled joiner leaves the run be
        if running.cancelled():
            return None
        error = running.exception()
        if error is None:
            return self._decide(task, crashes, Ran(running.result()))
        if isinstance(error, ModelError):
            return self._decide(task, crashes, Raised(str(error), joined=True))
        raise error

    async def _run_in_slot(
        self, task: Accepted, crashes: int, run: Run, message: MessageT
    ) -> Decision | None:
        try:
            async with self._slots.held():
                if self._canceled(task.prediction_id):
                    return self._canceled_outcome(task)  # canceled while it waited
                if _delivery_lost(message):
                    # It waited for a slot through a dropped connection: its
                    # redelivery runs it, and is told this return was no run.
                    self._not_started.note(task.prediction_id)
                    raise DeliveryLost
                return await self._run(task, crashes, run, message)
        except SlotsClosed:
            # Stopping before its turn: back on the work queue with its count.
            await self._put_back([charge(task, task.attempts + crashes)], RETRY_KEY, message)
            self._metrics.put_back_stopping.inc()
            return None

    def _canceled_outcome(self, task: Accepted) -> Record:
        """Recorded again: a no-op on the stream (the cancel came first), and
        it settles the task the way every outcome does, webhook included."""
        return Record(Canceled(task.prediction_id, task.input, time.time()))

    def _canceled(self, prediction_id: str) -> bool:
        found = self._journal.store.get(prediction_id)
        return isinstance(found, Prediction) and found.canceled

    async def _seen_before_run(self, task: Accepted, running: asyncio.Future[str] | None) -> Seen:
        try:
            known = await self._journal.store.lookup(task.prediction_id)
        except StateUnavailable:
            known = None  # running it again is waste, not harm: the first outcome wins
        if isinstance(known, Prediction):
            return Known(outcome_of(task.prediction_id, known))
        return NotRun(joining=running is not None)

    async def _run(self, task: Accepted, crashes: int, run: Run, message: MessageT) -> Decision:
        prediction_id = task.prediction_id
        started_at_s = time.time()
        if prediction_id not in self._runs:
            started = Started(prediction_id, run.attempt, started_at_s)
            if _owes(task, "start") and not task.attempts:  # a first run, not a retry
                # On the stream before the webhook is owed, so its body shows it.
                await self._journal.record_started(started)
                await self._owe_webhook(task, "start", message)
            else:
                self._journal.started(started)
        try:
            result, joined = await self._runs.predict(prediction_id, task.input)
        except ModelError as exc:
            _log_failed_attempt(prediction_id, run.attempt, exc)
            return self._decide(task, crashes, Raised(str(exc), started_at_s=started_at_s))
        except RunCanceled:
            return self._canceled_outcome(task)
        if not joined:
            # A joined run is counted by the delivery that started it.
            self._metrics.completed_async.inc()
            log.info("prediction done", extra={"prediction_id": prediction_id})
        return self._decide(task, crashes, Ran(result, started_at_s))

    def _decide(self, task: Accepted, crashes: int, seen: Seen) -> Decision:
        now_s, jitter = time.time(), self._jitter.random()
        return decide(task, crashes, seen, self._policy, now_s=now_s, jitter=jitter)

    async def _carry_out(self, task: Accepted, decision: Decision, message: MessageT) -> None:
        if isinstance(decision, Retry):
            if decision.delay_s > 0:
                key, expires_after_s = delay_key(decision.level), decision.delay_s
            else:
                key, expires_after_s = RETRY_KEY, None  # a TTL of 0 would expire it at once
            await self._put_back([decision.task], key, message, expires_after_s=expires_after_s)
            self._metrics.put_back_failed.inc()
            return
        assert isinstance(decision, Record)  # a Run was carried out by _handle_task
        prediction_id = decision.outcome.prediction_id
        if decision.dead_letter and decision.attempts:
            log.warning(
                "prediction failed after %d attempt(s)",
                decision.attempts,
                extra={"prediction_id": prediction_id},
            )
            self._metrics.failed_async.inc()
        try:
            await self._record(decision)
        finally:
            self._runs.forget(prediction_id)
        if decision.dead_letter and isinstance(decision.outcome, Failed):
            # For operators, as the broker would dead-letter it: the task,
            # with the attempts it spent and why the last one failed.
            spent = max(decision.attempts, task.attempts)
            dead = msgspec.structs.replace(task, attempts=spent, last_error=decision.outcome.error)
            # Sent even if the message is the broker's again: its redelivery
            # finds the failure known and sends no copy.
            await self._put_back([dead], DEAD_KEY, message, even_if_lost=True)
            self._metrics.dead_lettered.labels("model_failed").inc()
        # Owed before the task is acked: a kill -9 now brings the task back,
        # and its redelivery finds the outcome known and owes it again.
        await self._owe_webhook(task, "completed", message)
        if _delivery_lost(message):
            raise DeliveryLost

    async def _owe_webhook(self, task: Accepted, event: WebhookEvent, message: MessageT) -> None:
        """Queue a webhook delivery, if the client asked for this event."""
        if not _owes(task, event):
            return
        job = WebhookJob(task.prediction_id, event, task.webhook, time.time())
        await self._put_back([job], WEBHOOK_KEY, message, even_if_lost=True)

    async def _record(self, decision: Record) -> None:
        """Publish an outcome, retrying until the broker confirms it.

        Even when the message's channel has closed: the broker may hand
        the redelivery to another replica, which must find this outcome on
        the stream rather than run the model again.
        """
        while True:
            if self._broker.closed:
                raise DeliveryLost  # stopped: the message goes back with the connection
            try:
                await self._journal.record((decision.outcome,))
                return
            except BrokerUnavailable as exc:
                extra = {"prediction_id": decision.outcome.prediction_id}
                log.warning("could not record an outcome: %s", exc, extra=extra)
            await self._until_broker_may_confirm()

    async def _put_back(
        self,
        tasks: Sequence[Publishable],
        routing_key: str,
        original: MessageT,
        *,
        expires_after_s: float | None = None,
        even_if_lost: bool = False,
    ) -> None:
        """Publish tasks as messages of their own, retried until confirmed.

        Only while `original` can still be settled: once its channel has
        closed, the broker delivers it again and the redelivery decides
        anew, so a copy published now would run twice. Raises DeliveryLost
        then. Retried rather than requeueing `original`, which would count
        a delivery, and the broker would dead-letter tasks that merely
        waited for a reconnection.
        """
        pending: list[Publishable] = list(tasks)
        while True:
            if self._broker.closed or (_delivery_lost(original) and not even_if_lost):
                raise DeliveryLost
            # Every publish is awaited before an error is raised, so none is
            # still in flight when the caller settles the original message.
            results = await asyncio.gather(
                *(
                    self._broker.publish(task, routing_key, expires_after_s=expires_after_s)
                    for task in pending
                ),
                return_exceptions=True,
            )
            failed = [task for task, result in zip(pending, results, strict=True) if result]
            for result in results:
                if result is not None and not isinstance(result, BrokerUnavailable):
                    raise result
            pending = failed
            if not pending:
                return
            log.warning("could not put %d task(s) back on the work queue", len(pending))
            await self._until_broker_may_confirm()

    async def _until_broker_may_confirm(self) -> None:
        """Wait for a reconnection, or PUBLISH_RETRY_S if connected.

        Connected but unconfirmed means an alarm (memory, disk) blocks
        publishers. Not connected, on a message's still open channel, means
        aio-pika has restored the consumer but not yet told the broker link.
        """
        if self._broker.is_up:
            await anyio.sleep(PUBLISH_RETRY_S)
            return
        with anyio.move_on_after(PUBLISH_RETRY_S):
            await self._broker.wait_up()
        # The link may be up with the channel closed (reopening after a
        # channel error): never retry in a tight loop.
        await anyio.sleep(MIN_RETRY_PAUSE_S)

    # -- 3. settling -----------------------------------------------------------

    async def _settle(
        self, message: MessageT, *, dead_letter: bool = False, requeue: bool = False
    ) -> None:
        """Ack the message, or reject it (dead-letter or requeue): the one place."""
        await self.intake.before_settling(message)
        try:
            if dead_letter or requeue:
                await message.reject(requeue=requeue)
            else:
                await message.ack()
        except aio_pika.exceptions.CONNECTION_EXCEPTIONS as exc:
            # The channel closed under us (broker restart); the broker then
            # redelivers the message, so a failed ack is not an error to propagate.
            log.info("could not settle a message, it will be redelivered: %r", exc)


class NotStarted:
    """Tasks that left the line for a slot because their message went back.

    Their redelivery is not a crash of theirs. Known to this replica only,
    for a while: at most MAX_ENTRIES, the oldest forgotten first.
    """

    MAX_ENTRIES = 10_000

    def __init__(self) -> None:
        self._returns: dict[str, int] = {}

    def note(self, prediction_id: str) -> None:
        self._returns[prediction_id] = self._returns.pop(prediction_id, 0) + 1
        if len(self._returns) > self.MAX_ENTRIES:
            del self._returns[next(iter(self._returns))]

    def pop(self, prediction_id: str, default: int) -> int:
        return self._returns.pop(prediction_id, default)


def _delivery_lost(message: MessageT) -> bool:
    """Whether the channel the message came on has closed (the broker has it back)."""
    try:
        message.channel  # noqa: B018 - raises once the channel is closed
    except aio_pika.exceptions.ChannelInvalidStateError:
        return True
    return False


def _owes(task: Accepted, event: WebhookEvent) -> bool:
    return bool(task.webhook) and event in task.webhook_events


def _about(task: Accepted) -> dict[str, str]:
    return {"prediction_id": task.prediction_id}


def _redeliveries(message: MessageT) -> int:
    # Quorum queues count earlier deliveries of this message in x-delivery-count.
    previous: Any = (message.headers or {}).get("x-delivery-count", 0)
    return previous if isinstance(previous, int) else 0


def _tasks_in(envelope: Accepted | TaskBatch) -> list[Accepted]:
    return envelope.tasks if isinstance(envelope, TaskBatch) else [envelope]


def _log_failed_attempt(prediction_id: str, attempt: int, exc: ModelError) -> None:
    extra = {"prediction_id": prediction_id}
    cause = exc.__cause__ or exc
    log.warning("model failed on attempt %d: %s", attempt, exc, extra=extra)
    log.debug("attempt %d failed", attempt, exc_info=cause, extra=extra)
