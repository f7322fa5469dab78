"""Coalescing publisher: events published in the same loop turn share a message.

Under load, uvicorn hands the app many requests per turn of the event
loop, and a worker finishes many tasks per turn. Each caller of
`Outbox.publish` still waits for its own broker confirm, but everything
queued before the loop comes round again goes out as one persistent
message (`schemas.batched`): one publish, one confirm, one delivery to
each reader, instead of one per event. A lone event is sent as itself,
so nothing waits for company and an idle service adds no latency.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from service.broker import Broker, BrokerUnavailable
from service.schemas import Event, batched

# A batch is also closed at this size, far below RabbitMQ's message limit.
MAX_BATCH_BYTES = 1024 * 1024


class Outbox:
    def __init__(self, broker: Broker, routing_key: str) -> None:
        self._broker = broker
        self._routing_key = routing_key
        self._max_events = broker.settings.publish_batch_max
        self._events: list[Event] = []
        self._bytes = 0
        self._confirmed: asyncio.Future[None] | None = None
        self._flushing: set[asyncio.Task[None]] = set()

    async def publish(self, events: Sequence[Event]) -> None:
        """Return once the broker confirmed `events`; BrokerUnavailable if it won't."""
        if not self._broker.is_up:
            raise BrokerUnavailable("not connected to the broker")
        for batch in self._enqueue(events):
            # Shielded: a cancelled caller must not cancel its batch-mates' confirm.
            await asyncio.shield(batch)

    def post(self, events: Sequence[Event]) -> bool:
        """Send `events` with the next batch, without waiting for the confirm.

        For facts worth telling but not worth a wait (a run beginning):
        False, and nothing sent, while the broker is down; a batch the
        broker does not confirm is dropped.
        """
        if not self._broker.is_up:
            return False
        self._enqueue(events)
        return True

    def _enqueue(self, events: Sequence[Event]) -> list[asyncio.Future[None]]:
        batches: list[asyncio.Future[None]] = []
        for event in events:
            size = _size(event)
            if self._events and (
                len(self._events) >= self._max_events or self._bytes + size > MAX_BATCH_BYTES
            ):
                self._flush()
            self._events.append(event)
            self._bytes += size
            batch = self._batch_future()
            if not batches or batches[-1] is not batch:
                batches.append(batch)
        return batches

    def _batch_future(self) -> asyncio.Future[None]:
        if self._confirmed is None:
            loop = asyncio.get_running_loop()
            self._confirmed = loop.create_future()
            # Runs after every callback already ready: the callers of this turn.
            loop.call_soon(self._flush)
        return self._confirmed

    def _flush(self) -> None:
        if self._confirmed is None:
            return  # flushed early by a full batch
        events, confirmed = self._events, self._confirmed
        self._events, self._bytes, self._confirmed = [], 0, None
        task = asyncio.get_running_loop().create_task(self._send(events, confirmed))
        self._flushing.add(task)
        task.add_done_callback(self._flushing.discard)

    async def _send(self, events: list[Event], confirmed: asyncio.Future[None]) -> None:
        try:
            await self._broker.publish(batched(events), self._routing_key)
        except BaseException as exc:
            if not confirmed.done():
                confirmed.set_exception(_as_unavailable(exc))
            # Retrieved here, so a batch nobody awaits any more is not logged.
            confirmed.exception()
            if not isinstance(exc, Exception):
                raise
        else:
            if not confirmed.done():
                confirmed.set_result(None)


def _size(event: Event) -> int:
    # The input dominates an event's size; the rest is ~150 bytes of JSON.
    text = getattr(event, "input", "")
    return len(text) * 4 + 200 if isinstance(text, str) else 200


def _as_unavailable(exc: BaseException) -> BrokerUnavailable:
    if isinstance(exc, BrokerUnavailable):
        return exc
    return BrokerUnavailable(f"could not publish: {exc!r}")
