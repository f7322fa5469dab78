"""The mock model, PREDICTOR loading and the shared concurrency limit."""

from __future__ import annotations

import asyncio
import threading
import time

import anyio
import pytest

from service.model import MockModel, ModelError, ModelRunner, Slots, load_predictor
from service.settings import ConfigError, Settings
from tests.support import live_app, settings_for_test, submit_async, wait_finished


def test_whole_delay_bounds_give_whole_seconds_in_range() -> None:
    model = MockModel(10, 17)
    delays = [model.delay_s() for _ in range(2000)]
    assert set(delays) == set(range(10, 18))
    assert all(float(d).is_integer() for d in delays)


def test_fractional_delay_bounds_give_fractions_in_range() -> None:
    model = MockModel(0.05, 0.2)
    delays = [model.delay_s() for _ in range(500)]
    assert all(0.05 <= d <= 0.2 for d in delays)
    assert len(set(delays)) > 100


async def test_mock_answers_an_integer_from_1000_to_20000() -> None:
    model = MockModel(0, 0)
    results = [int(await model("x")) for _ in range(100_000)]
    assert min(results) == 1000 and max(results) == 20000  # both ends are reachable
    assert len(set(results)) > 18_000


async def test_mock_waits_its_delay_with_the_event_loop_free() -> None:
    model = MockModel(0.2, 0.2)
    started_s = time.perf_counter()
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    task = asyncio.create_task(ticker())
    await model("x")
    task.cancel()
    assert time.perf_counter() - started_s >= 0.2
    assert ticks >= 10  # the loop kept running while the mock waited


def test_defaults_keep_the_briefs_10_to_17_seconds() -> None:
    settings = Settings()
    assert (settings.model_delay_min_s, settings.model_delay_max_s) == (10, 17)


async def test_runner_limits_concurrency_across_callers() -> None:
    running = 0
    peak = 0

    async def predictor(text: str) -> str:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await anyio.sleep(0.05)
        running -= 1
        return text

    runner = ModelRunner(predictor, concurrency=3)
    results = await asyncio.gather(*(runner.predict(str(i)) for i in range(12)))
    assert results == [str(i) for i in range(12)]
    assert peak == 3


async def test_slots_serve_waiters_in_order_and_pass_on_a_cancelled_waiters_slot() -> None:
    slots = Slots(1)
    await slots.take()  # free: taken at once
    order: list[str] = []

    async def waiter(name: str) -> None:
        await slots.take()
        order.append(name)
        slots.give_back()

    first = asyncio.create_task(waiter("first"))
    cancelled = asyncio.create_task(waiter("cancelled"))
    last = asyncio.create_task(waiter("last"))
    await asyncio.sleep(0)  # all three wait now
    cancelled.cancel()
    slots.give_back()
    await asyncio.gather(first, last)
    assert order == ["first", "last"]
    assert cancelled.cancelled()
    # The slot came back: it can be taken again without waiting.
    with anyio.fail_after(1):
        await slots.take()
    # A waiter cancelled after being handed the slot hands it on.
    handed = asyncio.create_task(slots.take())
    await asyncio.sleep(0)
    slots.give_back()  # handed to `handed` ...
    handed.cancel()  # ... which is cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await handed
    with anyio.fail_after(1):
        await slots.take()


async def test_runner_wraps_model_exceptions() -> None:
    async def broken(text: str) -> str:
        raise KeyError(text)

    with pytest.raises(ModelError, match="KeyError: 'x'"):
        await ModelRunner(broken, 1).predict("x")


async def test_blocking_predictor_runs_in_a_worker_thread() -> None:
    predictor = load_predictor(Settings(predictor="tests.predictors:blocking_upper"))
    result = await predictor("abc")
    assert result.startswith("ABC@")
    assert not result.endswith(threading.main_thread().name)


async def test_numbers_from_a_predictor_become_strings() -> None:
    predictor = load_predictor(Settings(predictor="tests.predictors:returns_number"))
    assert await ModelRunner(predictor, 1).predict("abcd") == "4"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_colon", "must look like 'package.module:function'"),
        ("no.such.module:f", "cannot import 'no.such.module'"),
        ("tests.predictors:missing", "has no attribute 'missing'"),
        ("tests.predictors:NOT_CALLABLE", "is not callable"),
    ],
)
def test_bad_predictor_paths_fail_with_one_line(spec: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        load_predictor(Settings(predictor=spec))
    assert "\n" not in str(info.value)


async def test_blocking_predictor_does_not_stall_the_server(rabbitmq_url: str) -> None:
    settings = settings_for_test(rabbitmq_url, predictor="tests.predictors:blocking_upper")
    async with live_app(settings) as live:
        slow = [
            asyncio.create_task(live.client.post("/predict", json={"input": f"b{i}"}))
            for i in range(4)
        ]
        await asyncio.sleep(0.02)
        with anyio.fail_after(0.15):  # each blocking call takes 0.2 s
            assert (await live.client.get("/healthz")).status_code == 200
        answers = [(await task).json()["result"] for task in slow]
        assert [a.split("@")[0] for a in answers] == ["B0", "B1", "B2", "B3"]


async def test_async_predictor_serves_sync_and_async_requests(rabbitmq_url: str) -> None:
    settings = settings_for_test(rabbitmq_url, predictor="tests.predictors:async_reverse")
    async with live_app(settings) as live:
        sync = await live.client.post("/predict", json={"input": "abc"})
        assert sync.json() == {"input": "abc", "result": "cba"}
        prediction_id = await submit_async(live.client, "xyz")
        done = await wait_finished(live.client, prediction_id)
        assert done.json()["output"] == {"input": "xyz", "result": "zyx"}
