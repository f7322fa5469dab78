"""Writing the log's rows to disk behind the event loop, in group commits.

The follower hands over the rows each stream message brings, with that
message's offset. One thread writes them, in commits at most every
COMMIT_EVERY_S (sooner when half the buffer is full), each with the
offset of the last message among its rows, so a commit never holds part
of a message. Nothing waits for a commit but eviction (memory answers for
every row until then); a commit per stream message cost a fresh replica
a fifth of its replay speed, in CPU taken from the event loop. A commit
is numbered (`seq`); the memory tier evicts an entry only once the commit
holding it is done (`committed`).

While the follower catches up (the replica is not ready yet), rows are
committed only when the memory budget needs the room: writing them costs
~15 us each of a core the replay needs, and the replica serves nothing
before it has caught up. Once caught up, what waits is written at once.
A view that fits the budget so replays as fast as it would with no disk;
a larger one, at the disk's pace.

Rows waiting count in the memory budget (service/store.py). When the
budget is full of them and of entries not yet written (a slow disk,
large inputs), `room()` holds the follower back until a commit frees
some, which holds back the broker's deliveries: memory stays bounded
whatever the stream brings.
"""

from __future__ import annotations

import asyncio
import logging
import math
import sys
import time
from collections.abc import Callable, Sequence
from typing import ParamSpec, TypeVar

import anyio
import anyio.to_thread
import msgspec

from service.disk import DiskStore, Progress, Row

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

RETRY_S = 1.0  # after a failed commit (a full disk, most often)
COMMIT_EVERY_S = 0.05


class WriteBehind:
    def __init__(
        self,
        commit_now_bytes: int,
        sweep_interval_s: float,
        on_committed: Callable[[int], None],
        on_swept: Callable[[int], None],
    ) -> None:
        self._commit_now_bytes = commit_now_bytes
        self._sweep_interval_s = sweep_interval_s
        self._on_committed = on_committed
        self._on_swept = on_swept
        self._disk: DiskStore | None = None
        self._thread = anyio.CapacityLimiter(1)  # one writer: SQLite has one
        self.seq = 1  # the commit that rows added now go into
        self.committed = 0
        # By id: a prediction accepted and finished between two commits is
        # written once, in its last state (half the rows of a replay).
        self._rows: dict[str, Row] = {}
        # Runs begun for rows already committed (else folded into the row).
        self._progress: dict[str, Progress] = {}
        self._offset: int | None = None
        self._body = b""
        self._bytes = 0
        self._flushing: asyncio.Task[None] | None = None
        self._committed_event = asyncio.Event()
        self._urgent = asyncio.Event()  # commit now: the buffer fills, or someone drains
        self._held = False  # only urgent commits (the follower catches up)
        self._next_sweep_s = 0.0
        self.error: str | None = None  # why the last commit failed, until one succeeds

    def attach(self, disk: DiskStore, sweep_before_s: Callable[[], float]) -> None:
        self._disk = disk
        self._sweep_before_s = sweep_before_s

    @property
    def buffered_bytes(self) -> int:
        return self._bytes

    def add(
        self, rows: list[Row], offset: int | None, body: bytes, progress: Sequence[Progress] = ()
    ) -> None:
        """Queue rows (and the message position they bring the disk to) for the next commit."""
        queued = self._rows
        for row in rows:
            replaced = queued.get(row.prediction_id)
            if replaced is not None:
                self._bytes -= _size(replaced)
            queued[row.prediction_id] = row
            self._bytes += _size(row)
            if row.finished:
                self._progress.pop(row.prediction_id, None)  # the outcome's row holds its own
        for begun in progress:
            self._fold(begun)
        if offset is not None:
            self._offset, self._body = offset, body
        if self._bytes > self._commit_now_bytes and not self._held:
            self._urgent.set()
        if self._flushing is None and self._disk is not None:
            self._flushing = asyncio.get_running_loop().create_task(self._flush_all())

    def _fold(self, begun: Progress) -> None:
        row = self._rows.get(begun.prediction_id)
        if row is None:
            self._progress[begun.prediction_id] = begun
        elif not row.finished:
            self._rows[begun.prediction_id] = msgspec.structs.replace(
                row, started_at_s=begun.started_at_s, attempts=begun.attempts
            )

    def hold(self) -> None:
        """Commit only what memory needs to free, until `release`."""
        self._held = True

    def release(self) -> None:
        self._held = False
        self._urgent.set()

    async def room(self, fits: Callable[[], bool]) -> None:
        """Return once `fits()`, committing at once while it does not."""
        while not fits() and self._flushing is not None:
            # The view outgrew memory: from now on write as rows come, so
            # commits overlap the reading instead of stalling it.
            self._held = False
            self._urgent.set()
            self._committed_event.clear()
            await self._committed_event.wait()

    async def drain(self) -> None:
        """Return once everything added so far is committed."""
        while self._flushing is not None:
            self._urgent.set()
            await asyncio.shield(self._flushing)

    async def run(self, function: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run `function` in the writer's thread, between two commits."""

        def call() -> T:
            return function(*args, **kwargs)

        return await anyio.to_thread.run_sync(call, limiter=self._thread)

    async def discard(self) -> None:
        """Drop what waits (the state is being rebuilt), after the commit in progress."""
        self._rows, self._offset, self._body, self._bytes = {}, None, b"", 0
        self._progress = {}
        await self.drain()

    async def _flush_all(self) -> None:
        try:
            while self._rows or self._progress or self._offset is not None:
                with anyio.move_on_after(math.inf if self._held else COMMIT_EVERY_S):
                    await self._urgent.wait()
                self._urgent.clear()
                await self._commit_next()
                await self._sweep_if_due()
        finally:
            self._flushing = None
            self._committed_event.set()

    async def _commit_next(self) -> None:
        assert self._disk is not None
        rows, offset, body, size = self._rows, self._offset, self._body, self._bytes
        progress = self._progress
        self._rows, self._offset, self._body, self._progress = {}, None, b"", {}
        seq, self.seq = self.seq, self.seq + 1
        try:
            with anyio.CancelScope(shield=True):  # a commit half-known is worse than a late one
                await self.run(self._disk.write, rows.values(), offset, body, progress.values())
        except Exception as exc:
            self._put_back(rows, offset, body)
            for begun in progress.values():
                if begun.prediction_id not in self._progress:
                    self._fold(begun)
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

    def _put_back(self, rows: dict[str, Row], offset: int | None, body: bytes) -> None:
        # Rows and a position that arrived meanwhile are newer: they win.
        self._rows = rows | self._rows
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


# A queued Row struct and its tuple of parameters when written.
ROW_OVERHEAD_BYTES = 200


def _size(row: Row) -> int:
    # What a queued row holds beyond what memory already counts: a
    # finished row shares its strings with its entry in the memory tier
    # (not evicted before written); a pending one holds its input alone.
    return ROW_OVERHEAD_BYTES + (0 if row.finished else sys.getsizeof(row.input))
