"""Writing the log's rows to disk behind the event loop, in group commits.

The follower hands over the rows each stream message brings, with that
message's offset. One thread writes them: while a commit runs, the next
rows gather, and they go in the next commit with the offset of the last
message among them, so a commit never holds part of a message. A commit
is numbered (`seq`); the memory tier evicts an entry only once the commit
holding it is done (`committed`).

When more than `max_buffered_bytes` wait (a slow disk, large inputs),
`room()` holds the follower back, which holds back the broker's
deliveries: memory stays bounded whatever the stream brings.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import anyio
import anyio.to_thread

from service.disk import DiskStore, Row

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

RETRY_S = 1.0  # after a failed commit (a full disk, most often)


class WriteBehind:
    def __init__(
        self,
        max_buffered_bytes: int,
        sweep_interval_s: float,
        on_committed: Callable[[int], None],
        on_swept: Callable[[int], None],
    ) -> None:
        self._max_buffered_bytes = max_buffered_bytes
        self._sweep_interval_s = sweep_interval_s
        self._on_committed = on_committed
        self._on_swept = on_swept
        self._disk: DiskStore | None = None
        self._thread = anyio.CapacityLimiter(1)  # one writer: SQLite has one
        self.seq = 1  # the commit that rows added now go into
        self.committed = 0
        self._rows: list[Row] = []
        self._offset: int | None = None
        self._body = b""
        self._bytes = 0
        self._flushing: asyncio.Task[None] | None = None
        self._committed_event = asyncio.Event()
        self._next_sweep_s = 0.0
        self.error: str | None = None  # why the last commit failed, until one succeeds

    def attach(self, disk: DiskStore, sweep_before_s: Callable[[], float]) -> None:
        self._disk = disk
        self._sweep_before_s = sweep_before_s

    @property
    def buffered_bytes(self) -> int:
        return self._bytes

    def add(self, rows: list[Row], offset: int | None, body: bytes, size: int) -> None:
        """Queue rows (and the message position they bring the disk to) for the next commit."""
        self._rows += rows
        self._bytes += size
        if offset is not None:
            self._offset, self._body = offset, body
        if self._flushing is None and self._disk is not None:
            # Started now, run at the loop's next turn: everything added in
            # this turn goes in the same commit.
            self._flushing = asyncio.get_running_loop().create_task(self._flush_all())

    async def room(self) -> None:
        """Return once the rows waiting for the disk are within their budget."""
        while self._bytes > self._max_buffered_bytes and self._flushing is not None:
            self._committed_event.clear()
            await self._committed_event.wait()

    async def drain(self) -> None:
        """Return once everything added so far is committed."""
        while self._flushing is not None:
            await asyncio.shield(self._flushing)

    async def run(self, function: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run `function` in the writer's thread, between two commits."""

        def call() -> T:
            return function(*args, **kwargs)

        return await anyio.to_thread.run_sync(call, limiter=self._thread)

    async def discard(self) -> None:
        """Drop what waits (the state is being rebuilt), after the commit in progress."""
        self._rows, self._offset, self._body, self._bytes = [], None, b"", 0
        await self.drain()

    async def _flush_all(self) -> None:
        try:
            while self._rows or self._offset is not None:
                await self._commit_next()
                await self._sweep_if_due()
        finally:
            self._flushing = None
            self._committed_event.set()

    async def _commit_next(self) -> None:
        assert self._disk is not None
        rows, offset, body, size = self._rows, self._offset, self._body, self._bytes
        self._rows, self._offset, self._body = [], None, b""
        seq, self.seq = self.seq, self.seq + 1
        try:
            with anyio.CancelScope(shield=True):  # a commit half-known is worse than a late one
                await self.run(self._disk.write, rows, offset, body)
        except Exception as exc:
            self._put_back(rows, offset, body)
            self._failed(exc)
            await anyio.sleep(RETRY_S)
            return
        if self.error is not None:
            log.warning("the state store writes again")
            self.error = None
        self._bytes -= size
        self.committed = seq
        self._on_committed(seq)
        self._committed_event.set()

    def _put_back(self, rows: list[Row], offset: int | None, body: bytes) -> None:
        # Older rows first; a newer position, if one arrived meanwhile, wins.
        self._rows = rows + self._rows
        if self._offset is None:
            self._offset, self._body = offset, body

    def _failed(self, exc: Exception) -> None:
        reason = f"could not write the state store: {exc}"
        if self.error is None:
            log.error("%s; retrying every %.0f s", reason, RETRY_S)
        self.error = reason

    async def _sweep_if_due(self) -> None:
        now_s = time.monotonic()
        if now_s < self._next_sweep_s or self._disk is None:
            return
        self._next_sweep_s = now_s + self._sweep_interval_s
        try:
            deleted = await self.run(self._disk.delete_expired, self._sweep_before_s())
        except Exception as exc:
            log.warning("could not delete expired predictions from disk: %s", exc)
            return
        if deleted:
            self._on_swept(deleted)
