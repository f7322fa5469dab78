"""The worker against the live broker: poison messages, failures, idempotency."""

from __future__ import annotations

import asyncio
import json
import re
import uuid

import aio_pika
import anyio

from service.broker import Names
from service.inflight import InFlight
from service.model import ModelRunner
from service.schemas import Accepted, TaskBatch
from service.settings import Settings
from tests import predictors
from tests.support import (
    LiveApp,
    close_service_connections,
    dead_letters,
    free_port,
    live_app,
    publish_tasks,
    settings_for_test,
    submit_async,
    wait_finished,
)


async def _publish_raw(settings: Settings, body: bytes) -> None:
    """Put a message straight on the work queue, as a broken producer would."""
    connection = await aio_pika.connect(settings.rabbitmq_url, timeout=5)
    async with connection:
        channel = await connection.channel()
        await channel.default_exchange.publish(
            aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
            routing_key=Names.for_namespace(settings.broker_namespace).tasks,
        )


async def test_poison_messages_are_dead_lettered_and_work_goes_on(live: LiveApp) -> None:
    poison = [
        b"not json",
        b'{"kind":"accepted"}',
        b'{"prediction_id": 5}',
        b"\xff\xfe",
        b'{"kind":"tasks","tasks":[{"kind":"done"}]}',  # a batch of something else
        b'{"kind":"accepted","x":' + b"[" * 5000 + b"]" * 5000 + b"}",  # too deep to decode
    ]
    for body in poison:
        await _publish_raw(live.settings, body)
    assert sorted(await dead_letters(live.settings, len(poison))) == sorted(poison)
    prediction_id = await submit_async(live.client, "after the poison")
    response = await wait_finished(live.client, prediction_id)
    assert response.status_code == 200
    assert response.json()["output"]["input"] == "after the poison"


async def test_a_task_with_a_recorded_outcome_is_not_run_again(live: LiveApp) -> None:
    prediction_id = await submit_async(live.client, "once")
    first = (await wait_finished(live.client, prediction_id)).json()
    # Deliver the same task again, as the broker does after a crash.
    task = {"kind": "accepted", "prediction_id": prediction_id, "input": "once", "at_s": 1.0}
    await _publish_raw(live.settings, json.dumps(task).encode())
    follow_up = await submit_async(live.client, "next")
    await wait_finished(live.client, follow_up)
    again = (await live.client.get(f"/predict/{prediction_id}")).json()
    assert again == first


async def test_a_transient_model_failure_is_retried(rabbitmq_url: str) -> None:
    settings = settings_for_test(rabbitmq_url, predictor="tests.predictors:fails_first_time")
    async with live_app(settings) as live:
        prediction_id = await submit_async(live.client, "flaky")
        response = await wait_finished(live.client, prediction_id)
        assert response.status_code == 200
        assert response.json()["output"]["result"] == "2"


async def _drop_the_connection_mid_run(live: LiveApp, prediction_id: str, text: str) -> None:
    """Wait until the model runs `text`, then have the broker drop the connection."""
    with anyio.fail_after(5):
        while predictors.calls.get(text) != 1:
            await asyncio.sleep(0.01)
    # As a broker restart would; the task comes back once the service reconnects.
    assert close_service_connections(live.settings) == 1
    still_running = await live.client.get(f"/predict/{prediction_id}")
    assert still_running.status_code == 400, "the drop came too late to test anything"


async def test_a_prediction_running_through_a_dropped_connection_is_not_run_again(
    rabbitmq_url: str,
) -> None:
    settings = settings_for_test(rabbitmq_url, predictor="tests.predictors:counts_calls")
    async with live_app(settings) as live:
        prediction_id = await submit_async(live.client, "4")
        await _drop_the_connection_mid_run(live, prediction_id, "4")
        response = await wait_finished(live.client, prediction_id)
        assert response.status_code == 200, response.text
        assert response.json()["output"]["result"] == "4"
        assert predictors.calls["4"] == 1


async def test_the_redelivery_of_a_running_task_is_not_a_new_attempt(rabbitmq_url: str) -> None:
    settings = settings_for_test(
        rabbitmq_url, predictor="tests.predictors:counts_calls", max_attempts=3
    )
    async with live_app(settings) as live:
        # Two attempts spent already (a batch put it back so), so this run is
        # its last; the redelivery after the drop must take its answer, not
        # count a fourth attempt and fail it.
        task = Accepted(str(uuid.uuid4()), "4.0", 1e10, attempts=2)
        await publish_tasks(live.settings, task)
        await _drop_the_connection_mid_run(live, task.prediction_id, "4.0")
        response = await wait_finished(live.client, task.prediction_id)
        assert response.status_code == 200, response.text
        assert predictors.calls["4.0"] == 1


async def test_an_outcome_known_during_an_outage_is_recorded_for_every_replica(
    rabbitmq_url: str,
) -> None:
    # The model answers while the connection is down. On reconnection,
    # aio-pika redelivers the task before the service hears it is back, so
    # the first try to record the outcome fails: that must not requeue the
    # task, which (with the drop's own return) would pass the delivery limit
    # and fail it on every other replica.
    settings = settings_for_test(
        rabbitmq_url,
        predictor="tests.predictors:counts_calls",
        broker_reconnect_interval_s=3,
    )
    async with live_app(settings) as live:
        prediction_id = await submit_async(live.client, "1.5")
        await _drop_the_connection_mid_run(live, prediction_id, "1.5")
        response = await wait_finished(live.client, prediction_id)
        assert response.status_code == 200, response.text
        # Answered from the mapping at once; on the stream once reconnected.
        published = re.compile(r'^broker_events_published_total\{routing_key="event"\} [1-9]', re.M)
        with anyio.fail_after(15):
            while not published.search((await live.client.get("/metrics")).text):
                await asyncio.sleep(0.1)
        # A replica started now knows only what the stream says.
        async with live_app(settings.with_changes(port=free_port())) as other:
            response = await wait_finished(other.client, prediction_id)
            assert response.status_code == 200, response.text
            assert response.json()["output"]["result"] == "1.5"
    assert predictors.calls["1.5"] == 1


async def test_a_batch_running_through_a_dropped_connection_ends_done_everywhere(
    rabbitmq_url: str,
) -> None:
    settings = settings_for_test(rabbitmq_url, predictor="tests.predictors:counts_calls")
    inputs = [f"3.{i:02d}" for i in range(10)]
    tasks = [Accepted(str(uuid.uuid4()), text, 1e10) for text in inputs]
    async with live_app(settings) as live:
        await publish_tasks(settings, TaskBatch(tasks))
        with anyio.fail_after(5):
            while any(predictors.calls.get(text) != 1 for text in inputs):
                await asyncio.sleep(0.01)
        # The batch comes back after the reconnection and is split, its
        # tasks put back, possibly before the service hears the broker is
        # back: that must wait, not requeue the batch (which, counted with
        # the drop's own return, would pass the delivery limit).
        assert close_service_connections(settings) == 1
        for task in tasks:
            response = await wait_finished(live.client, task.prediction_id)
            assert response.status_code == 200, response.text
        async with live_app(settings.with_changes(port=free_port())) as other:
            for task in tasks:
                response = await wait_finished(other.client, task.prediction_id)
                assert response.status_code == 200, response.text
                assert response.json()["output"]["result"] == task.input
    assert [predictors.calls[text] for text in inputs] == [1] * len(inputs)


async def test_a_second_delivery_waits_for_the_run_in_flight() -> None:
    runs = InFlight(ModelRunner(predictors.counts_calls, concurrency=2))
    first = asyncio.ensure_future(runs.predict("id-1", "0.2"))
    with anyio.fail_after(1):
        while "id-1" not in runs:
            await asyncio.sleep(0)
    # A waiter cancelled with its connection leaves the run going.
    cancelled = asyncio.ensure_future(runs.predict("id-1", "0.2"))
    await asyncio.sleep(0)  # it joins the run, then is cancelled
    cancelled.cancel()
    assert await runs.predict("id-1", "0.2") == ("0.2", True)  # joined, not run again
    assert await first == ("0.2", False)
    assert predictors.calls["0.2"] == 1
    # Kept until its outcome is published: a redelivery meanwhile takes it.
    assert await runs.predict("id-1", "0.2") == ("0.2", True)
    runs.forget("id-1")
    # Then a later delivery (a real retry) runs again.
    assert "id-1" not in runs
    assert await runs.predict("id-1", "0.2") == ("0.2", False)
    assert predictors.calls["0.2"] == 2
