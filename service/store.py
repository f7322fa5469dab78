"""The results view: what the event stream says about each prediction.

Only events read back from the stream change it (`apply_logged`), in the
stream's order, so every replica ends with the same answer for every id:
the first outcome on the stream, whoever computed it. The one exception
is the stub a replica notes for a task it has just accepted, so that its
own client's first GET says "still processing"; that stub is memory only
and is replaced by the stream's own "accepted" event when it comes back.

Three places hold a prediction:

- pending ones, as a stub of a few dozen bytes (the input stays on disk);
- finished ones recently written or read, in memory within
  RESULTS_MEMORY_MAX_BYTES (service/hot.py);
- every one, on disk (service/disk.py), written behind (service/writeback.py).

Entries expire RESULT_TTL_S after their last change.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

import anyio
import anyio.to_thread
import msgspec

from service.disk import (
    Corrupt,
    DiskStore,
    Identity,
    LargeInput,
    PendingRow,
    Position,
    Progress,
    Row,
)
from service.hot import HotCache, Prediction
from service.line import Line
from service.schemas import Accepted, Canceled, Done, Event, Marker, Outcome, Started
from service.writeback import WriteBehind

__all__ = ["Pending", "Prediction", "ResultStore", "StateUnavailable"]

log = logging.getLogger(__name__)

# A pending stub: its id string, the struct, its float, an OrderedDict slot,
# and its place in the line of queued ones (service/line.py): 319 B
# measured with tracemalloc (232 B before the lifecycle).
PENDING_ENTRY_BYTES = 320
# Commit at once, without waiting for the next tick, past this share of
# the budget in rows waiting for the disk.
COMMIT_NOW_SHARE = 8
SWEEP_INTERVAL_MAX_S = 60.0


class Pending(msgspec.Struct, gc=False):
    """An accepted prediction with no outcome yet."""

    at_s: float
    logged: bool = True  # False: noted at accept time, not read back from the stream yet
    started_at_s: float = 0.0  # when its first run began; 0: queued
    attempts: int = 0
    # A keyed submit's (schemas.Accepted): the winning task, and its request.
    nonce: str = ""
    fingerprint: str = ""

    @property
    def token(self) -> str:
        return f"{self.nonce} {self.fingerprint}" if self.nonce else ""

    @classmethod
    def of_row(cls, row: PendingRow) -> Pending:
        _, at_s, started_at_s, attempts, token = row
        nonce, _, fingerprint = token.partition(" ")
        return cls(at_s, True, started_at_s, attempts, nonce, fingerprint)


class StateUnavailable(Exception):
    """The local state cannot answer right now (damaged, being rebuilt)."""


Found = Prediction | Pending | None


class ResultStore:
    def __init__(
        self, ttl_s: float, memory_max_bytes: int, clock: Callable[[], float] = time.time
    ) -> None:
        self._ttl_s = ttl_s
        self._clock = clock
        self._lock = asyncio.Lock()
        self._hot = HotCache(memory_max_bytes)
        # Oldest first, for expiry; an OrderedDict for the same reason as
        # the memory tier's (service/hot.py): its head is taken often.
        self._pending: OrderedDict[str, Pending] = OrderedDict()
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}
        # The pending ones no run has begun for, in the stream's order.
        self._line = Line()
        # Told the id of each prediction canceled (the worker stops its run).
        self.on_canceled: list[Callable[[str], object]] = []
        self._writes = WriteBehind(
            max(memory_max_bytes // COMMIT_NOW_SHARE, 1),
            min(SWEEP_INTERVAL_MAX_S, max(ttl_s / 10, 1.0)),
            on_committed=self._evict,
            on_swept=self._count_swept,
        )
        self._disk: DiskStore | None = None
        self._large_reads = anyio.CapacityLimiter(1)
        self._closed = False
        # False while what memory and disk hold may not be the stream's: a
        # state resumed from STATE_DIR until the stream shows it still has
        # the message the state ends at (a stream deleted and declared
        # anew would make it another deployment's), and during a reset.
        self._serving = True
        self._resets = 0  # a lookup that spans one must not bring old rows back
        self.disk_entries = 0
        self.cold_reads = 0
        # Set when a read finds the disk damaged; the follower rebuilds.
        self.damaged = asyncio.Event()

    # -- lifecycle --------------------------------------------------------------

    async def open(self, path: Path, identity: Identity) -> Position | None:
        """Open the disk tier, load its pending stubs; the stream position it reflects."""
        disk = await anyio.to_thread.run_sync(DiskStore.open, path, identity)
        if disk.rebuilt_because:
            log.warning(
                "the state in %s was not usable (%s); rebuilding it from the event stream",
                path.parent,
                disk.rebuilt_because,
            )
        pending, count, checkpoint = await anyio.to_thread.run_sync(
            _load, disk, self._clock() - self._ttl_s
        )
        async with self._lock:
            loaded = OrderedDict((row[0], Pending.of_row(row)) for row in pending)
            loaded.update(self._pending)  # keep stubs noted meanwhile
            self._pending = loaded
            self._line.clear()
            for prediction_id, stub in loaded.items():
                if stub.logged and not stub.started_at_s:
                    self._line.join(prediction_id)
            self._disk = disk
            self.disk_entries = count
            self._writes.attach(disk, lambda: self._clock() - self._ttl_s)
            self._serving = checkpoint is None
        return checkpoint

    def verified(self) -> None:
        """The stream still holds the message the resumed state ends at: serve it."""
        self._serving = True

    async def reset(self) -> None:
        """Forget everything the stream said: it is about to be read from its start."""
        self._serving = False
        self._resets += 1
        async with self._lock:
            self._hot.clear()
            self._pending = OrderedDict((k, v) for k, v in self._pending.items() if not v.logged)
            self._line.clear()
        await self._writes.discard()
        if self._disk is not None:
            await self._writes.run(self._disk.wipe)
        self.disk_entries = 0
        self.damaged.clear()
        self._serving = True  # empty: what it learns from now on is the stream's

    def catching_up(self, catching_up: bool) -> None:
        """While the follower catches up, write only what memory needs to free."""
        if catching_up:
            self._writes.hold()
        else:
            self._writes.release()

    async def flush(self) -> None:
        """Return once everything applied so far is on disk."""
        await self._writes.drain()

    async def close(self) -> None:
        """Write what waits, then close the file."""
        await self._writes.drain()
        if self._disk is not None:
            disk, self._disk = self._disk, None
            await self._writes.run(disk.close)

    # -- reading ---------------------------------------------------------------

    def get(self, prediction_id: str) -> Found:
        """What memory holds: a dict lookup or two, no I/O (the GET hot path)."""
        if not self._serving:
            return None  # `lookup` says why
        entry = self._hot.get(prediction_id)
        if entry is not None:
            return None if self._expired(entry.updated_at_s) else entry
        pending = self._pending.get(prediction_id)
        if pending is None or self._expired(pending.at_s):
            return None
        return pending

    async def lookup(self, prediction_id: str) -> Found:
        """Memory, then disk: a finished prediction read from disk stays in memory a while."""
        self._check_serving()
        found = self.get(prediction_id)
        if found is not None or self._disk is None:
            return found
        resets = self._resets
        row = await self._read(prediction_id)
        if resets != self._resets:
            raise StateUnavailable("the local state is being rebuilt from the event stream")
        if row is None or self._expired(row.updated_at_s):
            return None
        if not row.finished:
            return self._pending.get(prediction_id) or Pending(row.updated_at_s)
        self.cold_reads += 1
        already = self._hot.get(prediction_id)  # learnt while a thread read it
        if already is not None:
            return already
        entry = Prediction(
            row.input,
            row.updated_at_s,
            row.result,
            row.error,
            created_at_s=row.created_at_s,
            started_at_s=row.started_at_s,
            attempts=row.attempts,
            canceled=row.canceled,
        )
        self._hot.put(prediction_id, entry)
        self._evict(self._writes.committed)
        return entry

    def _check_serving(self) -> None:
        if not self._serving:
            raise StateUnavailable(
                "the local state is being checked against, or rebuilt from, the event stream"
            )

    async def pending_input(self, prediction_id: str) -> str | None:
        """The input of a pending prediction (for its status): kept on disk only."""
        if self._disk is None:
            return None
        await self._writes.drain()  # its row may still wait for a commit
        disk = self._disk
        try:
            row = await anyio.to_thread.run_sync(
                disk.read, prediction_id, limiter=self._large_reads
            )
        except (Corrupt, sqlite3.DatabaseError) as exc:
            self._found_damage(exc)
            raise StateUnavailable("the local state is damaged and being rebuilt") from None
        return None if row is None else row.input

    def queued_ahead(self, prediction_id: str) -> int:
        """Queued predictions accepted before this one (all of them, if not read back yet)."""
        ahead = self._line.ahead(prediction_id)
        return len(self._line) if ahead is None else ahead

    async def wait_finished(self, prediction_id: str, timeout_s: float) -> Found:
        """The prediction once finished, or as it stands after `timeout_s`.

        The waiter is a bare future resolved when the stream brings the
        outcome: nothing polls, so a thousand waiting requests cost a
        thousand futures and no CPU.
        """
        found = await self.lookup(prediction_id)
        if not isinstance(found, Pending) or self._closed or timeout_s <= 0:
            return found
        future = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(prediction_id, []).append(future)
        try:
            with anyio.move_on_after(timeout_s):
                await future
        finally:
            self._discard_waiter(prediction_id, future)
        return await self.lookup(prediction_id)

    @property
    def releasing(self) -> bool:
        """Whether long polls are being answered at once (the replica stops)."""
        return self._closed

    def release_waiters(self) -> None:
        """Answer every long poll now (shutdown must not wait for them)."""
        self._closed = True
        for prediction_id in list(self._waiters):
            self._wake(prediction_id)

    # -- what the stream says ------------------------------------------------

    async def apply_logged(
        self, events: Sequence[Event], offset: int | None = None, body: bytes = b""
    ) -> None:
        """Apply one stream message's events, in order; `offset` is where it stands."""
        rows: list[Row] = []
        progress: list[Progress] = []
        finished: list[Outcome] = []
        async with self._lock:
            for event in events:
                outcome = self._apply_one(event, rows, progress)
                if outcome is not None:
                    finished.append(outcome)
            self._writes.add(rows, offset, body, progress)
            self._expire_pending()
            self._evict(self._writes.committed)
        for outcome in finished:
            self._wake(outcome.prediction_id)
            if isinstance(outcome, Canceled):
                for callback in self.on_canceled:
                    callback(outcome.prediction_id)
        await self._writes.room(self._fits)

    def _apply_one(self, event: Event, rows: list[Row], progress: list[Progress]) -> Outcome | None:
        """Apply one event; the outcome if it is its prediction's first."""
        if isinstance(event, Marker) or self._expired(event.at_s):
            return None
        if isinstance(event, Accepted):
            self._apply_accepted(event, rows)
        elif isinstance(event, Started):
            self._apply_started(event, progress)
        elif self._apply_outcome(event, rows):
            return event
        return None

    async def note_accepted(self, task: Accepted) -> None:
        """A task this replica accepted: pending here at once, before the stream says so."""
        async with self._lock:
            known = task.prediction_id in self._pending or task.prediction_id in self._hot.entries
            if not known:
                self._pending[task.prediction_id] = Pending(task.at_s, logged=False)

    async def forget_pending(self, prediction_id: str) -> None:
        """Drop the stub of an accepted task that never reached the broker."""
        async with self._lock:
            stub = self._pending.get(prediction_id)
            if stub is not None and not stub.logged:
                del self._pending[prediction_id]

    def _apply_accepted(self, event: Accepted, rows: list[Row]) -> None:
        prediction_id = event.prediction_id
        stub = self._pending.get(prediction_id)
        if (stub is not None and stub.logged) or self._finished_here(prediction_id):
            # Known already: the stream has it once, a replay again, or a
            # keyed submit lost to the first with its key (its task is skipped).
            return
        self._pending[prediction_id] = Pending(
            event.at_s, nonce=event.nonce, fingerprint=event.fingerprint
        )
        self._line.join(prediction_id)
        token = Pending(0.0, nonce=event.nonce, fingerprint=event.fingerprint).token
        rows.append(Row(prediction_id, event.at_s, event.input, token=token))
        self.disk_entries += 1

    def _finished_here(self, prediction_id: str) -> bool:
        """Whether memory holds a live outcome (an expired one, of a reused key, is dropped)."""
        entry = self._hot.entries.get(prediction_id)
        if entry is None:
            return False
        if self._expired(entry.updated_at_s):
            self._hot.discard(prediction_id)
            return False
        return True

    def _apply_started(self, event: Started, progress: list[Progress]) -> None:
        stub = self._pending.get(event.prediction_id)
        if stub is None or not stub.logged or event.attempt <= stub.attempts:
            return  # finished, unknown, or an older run's start read late
        stub.started_at_s = stub.started_at_s or event.at_s
        stub.attempts = event.attempt
        self._line.leave(event.prediction_id)
        progress.append(Progress(event.prediction_id, stub.started_at_s, stub.attempts))

    def _apply_outcome(self, event: Outcome, rows: list[Row]) -> bool:
        """Record the first outcome of a prediction; False for any later one."""
        prediction_id = event.prediction_id
        if self._finished_here(prediction_id):
            return False
        stub = self._pending.pop(prediction_id, None)
        self._line.leave(prediction_id)
        if stub is None or not stub.logged:
            on_disk = self._head(prediction_id)
            if isinstance(on_disk, LargeInput) or (
                isinstance(on_disk, Row) and on_disk.finished and not self._expired_row(on_disk)
            ):
                return False
            self.disk_entries += on_disk is None
            stub = Pending(event.at_s) if on_disk is None else _stub_of(on_disk)
        entry = _entry(event, stub, self._writes.seq)
        self._hot.put(prediction_id, entry)
        rows.append(
            Row(
                prediction_id,
                event.at_s,
                event.input,
                entry.result,
                entry.error,
                entry.created_at_s,
                entry.started_at_s,
                entry.attempts,
                entry.canceled,
            )
        )
        return True

    def _expired_row(self, row: Row) -> bool:
        return self._expired(row.updated_at_s)

    # -- internals ---------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Accepted predictions with no outcome yet."""
        return len(self._pending)

    @property
    def waiting(self) -> int:
        return sum(len(futures) for futures in self._waiters.values())

    @property
    def memory_bytes(self) -> int:
        """What the budget covers: finished entries, pending stubs, rows waiting for the disk."""
        return self._hot.bytes + self._other_bytes()

    def _other_bytes(self) -> int:
        return len(self._pending) * PENDING_ENTRY_BYTES + self._writes.buffered_bytes

    def _fits(self) -> bool:
        return self.memory_bytes <= self._hot.max_bytes

    @property
    def memory_entries(self) -> int:
        return len(self._hot) + len(self._pending)

    @property
    def is_open(self) -> bool:
        return self._disk is not None

    @property
    def write_error(self) -> str | None:
        return self._writes.error

    async def _read(self, prediction_id: str) -> Row | None:
        disk = self._disk
        assert disk is not None
        try:
            head = disk.head(prediction_id)
            if isinstance(head, LargeInput):
                return await anyio.to_thread.run_sync(
                    disk.read, prediction_id, limiter=self._large_reads
                )
        except (Corrupt, sqlite3.DatabaseError) as exc:
            self._found_damage(exc)
            raise StateUnavailable("the local state is damaged and being rebuilt") from None
        return head

    def _head(self, prediction_id: str) -> Row | LargeInput | None:
        """The disk's row for an outcome memory cannot place (rare: see apply_logged)."""
        if self._disk is None:
            return None
        try:
            return self._disk.head(prediction_id)
        except (Corrupt, sqlite3.DatabaseError) as exc:
            self._found_damage(exc)
            return None

    def _found_damage(self, exc: Exception) -> None:
        if not self.damaged.is_set():
            log.error("the local state is damaged (%s); rebuilding it from the event stream", exc)
            self.damaged.set()

    def _evict(self, committed_seq: int) -> None:
        self._hot.evict(committed_seq, self._other_bytes())

    def _count_swept(self, deleted: int) -> None:
        self.disk_entries = max(0, self.disk_entries - deleted)

    def _expire_pending(self) -> None:
        pending = self._pending
        while pending:
            oldest_id, oldest = next(iter(pending.items()))
            if not self._expired(oldest.at_s):
                return
            del pending[oldest_id]

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


def _entry(event: Outcome, stub: Pending, seq: int) -> Prediction:
    """The memory entry of a first outcome; times and attempts the event lacks from `stub`."""
    entry = Prediction(
        event.input,
        event.at_s,
        seq=seq,
        created_at_s=stub.at_s,
        started_at_s=stub.started_at_s,
        attempts=stub.attempts,
    )
    if isinstance(event, Canceled):
        entry.canceled = True
        return entry
    if isinstance(event, Done):
        entry.result = event.result
    else:
        entry.error = event.error
    # The first run's start, as read from its Started; the outcome tells
    # the last run's, for when no Started was read (a replica far behind).
    entry.started_at_s = entry.started_at_s or event.started_at_s
    entry.attempts = max(event.attempts, entry.attempts)
    return entry


def _stub_of(row: Row) -> Pending:
    """What a pending row on disk says (an expired outcome's row: a fresh start)."""
    if row.finished:
        return Pending(row.updated_at_s)
    return Pending(row.created_at_s or row.updated_at_s, True, row.started_at_s, row.attempts)


def _load(disk: DiskStore, since_s: float) -> tuple[list[PendingRow], int, Position | None]:
    return disk.pending(since_s), disk.count(), disk.checkpoint()
