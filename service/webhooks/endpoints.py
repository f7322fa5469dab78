"""Turns per endpoint: a slow receiver holds only its own share of the deliveries.

At most `per_endpoint` tries run to one endpoint (scheme, host and port)
at once. A delivery that finds its endpoint's turns all taken waits here
for one, as long as few others wait (at most `per_endpoint` for the same
endpoint, `max_waiting` in all); past that it is told to go back to the
broker for a while, so that waiting deliveries never hold more than a
bounded share of WEBHOOK_CONCURRENCY while other receivers are owed.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from urllib.parse import urlsplit


def endpoint_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


@dataclass
class _Endpoint:
    running: int = 0
    waiting: collections.deque[asyncio.Future[None]] = field(default_factory=collections.deque)


class Endpoints:
    def __init__(self, per_endpoint: int, max_waiting: int) -> None:
        self._per_endpoint = per_endpoint
        self._max_waiting = max_waiting
        self._endpoints: dict[str, _Endpoint] = {}
        self.waiting = 0

    @asynccontextmanager
    async def turn(self, url: str) -> AsyncIterator[bool]:
        """Yield True holding one of the endpoint's turns, or False: come back later."""
        name = endpoint_of(url)
        endpoint = self._endpoints.setdefault(name, _Endpoint())
        if endpoint.running < self._per_endpoint:
            endpoint.running += 1
        elif len(endpoint.waiting) < self._per_endpoint and self.waiting < self._max_waiting:
            await self._wait(name, endpoint)
        else:
            self._forget_if_idle(name, endpoint)
            yield False
            return
        try:
            yield True
        finally:
            self._release(name, endpoint)

    async def _wait(self, name: str, endpoint: _Endpoint) -> None:
        turn = asyncio.get_running_loop().create_future()
        endpoint.waiting.append(turn)
        self.waiting += 1
        try:
            await turn  # handed over by _release, `running` unchanged
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():
                self._release(name, endpoint)  # handed a turn, then cancelled: pass it on
            else:
                endpoint.waiting.remove(turn)
            raise
        finally:
            self.waiting -= 1

    def _release(self, name: str, endpoint: _Endpoint) -> None:
        while endpoint.waiting:
            turn = endpoint.waiting.popleft()
            if not turn.done():
                turn.set_result(None)
                return
        endpoint.running -= 1
        self._forget_if_idle(name, endpoint)

    def _forget_if_idle(self, name: str, endpoint: _Endpoint) -> None:
        if not endpoint.running and not endpoint.waiting:
            self._endpoints.pop(name, None)
