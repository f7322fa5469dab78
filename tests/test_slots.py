"""The worker's model slots (service/slots.py): a line served in order. No broker."""

from __future__ import annotations

import asyncio

import pytest

from service.slots import ModelSlots, SlotsClosed


async def _hold(slots: ModelSlots, name: str, order: list[str], release: asyncio.Event) -> None:
    async with slots.held():  # for a task reserved when its message came
        order.append(name)
        await release.wait()


async def test_slots_are_handed_out_in_arrival_order() -> None:
    slots = ModelSlots(2)
    slots.reserve(5)
    assert (slots.reserved, slots.free) == (5, -3)
    order: list[str] = []
    release = {name: asyncio.Event() for name in "abcde"}
    tasks = [asyncio.create_task(_hold(slots, name, order, release[name])) for name in "abcde"]
    await asyncio.sleep(0)
    assert order == ["a", "b"]
    assert (slots.running, slots.waiting, slots.free) == (2, 3, -3)
    release["b"].set()
    await asyncio.sleep(0.01)
    assert order == ["a", "b", "c"]  # b's slot went to the first in line
    for event in release.values():
        event.set()
    await asyncio.gather(*tasks)
    assert order == list("abcde")
    assert (slots.running, slots.waiting, slots.free) == (0, 0, 2)


async def test_closing_sends_back_whoever_waits_and_lets_runs_end() -> None:
    slots = ModelSlots(1)
    slots.reserve(3)
    order: list[str] = []
    release = asyncio.Event()
    running = asyncio.create_task(_hold(slots, "a", order, release))
    waiting = asyncio.create_task(_hold(slots, "b", order, asyncio.Event()))
    await asyncio.sleep(0)
    slots.close()
    with pytest.raises(SlotsClosed):
        await waiting
    release.set()
    await running
    assert order == ["a"]
    with pytest.raises(SlotsClosed):
        async with slots.held():
            pass
    assert (slots.running, slots.waiting, slots.reserved) == (0, 0, 0)


async def test_a_waiter_cancelled_in_line_leaves_it() -> None:
    slots = ModelSlots(1)
    slots.reserve(2)
    changes: list[int] = []
    slots.on_change = lambda: changes.append(slots.waiting)
    release = asyncio.Event()
    order: list[str] = []
    first = asyncio.create_task(_hold(slots, "a", order, release))
    second = asyncio.create_task(_hold(slots, "b", order, asyncio.Event()))
    await asyncio.sleep(0)
    second.cancel()
    await asyncio.gather(second, return_exceptions=True)
    assert slots.waiting == 0
    release.set()
    await first
    assert (slots.running, slots.free) == (0, 1)
    assert changes  # the intake hears of every change


def test_a_reserved_task_that_needs_no_run_gives_its_reservation_back() -> None:
    slots = ModelSlots(4)
    slots.reserve(3)
    assert slots.free == 1  # the intake asks for no more than that
    slots.unreserve()
    assert (slots.reserved, slots.free) == (2, 2)
