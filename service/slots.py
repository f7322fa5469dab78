"""The worker's model slots: MODEL_CONCURRENCY of them, handed out in arrival order."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager


class SlotsClosed(Exception):
    """The worker is stopping: a task still waiting for a slot is not started."""


class ModelSlots:
    """How many tasks of the worker run, and the line of those waiting for a slot.

    A freed slot passes straight to the first in line, so a task that
    arrived later never overtakes one that waits. `on_change` runs after
    every change, so the intake can ask the broker for more, or for less.
    """

    def __init__(self, count: int) -> None:
        self.count = count
        self.running = 0
        self.reserved = 0  # tasks delivered and not yet running, in line, or done
        self._line: deque[asyncio.Future[None]] = deque()
        self._closed = False
        self.on_change: Callable[[], None] = lambda: None

    @property
    def waiting(self) -> int:
        return len(self._line)

    @property
    def free(self) -> int:
        """Slots nobody runs in, waits for, or is about to ask for."""
        return self.count - self.running - len(self._line) - self.reserved

    def reserve(self, tasks: int) -> None:
        """Count tasks just delivered, before they ask for a slot (or end without one)."""
        self.reserved += tasks
        self.on_change()

    def unreserve(self) -> None:
        """A reserved task ends without a run (its outcome was known, or it is put back)."""
        self.reserved -= 1
        self.on_change()

    @asynccontextmanager
    async def held(self) -> AsyncIterator[None]:
        """Hold a slot for the block, for a reserved task. Raises SlotsClosed if stopping."""
        self.reserved -= 1  # from here on, counted as running or in line
        await self._acquire()
        try:
            yield
        finally:
            self._release()

    def close(self) -> None:
        """Stop handing out slots: whoever waits gets SlotsClosed."""
        self._closed = True
        while self._line:
            waiter = self._line.popleft()
            if not waiter.done():
                waiter.set_exception(SlotsClosed())
        self.on_change()

    async def _acquire(self) -> None:
        if self._closed:
            raise SlotsClosed
        if self.running < self.count and not self._line:
            self.running += 1
            self.on_change()
            return
        waiter = asyncio.get_running_loop().create_future()
        self._line.append(waiter)
        self.on_change()
        try:
            await waiter  # handed over by _release, `running` already counts it
        except asyncio.CancelledError:
            if waiter in self._line:
                self._line.remove(waiter)
            elif waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self._release()  # handed over just as it was cancelled
            self.on_change()
            raise

    def _release(self) -> None:
        while self._line:
            waiter = self._line.popleft()
            if not waiter.done():
                waiter.set_result(None)
                self.on_change()
                return
        self.running -= 1
        self.on_change()
