"""The results mapping: the state built from prediction events.

Every change goes through `apply(event)`, whether the event was made here
(a POST, a finished task) or read back from the broker's event stream, so
a replica that replays the stream rebuilds exactly this mapping. Applying
is idempotent: the first outcome recorded for a prediction wins, and no
event turns a finished prediction back into a pending one.

Entries expire `ttl_s` after their last change. The dict is kept in order
of last change, so eviction only ever looks at its head.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence

import anyio
import msgspec

from service.schemas import Accepted, Done, Event, Failed, Marker


class Prediction(msgspec.Struct, gc=False):
    """One stored prediction. `gc=False` and few fields keep 100k of them small."""

    input: str
    updated_at_s: float
    result: str | None = None
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.result is not None or self.error is not None


class ResultStore:
    def __init__(self, ttl_s: float, clock: Callable[[], float] = time.time) -> None:
        self._ttl_s = ttl_s
        self._clock = clock
        self._lock = asyncio.Lock()
        self._entries: dict[str, Prediction] = {}
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._pending = 0
        self._closed = False

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def pending(self) -> int:
        """Accepted predictions with no outcome yet."""
        return self._pending

    @property
    def waiting(self) -> int:
        return sum(len(futures) for futures in self._waiters.values())

    async def apply(self, event: Event) -> bool:
        """Record an event; True if it changed anything."""
        return await self.apply_many((event,)) > 0

    async def apply_many(self, events: Sequence[Event]) -> int:
        """Record events in order, under one lock; how many changed anything."""
        fresh: list[Accepted | Done | Failed] = [
            e for e in events if not isinstance(e, Marker) and not self._expired(e.at_s)
        ]
        if not fresh:
            return 0
        changed: list[Accepted | Done | Failed] = []
        async with self._lock:
            for event in fresh:
                if self._apply(event):
                    changed.append(event)
            self._evict_expired()
        for event in changed:
            if not isinstance(event, Accepted):
                self._wake(event.prediction_id)
        return len(changed)

    def get(self, prediction_id: str) -> Prediction | None:
        # Writers hold the lock; a read needs none: it never awaits, so on
        # one event loop no write can interleave with it. (This is the
        # hottest call of a GET.)
        entry = self._entries.get(prediction_id)
        if entry is not None and self._expired(entry.updated_at_s):
            return None
        return entry

    async def forget_pending(self, prediction_id: str) -> None:
        """Drop an accepted prediction whose task never reached the broker."""
        async with self._lock:
            entry = self._entries.get(prediction_id)
            if entry is not None and not entry.finished:
                del self._entries[prediction_id]
                self._pending -= 1

    async def wait_finished(self, prediction_id: str, timeout_s: float) -> Prediction | None:
        """The entry once finished, or as it stands after `timeout_s`.

        The waiter is a bare future resolved by `apply`: nothing polls, so a
        thousand waiting requests cost a thousand futures and no CPU.
        """
        entry = self.get(prediction_id)
        if entry is None or entry.finished or self._closed or timeout_s <= 0:
            return entry
        future = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(prediction_id, []).append(future)
        try:
            with anyio.move_on_after(timeout_s):
                await future
        finally:
            self._discard_waiter(prediction_id, future)
        return self.get(prediction_id)

    def release_waiters(self) -> None:
        """Answer every long poll now (shutdown must not wait for them)."""
        self._closed = True
        for prediction_id in list(self._waiters):
            self._wake(prediction_id)

    def _apply(self, event: Accepted | Done | Failed) -> bool:
        entry = self._entries.get(event.prediction_id)
        if isinstance(event, Accepted):
            if entry is not None:
                return False
            self._entries[event.prediction_id] = Prediction(event.input, event.at_s)
            self._pending += 1
            return True
        if entry is not None:
            if entry.finished:
                return False
            self._pending -= 1
            # Re-insert so the dict stays ordered by last change.
            del self._entries[event.prediction_id]
        self._entries[event.prediction_id] = _finished(event)
        return True

    def _evict_expired(self) -> None:
        entries = self._entries
        while entries:
            oldest_id = next(iter(entries))
            oldest = entries[oldest_id]
            if not self._expired(oldest.updated_at_s):
                return
            del entries[oldest_id]
            self._pending -= not oldest.finished

    def _expired(self, at_s: float) -> bool:
        return at_s < self._clock() - self._ttl_s

    def _wake(self, prediction_id: str) -> None:
        for future in self._waiters.pop(prediction_id, ()):
            if not future.done():
                future.set_result(None)

    def _discard_waiter(self, prediction_id: str, future: asyncio.Future[None]) -> None:
        futures = self._waiters.get(prediction_id)
        if futures is None:
            return
        if future in futures:
            futures.remove(future)
        if not futures:
            del self._waiters[prediction_id]


def _finished(event: Done | Failed) -> Prediction:
    if isinstance(event, Done):
        return Prediction(event.input, event.at_s, result=event.result)
    return Prediction(event.input, event.at_s, error=event.error)
