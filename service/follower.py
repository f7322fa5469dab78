"""Follows the broker's event stream into this replica's results mapping.

On start it replays the retained history from the first offset, then
keeps following. To know when the replay has caught up it appends a marker
event of its own and waits to read it back: everything before the marker
is then in the mapping. After a lost connection it resumes from the next
offset it has not read, and catches up again the same way.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import aio_pika.abc
import anyio
import anyio.abc
import msgspec

from service.broker import EVENT_KEY, Broker, BrokerUnavailable
from service.schemas import Accepted, Event, Failed, Marker, events_of, message_decoder
from service.store import ResultStore

log = logging.getLogger(__name__)

MessageT = aio_pika.abc.AbstractIncomingMessage


class EventFollower:
    def __init__(self, broker: Broker, store: ResultStore) -> None:
        self._broker = broker
        self._store = store
        self._next_offset: int | str = "first"
        self._marker_id = ""
        self._unacked = 0
        self.caught_up = asyncio.Event()

    async def run(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        """Follow forever; `started` once the first replay has caught up."""
        started = False
        while True:
            await self._broker.wait_up()
            try:
                await self._follow_until_disconnected(task_status if not started else None)
                started = True
            except (BrokerUnavailable, *aio_pika.exceptions.CONNECTION_EXCEPTIONS) as exc:
                log.warning("event stream interrupted (%r); resuming", exc)
                await anyio.sleep(self._broker.settings.broker_reconnect_interval_s)
            finally:
                self.caught_up.clear()

    async def _follow_until_disconnected(
        self, task_status: anyio.abc.TaskStatus[None] | None
    ) -> None:
        queue = self._broker.events_queue
        # A channel error closes the event channel alone; aio-pika reopens
        # it, but without this consumer, so it counts as a disconnection.
        channel_closed = asyncio.Event()

        def on_channel_closed(*_: Any) -> None:
            channel_closed.set()

        channel = self._broker.events_channel
        channel.close_callbacks.add(on_channel_closed)
        # Not a robust consumer: aio-pika would restore it from the first
        # offset again; this loop resumes it from where it stopped instead.
        consumer_tag = await queue.consume(
            self._on_message, arguments={"x-stream-offset": self._next_offset}, robust=False
        )
        try:
            await self._catch_up()
            if task_status is not None:
                task_status.started()
            await _first_of(self._broker.wait_down, channel_closed.wait)
        finally:
            channel.close_callbacks.discard(on_channel_closed)
            with anyio.CancelScope(shield=True), anyio.move_on_after(1):
                await _quietly(queue.cancel(consumer_tag))

    async def _catch_up(self) -> None:
        self._marker_id = uuid.uuid4().hex
        started_s = time.perf_counter()
        await self._broker.publish(Marker(self._marker_id, time.time()), EVENT_KEY)
        await self.caught_up.wait()
        log.info(
            "event stream caught up in %.2f s (%d predictions known)",
            time.perf_counter() - started_s,
            len(self._store),
        )

    async def _on_message(self, message: MessageT) -> None:
        offset = (message.headers or {}).get("x-stream-offset")
        if isinstance(offset, int):
            self._next_offset = offset + 1
        events = _decode(message)
        for event in events:
            if isinstance(event, Marker) and event.marker_id == self._marker_id:
                self.caught_up.set()
        await self._store.apply_many(events)
        await self._ack(message)

    async def _ack(self, message: MessageT) -> None:
        # Acking in batches (multiple=True) saves a frame per event; any
        # batch smaller than the prefetch keeps deliveries flowing.
        self._unacked += 1
        if self._unacked >= self._ack_batch:
            self._unacked = 0
            await _quietly(message.ack(multiple=True))

    @property
    def _ack_batch(self) -> int:
        return max(1, self._broker.settings.stream_prefetch // 4)


def _decode(message: MessageT) -> list[Event]:
    try:
        events = events_of(message_decoder.decode(message.body))
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return []  # a poison task copied here by dead-lettering; the DLQ has it
    reason = (message.headers or {}).get("x-first-death-reason")
    if reason is None:
        return events
    # The broker gave up on these tasks (its delivery limit, most often
    # because one kept crashing its worker): they failed for good. Streams
    # keep the x-first-death-* headers of a dead letter, not x-death.
    reason_text = reason.decode() if isinstance(reason, bytes) else str(reason)
    error = f"task was set aside by the broker ({reason_text})"
    return [
        Failed(event.prediction_id, event.input, error, event.at_s)
        if isinstance(event, Accepted)
        else event
        for event in events
    ]


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
