"""The results mapping built from events: idempotent, bounded, waitable."""

from __future__ import annotations

import asyncio
import time

import anyio

from service.schemas import Accepted, Done, Failed, Marker
from service.store import ResultStore


class Clock:
    def __init__(self) -> None:
        self.now_s = 1_000.0

    def __call__(self) -> float:
        return self.now_s


async def test_accepted_then_done_reads_pending_then_result() -> None:
    store = ResultStore(ttl_s=60)
    assert await store.apply(Accepted("p1", "in", at_s=_now()))
    entry = store.get("p1")
    assert entry is not None and not entry.finished
    assert await store.apply(Done("p1", "in", "123", at_s=_now()))
    entry = store.get("p1")
    assert entry is not None and entry.result == "123"
    assert store.pending == 0


async def test_duplicates_never_flip_or_change_a_finished_prediction() -> None:
    store = ResultStore(ttl_s=60)
    await store.apply(Accepted("p1", "in", at_s=_now()))
    await store.apply(Done("p1", "in", "first", at_s=_now()))
    assert not await store.apply(Accepted("p1", "in", at_s=_now()))
    assert not await store.apply(Done("p1", "in", "second", at_s=_now()))
    assert not await store.apply(Failed("p1", "in", "late failure", at_s=_now()))
    entry = store.get("p1")
    assert entry is not None and (entry.result, entry.error) == ("first", None)


async def test_an_outcome_without_its_accepted_event_is_kept() -> None:
    # Retention may drop the older "accepted" event before the outcome.
    store = ResultStore(ttl_s=60)
    await store.apply(Failed("p1", "in", "boom", at_s=_now()))
    entry = store.get("p1")
    assert entry is not None and entry.error == "boom"
    assert store.pending == 0


async def test_entries_expire_after_the_ttl_and_are_evicted() -> None:
    clock = Clock()
    store = ResultStore(ttl_s=10, clock=clock)
    await store.apply(Accepted("old", "in", at_s=clock.now_s))
    await store.apply(Done("old", "in", "1", at_s=clock.now_s))
    clock.now_s += 5
    await store.apply(Accepted("newer", "in", at_s=clock.now_s))
    clock.now_s += 6
    assert store.get("old") is None
    assert store.get("newer") is not None
    await store.apply(Accepted("newest", "in", at_s=clock.now_s))
    assert len(store) == 2  # "old" was evicted, not just hidden
    assert store.pending == 2


async def test_events_older_than_the_ttl_are_ignored_on_replay() -> None:
    clock = Clock()
    store = ResultStore(ttl_s=10, clock=clock)
    assert not await store.apply(Done("ancient", "in", "1", at_s=clock.now_s - 11))
    assert store.get("ancient") is None


async def test_markers_do_not_touch_the_mapping() -> None:
    store = ResultStore(ttl_s=10)
    assert not await store.apply(Marker("m"))
    assert len(store) == 0


async def test_forget_pending_keeps_finished_entries() -> None:
    store = ResultStore(ttl_s=60)
    await store.apply(Accepted("p1", "in", at_s=_now()))
    await store.apply(Done("p1", "in", "1", at_s=_now()))
    await store.forget_pending("p1")
    assert store.get("p1") is not None
    await store.apply(Accepted("p2", "in", at_s=_now()))
    await store.forget_pending("p2")
    assert store.get("p2") is None
    assert store.pending == 0


async def test_waiters_wake_when_the_outcome_arrives() -> None:
    store = ResultStore(ttl_s=60)
    await store.apply(Accepted("p1", "in", at_s=_now()))
    waiters = [asyncio.create_task(store.wait_finished("p1", timeout_s=5)) for _ in range(1000)]
    await asyncio.sleep(0.01)
    assert store.waiting == 1000
    with anyio.fail_after(1):
        await store.apply(Done("p1", "in", "7", at_s=_now()))
        entries = await asyncio.gather(*waiters)
    assert {entry.result for entry in entries if entry is not None} == {"7"}
    assert store.waiting == 0


async def test_a_waiter_times_out_with_the_pending_entry() -> None:
    store = ResultStore(ttl_s=60)
    await store.apply(Accepted("p1", "in", at_s=_now()))
    with anyio.fail_after(1):
        entry = await store.wait_finished("p1", timeout_s=0.05)
    assert entry is not None and not entry.finished
    assert store.waiting == 0


async def test_release_waiters_answers_every_long_poll_now() -> None:
    store = ResultStore(ttl_s=60)
    await store.apply(Accepted("p1", "in", at_s=_now()))
    waiter = asyncio.create_task(store.wait_finished("p1", timeout_s=30))
    await asyncio.sleep(0.01)
    store.release_waiters()
    with anyio.fail_after(1):
        entry = await waiter
    assert entry is not None and not entry.finished


def _now() -> float:
    return time.time()
