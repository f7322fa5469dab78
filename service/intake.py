"""How much the worker asks the broker for: about as many tasks as it has free model slots.

The broker's prefetch counts messages, and a message may carry a batch
of up to PUBLISH_BATCH_MAX tasks. A consumer with a fixed prefetch of
MODEL_CONCURRENCY messages could be handed fifty times more tasks than
it can run, and had to hand them back (13.9 put-backs per task in a deep
burst). Instead, each consumer's prefetch is sized from the free slots and
the tasks a message has been carrying lately. A prefetch only applies to
consumers started after it is set, so a new size means a new consumer;
the messages the old one delivered stay ours to settle.

A consumer is only ever cancelled once it is exhausted (as many messages
unsettled as its prefetch), with the settling of its messages held until
the broker confirms the cancel: a consumer cancelled while the broker may
still be handing it messages gets them returned, and a return counts as a
delivery (x-delivery-count), which the worker reads as a crash. While
tasks wait here for a slot, no new consumer is started: a replica holds
at most about one consumer's prefetch beyond what its slots can start,
and the rest of the queue goes to replicas with free slots.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import uuid
from collections.abc import Awaitable, Callable

import aio_pika.abc
import aio_pika.exceptions

from service.broker import Broker
from service.slots import ModelSlots

log = logging.getLogger(__name__)

MessageT = aio_pika.abc.AbstractIncomingMessage
Callback = Callable[[MessageT], Awaitable[None]]
# Weight of the newest message in the running mean of tasks per message.
MEAN_WEIGHT = 0.2
# Wait before adjusting again after the broker refused to.
RETRY_PAUSE_S = 0.5


class Intake:
    def __init__(self, broker: Broker, slots: ModelSlots, on_message: Callback) -> None:
        self._broker = broker
        self._slots = slots
        self._on_message = on_message
        # Until messages say otherwise, assume full batches: ask for little.
        self._tasks_per_message = float(broker.settings.publish_batch_max)
        self._tag: str | None = None
        self._prefetch = 0
        self._unsettled: collections.Counter[str] = collections.Counter()
        # The consumer each counted message came from, by id(message).
        self._counted: dict[int, str] = {}
        self._retiring: dict[str, asyncio.Future[None]] = {}
        self._changed = asyncio.Event()
        self._stopped = False
        self._regulating: asyncio.Task[None] | None = None
        self.consumers_started = 0

    @property
    def started(self) -> bool:
        return self._regulating is not None and not self._stopped

    async def start(self) -> None:
        """Start consuming; from here on the intake follows the slots by itself."""
        self._slots.on_change = self._changed.set
        self._broker.on_reconnected.append(self._forget_unsettled)
        self._broker.tasks_channel.close_callbacks.add(self._forget_unsettled)
        if self._stopped:
            return
        await self._adjust()
        if self._stopped:  # stopped while the first consumer started
            await self._retire_current()
            return
        self._regulating = asyncio.create_task(self._regulate())

    async def stop(self) -> None:
        """No more deliveries. The messages delivered so far are still the worker's.

        The one cancel made while the consumer may have credit: a message
        the broker was handing over at that instant comes back counted.
        """
        self._stopped = True
        if self._regulating is not None:
            self._regulating.cancel()
            # Let it finish what it was doing: a consumer it was starting
            # must be known, so that it is cancelled below.
            await asyncio.gather(self._regulating, return_exceptions=True)
        await self._retire_current()

    def delivered(self, message: MessageT, tasks: int) -> None:
        tag = message.consumer_tag or ""
        self._counted[id(message)] = tag
        self._unsettled[tag] += 1
        self._tasks_per_message += MEAN_WEIGHT * (tasks - self._tasks_per_message)
        self._changed.set()

    async def before_settling(self, message: MessageT) -> None:
        """Call right before acking or rejecting: the broker will count it settled.

        Waits while the message's consumer is being cancelled, so that the
        broker hands it nothing more in the meantime.
        """
        tag = message.consumer_tag or ""
        retiring = self._retiring.get(tag)
        if retiring is not None:
            await asyncio.shield(retiring)
        self.lost(message)

    def lost(self, message: MessageT) -> None:
        """Settled, or gone with its channel: the broker no longer counts it."""
        tag = self._counted.pop(id(message), None)
        if tag is None:
            return  # delivered before a reconnection, which reset the counts
        self._unsettled[tag] -= 1
        if self._unsettled[tag] <= 0:
            del self._unsettled[tag]
        self._changed.set()

    def wanted_prefetch(self) -> int:
        """Messages to let a new consumer take now: 0 to start none."""
        if self._stopped or self._slots.waiting or self._slots.free <= 0:
            return 0
        return max(1, math.ceil(self._slots.free / max(self._tasks_per_message, 1.0)))

    async def _regulate(self) -> None:
        while True:
            await self._changed.wait()
            self._changed.clear()
            try:
                await self._adjust()
            except (TimeoutError, *aio_pika.exceptions.CONNECTION_EXCEPTIONS) as exc:
                # Down: aio-pika restores the consumer that was running. The
                # pause keeps a channel that is being reopened from spinning this.
                log.info("could not adjust the task consumer: %r", exc)
            except Exception:
                log.exception("could not adjust the task consumer")
            else:
                continue
            await asyncio.sleep(RETRY_PAUSE_S)
            await self._broker.wait_up()
            self._changed.set()

    async def _adjust(self) -> None:
        wanted = self.wanted_prefetch()
        if wanted == 0:
            return  # the current consumer keeps what credit it has left
        if self._tag is not None:
            if self._unsettled[self._tag] < self._prefetch:
                return  # it still has credit: the broker hands it what comes
            await self._retire_current()
        await self._start_consumer(wanted)

    async def _start_consumer(self, prefetch: int) -> None:
        await self._broker.tasks_channel.set_qos(prefetch_count=prefetch)
        # Named here and known before the broker answers, so that a stop
        # in between still cancels it.
        self._tag, self._prefetch = f"worker-{uuid.uuid4().hex}", prefetch
        await self._broker.tasks_queue.consume(self._on_message, consumer_tag=self._tag)
        self.consumers_started += 1

    async def _retire_current(self) -> None:
        """Cancel the current consumer, holding its settlements until the broker confirms."""
        tag, self._tag = self._tag, None
        if tag is None:
            return
        cancelled = asyncio.get_running_loop().create_future()
        self._retiring[tag] = cancelled  # before any await: no settlement slips past
        try:
            # Shielded: a regulator cancelled meanwhile must not forget it.
            await asyncio.shield(self._broker.tasks_queue.cancel(tag))
        finally:
            del self._retiring[tag]
            cancelled.set_result(None)

    def _forget_unsettled(self, *_: object) -> None:
        # The task channel closed, or the connection came back: the broker
        # took every unsettled message back, and counting them still would
        # make a consumer look exhausted while it has credit. (Counting too
        # few is safe: it only delays retiring a consumer.)
        self._counted.clear()
        self._unsettled.clear()
