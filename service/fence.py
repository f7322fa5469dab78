"""Fences: has this replica read the event stream up to now?

Before a replica says "not found", it makes sure that nothing it has not
read yet could say otherwise: it appends a marker to the stream and waits
to read it back. Another replica's 202 was sent after the broker had its
task on the stream, so before the marker; once the marker is read, so is
that task.

Lookups that ask while no marker is on its way share the next one; while
one is on its way, newcomers gather for the one after it (a marker sent
before a lookup arrived proves nothing about it). So a flood of unknown
ids costs one broker round trip per batch, not one each.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable

import anyio

from service.broker import BrokerUnavailable


class Fences:
    def __init__(self, publish_marker: Callable[[str], Awaitable[None]], timeout_s: float) -> None:
        self._publish_marker = publish_marker
        self._timeout_s = timeout_s
        self._gathering: asyncio.Future[None] | None = None
        self._in_flight = False
        self._awaited: dict[str, asyncio.Future[None]] = {}
        self._sending: set[asyncio.Task[None]] = set()
        self.sent = 0  # markers, for /metrics and the tests

    async def wait(self) -> None:
        """Return once the stream is read up to this call; BrokerUnavailable if it cannot be."""
        if self._gathering is None:
            self._gathering = asyncio.get_running_loop().create_future()
            if not self._in_flight:
                # At the loop's next turn: this turn's lookups share the marker.
                asyncio.get_running_loop().call_soon(self._send)
        # Shielded: one lookup giving up must not fail its batch-mates.
        await asyncio.shield(self._gathering)

    def seen(self, marker_id: str) -> None:
        """The follower read marker `marker_id` (any replica's: only ours are awaited)."""
        future = self._awaited.pop(marker_id, None)
        if future is not None and not future.done():
            future.set_result(None)

    def _send(self) -> None:
        if self._in_flight or self._gathering is None:
            return
        batch, self._gathering = self._gathering, None
        self._in_flight = True
        task = asyncio.get_running_loop().create_task(self._round_trip(batch))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _round_trip(self, batch: asyncio.Future[None]) -> None:
        marker_id = uuid.uuid4().hex
        self._awaited[marker_id] = batch
        try:
            with anyio.fail_after(self._timeout_s):
                await self._publish_marker(marker_id)
                self.sent += 1
                await asyncio.shield(batch)
        except BaseException as exc:
            if not batch.done():
                batch.set_exception(_as_unavailable(exc))
                batch.exception()  # retrieved: a batch whose lookups gave up is not logged
            if not isinstance(exc, Exception):
                raise
        finally:
            self._awaited.pop(marker_id, None)
            self._in_flight = False
            if self._gathering is not None:
                asyncio.get_running_loop().call_soon(self._send)


def _as_unavailable(exc: BaseException) -> BrokerUnavailable:
    if isinstance(exc, BrokerUnavailable):
        return exc
    if isinstance(exc, TimeoutError):
        return BrokerUnavailable("the event stream was not read back in time")
    return BrokerUnavailable(f"could not check the event stream: {exc!r}")
