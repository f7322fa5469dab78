"""The results view built from the stream: idempotent, bounded, two tiers, waitable."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from service.disk import Identity, Position
from service.hot import Prediction
from service.schemas import Accepted, Done, Failed, Marker
from service.store import Pending, ResultStore, StateUnavailable

IDENTITY = Identity("test", "/")


class Clock:
    def __init__(self) -> None:
        self.now_s = time.time()

    def __call__(self) -> float:
        return self.now_s


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[ResultStore]:
    store = ResultStore(ttl_s=60, memory_max_bytes=64 * 1024 * 1024)
    await store.open(tmp_path / "state.sqlite3", IDENTITY)
    yield store
    await store.close()


async def _open(
    path: Path, *, ttl_s: float = 60, memory_max_bytes: int = 2**26, clock: Clock | None = None
) -> tuple[ResultStore, Position | None]:
    store = ResultStore(ttl_s, memory_max_bytes, clock or time.time)
    checkpoint = await store.open(path / "state.sqlite3", IDENTITY)
    return store, checkpoint


async def test_accepted_then_done_reads_pending_then_result(store: ResultStore) -> None:
    await store.apply_logged([Accepted("p1", "in", at_s=_now())], offset=0)
    assert isinstance(store.get("p1"), Pending)
    await store.apply_logged([Done("p1", "in", "123", at_s=_now())], offset=1)
    entry = store.get("p1")
    assert isinstance(entry, Prediction) and entry.result == "123"
    assert store.pending == 0


async def test_the_first_outcome_on_the_stream_wins(store: ResultStore) -> None:
    await store.apply_logged([Accepted("p1", "in", at_s=_now())])
    await store.apply_logged([Done("p1", "in", "first", at_s=_now())])
    await store.apply_logged([Accepted("p1", "in", at_s=_now())])
    await store.apply_logged([Done("p1", "in", "second", at_s=_now())])
    await store.apply_logged([Failed("p1", "in", "late failure", at_s=_now())])
    entry = store.get("p1")
    assert isinstance(entry, Prediction) and (entry.result, entry.error) == ("first", None)


async def test_a_later_outcome_loses_even_when_the_first_is_only_on_disk(tmp_path: Path) -> None:
    # A budget of one byte: nothing finished stays in memory once written.
    store, _ = await _open(tmp_path, memory_max_bytes=1)
    try:
        await store.apply_logged([Accepted("p1", "in", _now()), Done("p1", "in", "first", _now())])
        await store.close()  # written; reopening drops memory
        store, _ = await _open(tmp_path, memory_max_bytes=1)
        assert store.get("p1") is None
        await store.apply_logged([Done("p1", "in", "second", _now())])
        entry = await store.lookup("p1")
        assert isinstance(entry, Prediction) and entry.result == "first"
    finally:
        await store.close()


async def test_an_outcome_without_its_accepted_event_is_kept(store: ResultStore) -> None:
    # Retention may drop the older "accepted" event before the outcome.
    await store.apply_logged([Failed("p1", "in", "boom", at_s=_now())])
    entry = store.get("p1")
    assert isinstance(entry, Prediction) and entry.error == "boom"
    assert store.pending == 0


async def test_entries_expire_after_the_ttl_in_memory_and_on_disk(tmp_path: Path) -> None:
    clock = Clock()
    store, _ = await _open(tmp_path, ttl_s=10, clock=clock)
    try:
        await store.apply_logged([Accepted("old", "in", clock.now_s)])
        await store.apply_logged([Done("old", "in", "1", clock.now_s)])
        clock.now_s += 5
        await store.apply_logged([Accepted("newer", "in", clock.now_s)])
        clock.now_s += 6
        assert store.get("old") is None
        assert await store.lookup("old") is None
        assert isinstance(store.get("newer"), Pending)
    finally:
        await store.close()


async def test_events_older_than_the_ttl_are_ignored_on_replay(store: ResultStore) -> None:
    await store.apply_logged([Done("ancient", "in", "1", at_s=_now() - 61)])
    assert await store.lookup("ancient") is None
    assert store.disk_entries == 0


async def test_markers_do_not_touch_the_view(store: ResultStore) -> None:
    await store.apply_logged([Marker("m")], offset=7)
    assert store.memory_entries == 0


async def test_a_task_noted_at_accept_time_is_pending_until_the_stream_says_more(
    store: ResultStore,
) -> None:
    await store.note_accepted(Accepted("p1", "in", _now()))
    assert isinstance(store.get("p1"), Pending)
    await store.forget_pending("p1")  # its publish failed: nobody knows it
    assert store.get("p1") is None
    await store.note_accepted(Accepted("p2", "in", _now()))
    await store.apply_logged([Accepted("p2", "in", _now())])
    await store.forget_pending("p2")  # on the stream after all: it stays
    assert isinstance(store.get("p2"), Pending)


async def test_memory_stays_within_the_budget_and_nothing_is_forgotten(tmp_path: Path) -> None:
    budget = 200_000
    store, _ = await _open(tmp_path, memory_max_bytes=budget)
    try:
        inputs = {f"p{i}": f"{i:04d}" + "x" * 20_000 for i in range(100)}  # ~2 MB in all
        for prediction_id, text in inputs.items():
            await store.apply_logged([Accepted(prediction_id, text, _now())])
            await store.apply_logged([Done(prediction_id, text, prediction_id, _now())])
            await _until_written(store)
            assert store.memory_bytes <= budget
        for prediction_id, text in inputs.items():
            entry = await store.lookup(prediction_id)
            assert isinstance(entry, Prediction)
            assert (entry.input, entry.result) == (text, prediction_id)
        assert store.cold_reads >= 80
        assert store.disk_entries == 100
    finally:
        await store.close()


async def test_a_large_input_is_read_back_whole(tmp_path: Path) -> None:
    store, _ = await _open(tmp_path, memory_max_bytes=1)
    big = "é" * 600_000  # 1.2 MB of UTF-8: read in a thread, not on the loop
    try:
        await store.apply_logged([Accepted("big", big, _now()), Done("big", big, "7", _now())])
        await _until_written(store)
        assert store.get("big") is None
        entry = await store.lookup("big")
        assert isinstance(entry, Prediction) and entry.input == big and entry.result == "7"
    finally:
        await store.close()


async def test_a_reopened_store_resumes_after_its_checkpoint(tmp_path: Path) -> None:
    store, checkpoint = await _open(tmp_path)
    assert checkpoint is None
    await store.apply_logged([Accepted("done", "a", _now())], offset=10, body=b"m10")
    await store.apply_logged([Done("done", "a", "1", _now())], offset=11, body=b"m11")
    await store.apply_logged([Accepted("waits", "b", _now())], offset=12, body=b"m12")
    await store.close()
    store, checkpoint = await _open(tmp_path)
    try:
        assert checkpoint == Position.of(12, b"m12")
        # Nothing is served until the stream shows it still holds message 12.
        assert store.get("waits") is None
        with pytest.raises(StateUnavailable):
            await store.lookup("done")
        store.verified()
        assert isinstance(store.get("waits"), Pending)  # pending stubs are loaded
        assert store.get("done") is None  # finished ones stay on disk until asked for
        entry = await store.lookup("done")
        assert isinstance(entry, Prediction) and entry.result == "1"
        assert store.disk_entries == 2
    finally:
        await store.close()


async def test_a_damaged_row_is_never_served(tmp_path: Path) -> None:
    store, _ = await _open(tmp_path, memory_max_bytes=1)
    await store.apply_logged([Accepted("p1", "in", _now()), Done("p1", "in", "12345", _now())])
    await store.close()
    path = tmp_path / "state.sqlite3"
    path.write_bytes(path.read_bytes().replace(b"12345", b"99999"))
    store, _ = await _open(tmp_path, memory_max_bytes=1)
    try:
        with pytest.raises(StateUnavailable):
            await store.lookup("p1")
        assert store.damaged.is_set()
        await store.reset()
        assert await store.lookup("p1") is None
        assert not store.damaged.is_set()
    finally:
        await store.close()


async def test_waiters_wake_when_the_outcome_arrives(store: ResultStore) -> None:
    await store.apply_logged([Accepted("p1", "in", at_s=_now())])
    waiters = [asyncio.create_task(store.wait_finished("p1", timeout_s=5)) for _ in range(1000)]
    await asyncio.sleep(0.01)
    assert store.waiting == 1000
    with anyio.fail_after(1):
        await store.apply_logged([Done("p1", "in", "7", at_s=_now())])
        entries = await asyncio.gather(*waiters)
    assert {entry.result for entry in entries if isinstance(entry, Prediction)} == {"7"}
    assert store.waiting == 0


async def test_a_waiter_times_out_with_the_pending_entry(store: ResultStore) -> None:
    await store.apply_logged([Accepted("p1", "in", at_s=_now())])
    with anyio.fail_after(1):
        entry = await store.wait_finished("p1", timeout_s=0.05)
    assert isinstance(entry, Pending)
    assert store.waiting == 0


async def test_release_waiters_answers_every_long_poll_now(store: ResultStore) -> None:
    await store.apply_logged([Accepted("p1", "in", at_s=_now())])
    waiter = asyncio.create_task(store.wait_finished("p1", timeout_s=30))
    await asyncio.sleep(0.01)
    store.release_waiters()
    with anyio.fail_after(1):
        entry = await waiter
    assert isinstance(entry, Pending)


async def _until_written(store: ResultStore) -> None:
    with anyio.fail_after(5):
        await store.flush()


def _now() -> float:
    return time.time()
