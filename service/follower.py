"""Follows the broker's event stream into this replica's results view.

It starts where the local state stands (the checkpoint on disk, or the
stream's first offset), then keeps following. To know when it has caught
up it appends a marker of its own and waits to read it back: everything
before the marker is then applied. After a lost connection it resumes
from the last message it applied.

Resuming at an offset is checked: the message found there must be the
one applied (same fingerprint). If retention has deleted it, or the
stream was deleted and declared again, the local state no longer matches
the stream, and it is rebuilt from the stream's start. So it is when a
read finds the disk damaged.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import aio_pika.abc
import aiormq.abc
import anyio
import anyio.abc
import msgspec

from service.broker import EVENT_KEY, Broker, BrokerUnavailable
from service.disk import Position
from service.fence import Fences
from service.schemas import Accepted, Event, Failed, Marker, envelope_decoder, events_of
from service.store import ResultStore

log = logging.getLogger(__name__)

# The delay queues of retries (service/broker.py Names.delay).
RETRY_QUEUE = re.compile(r"\.retry\.\d+$")

# aiormq's delivery, not aio-pika's IncomingMessage: wrapping every event
# in one cost a quarter of the event loop's time during a replay, for
# nothing the follower reads (the body, two headers, the delivery tag).
Delivery = aiormq.abc.DeliveredMessage


class EventFollower:
    def __init__(self, broker: Broker, store: ResultStore) -> None:
        self._broker = broker
        self._store = store
        self._last_offset: int | None = None
        self._last_body = b""
        self._expect: Position | None = None  # to verify at the next subscription
        self._marker_id = ""
        self._generation = 0  # of the subscription; deliveries of older ones are dropped
        self._unacked = 0
        self.events_read = 0  # applied since start (a resumed restart reads few)
        self._start_over = asyncio.Event()
        self._delivered = asyncio.Event()  # anything, since the last subscription
        # Deliveries in arrival order, applied one at a time by `_apply_in_order`:
        # decoded only when their turn comes, so a follower held back by the
        # memory budget keeps raw messages waiting, not decoded copies too.
        self._deliveries: asyncio.Queue[tuple[int, Delivery]] = asyncio.Queue()
        self.caught_up = asyncio.Event()
        self.fences = Fences(self._publish_marker, broker.settings.publish_timeout_s)

    @property
    def fences_sent(self) -> int:
        return self.fences.sent

    def resume_after(self, checkpoint: Position | None) -> None:
        """Start after this stream message (the disk's checkpoint), not at the first."""
        if checkpoint is not None:
            self._last_offset = checkpoint.offset
            self._expect = checkpoint

    async def run(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        """Follow forever; `started` once the first replay has caught up."""
        started = False
        while True:
            await self._broker.wait_up()
            try:
                started |= await self._follow_until_interrupted(None if started else task_status)
            except (BrokerUnavailable, *aio_pika.exceptions.CONNECTION_EXCEPTIONS) as exc:
                log.warning("event stream interrupted (%r); resuming", exc)
                await anyio.sleep(self._broker.settings.broker_reconnect_interval_s)
            finally:
                self.caught_up.clear()
            if self._start_over.is_set() or self._store.damaged.is_set():
                await self._rebuild()

    async def _follow_until_interrupted(
        self, task_status: anyio.abc.TaskStatus[None] | None
    ) -> bool:
        """Subscribe, catch up, follow; False if interrupted before catching up."""
        queue = self._broker.events_queue
        # A channel error closes the event channel alone; aio-pika reopens
        # it, but without this consumer, so it counts as a disconnection.
        channel_closed = asyncio.Event()

        def on_channel_closed(*_: Any) -> None:
            channel_closed.set()

        channel = self._broker.events_channel
        channel.close_callbacks.add(on_channel_closed)
        self._subscribe_from_last()
        # Straight on the channel aio-pika keeps open, so aio-pika does not
        # restore it after a reconnection (from the first offset again):
        # this loop resumes it from where it stopped instead.
        underlay = await channel.get_underlay_channel()
        consumer_tag = f"follower-{self._marker_id}"
        await underlay.basic_consume(
            queue.name,
            functools.partial(self._on_message, self._generation),
            arguments={"x-stream-offset": self._start_offset()},
            consumer_tag=consumer_tag,
        )
        try:
            async with anyio.create_task_group() as applying:
                applying.start_soon(self._apply_in_order)
                caught_up = await self._follow(task_status, channel_closed)
                applying.cancel_scope.cancel()
            return caught_up
        finally:
            channel.close_callbacks.discard(on_channel_closed)
            with anyio.CancelScope(shield=True), anyio.move_on_after(1):
                await _quietly(underlay.basic_cancel(consumer_tag))

    async def _follow(
        self, task_status: anyio.abc.TaskStatus[None] | None, channel_closed: asyncio.Event
    ) -> bool:
        interrupted = (
            self._broker.wait_down,
            channel_closed.wait,
            self._start_over.wait,
            self._store.damaged.wait,
        )
        await _first_of(self._catch_up, *interrupted)
        if not self.caught_up.is_set():
            return False
        if task_status is not None:
            task_status.started()
        await _first_of(*interrupted)
        return True

    def _subscribe_from_last(self) -> None:
        self._generation += 1
        self._delivered.clear()
        self._deliveries = asyncio.Queue()
        # Set before the first delivery, which may come before the marker is sent.
        self._marker_id = uuid.uuid4().hex
        if self._last_offset is not None and self._expect is None:
            self._expect = Position.of(self._last_offset, self._last_body)

    def _start_offset(self) -> int | str:
        # From the last message applied itself, to check it is still that one.
        return "first" if self._last_offset is None else self._last_offset

    async def _catch_up(self) -> None:
        started_s = time.perf_counter()
        self._store.catching_up(True)
        try:
            await self._publish_marker(self._marker_id)
            if self._expect is not None:
                await self._check_stream_reaches(self._expect)
            await self.caught_up.wait()
        finally:
            self._store.catching_up(False)
        log.info(
            "event stream caught up in %.2f s (%d pending, %d on disk)",
            time.perf_counter() - started_s,
            self._store.pending,
            self._store.disk_entries,
        )

    async def _check_stream_reaches(self, expect: Position) -> None:
        """Start over if the stream is shorter than the state (declared anew since).

        Asked for an offset past its end, the broker delivers nothing until
        the stream gets there, not even the marker just confirmed on it.
        A stream that has the offset delivers from it at once.
        """
        with anyio.move_on_after(self._broker.settings.publish_timeout_s):
            await self._delivered.wait()
        if not self._delivered.is_set():
            self._stream_moved_on(expect)
            await anyio.sleep_forever()  # until the follow loop notices the start-over

    async def _rebuild(self) -> None:
        await self._store.reset()
        self._last_offset, self._last_body, self._expect = None, b"", None
        self._start_over.clear()

    async def _publish_marker(self, marker_id: str) -> None:
        await self._broker.publish(Marker(marker_id, time.time()), EVENT_KEY)

    async def _on_message(self, generation: int, message: Delivery) -> None:
        # aiormq runs each delivery as a task of its own, started in arrival
        # order; queued at once, they are applied in that order.
        if generation == self._generation:
            self._delivered.set()
        self._deliveries.put_nowait((generation, message))

    async def _apply_in_order(self) -> None:
        while True:
            generation, message = await self._deliveries.get()
            await self._apply(generation, message)

    async def _apply(self, generation: int, message: Delivery) -> None:
        if generation != self._generation:
            return  # for a consumer cancelled since: its credit went with it
        headers = message.header.properties.headers or {}
        offset, body = headers.get("x-stream-offset"), message.body
        if not isinstance(offset, int) or not self._is_new(offset, body):
            await self._ack(message)
            return
        events = _decode(body, headers)
        self.events_read += len(events)
        self._last_offset, self._last_body = offset, body
        await self._store.apply_logged(events, offset, body)
        # After the apply: a marker read means everything before it is applied.
        for event in events:
            if isinstance(event, Marker):
                self._on_marker(event.marker_id)
        await self._ack(message)

    def _is_new(self, offset: int, body: bytes) -> bool:
        """Whether to apply this message: not one applied already, and no start-over due."""
        if self._start_over.is_set():
            return False
        expect = self._expect
        if expect is not None:
            if offset < expect.offset and not self._holds_our_marker(body):
                return False  # the broker starts at the head of the chunk holding `expect`
            if Position.of(offset, body) == expect:
                self._expect, self._last_body = None, body
                self._store.verified()  # the state is this stream's: it may answer
                return False
            self._stream_moved_on(expect)
            return False
        return self._last_offset is None or offset > self._last_offset

    def _holds_our_marker(self, body: bytes) -> bool:
        # Our marker before the expected offset: the stream is shorter than
        # the state (deleted and declared again since).
        try:
            events = events_of(envelope_decoder.decode(body))
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
            return False
        return any(isinstance(e, Marker) and e.marker_id == self._marker_id for e in events)

    def _stream_moved_on(self, expect: Position) -> None:
        log.warning(
            "the event stream no longer holds the message the local state ends at "
            "(offset %d: retention deleted it, or the stream was declared anew); "
            "rebuilding the state from the start of the stream",
            expect.offset,
        )
        self._start_over.set()

    def _on_marker(self, marker_id: str) -> None:
        if marker_id == self._marker_id:
            self.caught_up.set()
        self.fences.seen(marker_id)

    async def _ack(self, message: Delivery) -> None:
        # Acking in batches (multiple=True) saves a frame per event; any
        # batch smaller than the prefetch keeps deliveries flowing.
        self._unacked += 1
        if self._unacked >= self._ack_batch:
            self._unacked = 0
            tag = message.delivery_tag
            if tag is not None:
                await _quietly(message.channel.basic_ack(tag, multiple=True))

    @property
    def _ack_batch(self) -> int:
        return max(1, self._broker.settings.stream_prefetch // 4)


def _decode(body: bytes, headers: dict[str, Any]) -> list[Event]:
    try:
        events = events_of(envelope_decoder.decode(body))
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return []  # a poison task copied here by dead-lettering; the DLQ has it
    reason = headers.get("x-first-death-reason")
    if reason is None:
        return events
    # The broker gave up on these tasks (its delivery limit, most often
    # because one kept crashing its worker): they failed for good. Streams
    # keep the x-first-death-* headers of a dead letter, not x-death.
    reason_text = _text(reason)
    if reason_text == "expired" and RETRY_QUEUE.search(_text(headers.get("x-first-death-queue"))):
        # Its first death was the end of a retry's wait in a delay queue
        # (service/broker.py); off the work queue, only the delivery limit
        # dead-letters a task that decodes.
        reason_text = "delivery_limit"
    error = f"task was set aside by the broker ({reason_text})"
    return [
        Failed(event.prediction_id, event.input, error, event.at_s)
        if isinstance(event, Accepted)
        else event
        for event in events
    ]


def _text(header: object) -> str:
    return header.decode() if isinstance(header, bytes) else str(header or "")


async def _first_of(*waits: Callable[[], Awaitable[object]]) -> None:
    """Return as soon as any of the waits returns."""
    async with anyio.create_task_group() as group:

        async def wait_then_stop(wait: Callable[[], Awaitable[object]]) -> None:
            await wait()
            group.cancel_scope.cancel()

        for wait in waits:
            group.start_soon(wait_then_stop, wait)


async def _quietly(awaitable: Any) -> None:
    try:
        await awaitable
    except aio_pika.exceptions.CONNECTION_EXCEPTIONS as exc:
        log.debug("ignored while settling the event stream: %r", exc)
