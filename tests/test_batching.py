"""Tasks and outcomes made together share a broker message, never a fate.

Against the live broker: what goes on the stream when many predictions
arrive at once, and what a worker does with a batch it cannot or should
not run whole (more tasks than free model slots, a failing task, a batch
redelivered after a crash).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import aio_pika
import anyio
import httpx
import pytest

from service.broker import Names
from service.schemas import Accepted, TaskBatch
from service.settings import Settings
from tests import predictors
from tests.nodes import Node
from tests.support import (
    LiveApp,
    ServiceProcess,
    dead_letters,
    free_port,
    live_app,
    metric,
    metric_total,
    publish_tasks,
    settings_for_test,
    submit_async,
    wait_finished,
)


async def _publish_batch(settings: Settings, inputs: list[str]) -> list[str]:
    """Publish one batch of tasks as a replica's outbox does; their ids."""
    tasks = [Accepted(str(uuid.uuid4()), text, 1e10) for text in inputs]
    await publish_tasks(settings, TaskBatch(tasks))
    return [task.prediction_id for task in tasks]


async def _stream_messages(settings: Settings, enough: int) -> list[dict[str, Any]]:
    """The stream's messages from its start, until `enough` events but starts are read."""
    messages: list[dict[str, Any]] = []
    events = 0
    connection = await aio_pika.connect(settings.rabbitmq_url, timeout=5)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=100)
        queue = await channel.get_queue(Names.for_namespace(settings.broker_namespace).events)
        with anyio.fail_after(20):
            async with queue.iterator(arguments={"x-stream-offset": "first"}) as iterator:
                async for message in iterator:
                    await message.ack()
                    messages.append(json.loads(message.body))
                    # Starts are told only for runs that last (service/journal.py).
                    events += sum(e["kind"] != "started" for e in _events(messages[-1]))
                    if events >= enough:
                        break
    return messages


def _events(message: dict[str, Any]) -> list[dict[str, Any]]:
    kind = message["kind"]
    if kind in ("tasks", "outcomes", "events"):
        batch: list[dict[str, Any]] = message[kind]
        return batch
    return [message]


async def _dead_letter_count(settings: Settings) -> int:
    """Messages in the dead-letter queue now (taken off it)."""
    count = 0
    connection = await aio_pika.connect(settings.rabbitmq_url, timeout=5)
    async with connection:
        channel = await connection.channel()
        dead = await channel.get_queue(Names.for_namespace(settings.broker_namespace).dead)
        while await dead.get(fail=False, no_ack=True) is not None:
            count += 1
    return count


async def test_tasks_accepted_in_the_same_instant_share_one_message(live: LiveApp) -> None:
    count = 40
    tasks = [Accepted(str(uuid.uuid4()), f"many {i}", 1e10) for i in range(count)]
    # As uvicorn does under load: many handlers reach accept() in one loop turn.
    await asyncio.gather(*(live.services.journal.accept(task) for task in tasks))
    ids = [task.prediction_id for task in tasks]
    for prediction_id in ids:
        assert (await wait_finished(live.client, prediction_id)).status_code == 200
    # Every task and every outcome is on the stream exactly once, the tasks
    # in a single message.
    messages = await _stream_messages(live.settings, enough=2 * count + 1)
    events = [event for message in messages for event in _events(message)]
    assert sorted(e["prediction_id"] for e in events if e["kind"] == "accepted") == sorted(ids)
    assert sorted(e["prediction_id"] for e in events if e["kind"] == "done") == sorted(ids)
    [batch] = [m for m in messages if m["kind"] in ("accepted", "tasks")]
    assert [task["prediction_id"] for task in batch["tasks"]] == ids
    client = live.client
    assert await metric(client, 'broker_events_published_total{routing_key="task"}') == count
    assert await metric(client, 'broker_messages_published_total{routing_key="task"}') == 1


async def test_publish_batch_max_1_sends_every_task_alone(rabbitmq_url: str) -> None:
    # What a rolling upgrade from a version that cannot read batches needs.
    async with live_app(settings_for_test(rabbitmq_url, publish_batch_max=1)) as live:
        count = 20
        ids = await asyncio.gather(*(submit_async(live.client, f"one {i}") for i in range(count)))
        for prediction_id in ids:
            assert (await wait_finished(live.client, prediction_id)).status_code == 200
        messages = await _stream_messages(live.settings, enough=2 * count + 1)
        kinds = {message["kind"] for message in messages} - {"started"}
        assert kinds == {"accepted", "done", "marker"}
        published = 'broker_messages_published_total{routing_key="task"}'
        assert await metric(live.client, published) == count


async def test_a_batch_beyond_the_free_model_slots_is_partly_put_back_once(
    rabbitmq_url: str,
) -> None:
    settings = settings_for_test(
        rabbitmq_url, predictor="tests.predictors:counts_calls", model_concurrency=2
    )
    async with live_app(settings) as live:
        inputs = [f"0.{i}" for i in range(1, 7)]
        ids = await _publish_batch(settings, inputs)
        most_running = 0
        with anyio.fail_after(20):
            while len(predictors.calls) < len(inputs):
                most_running = max(most_running, live.services.runner.running)
                await asyncio.sleep(0.01)
        for prediction_id, text in zip(ids, inputs, strict=True):
            response = await wait_finished(live.client, prediction_id)
            assert response.status_code == 200
            assert response.json()["output"]["result"] == text
        # Two slots: the first delivery keeps two tasks and puts the other
        # four back at once, as one message, for whichever replica has room.
        # Back here, they wait in line rather than go round again.
        assert most_running == 2
        assert await metric(live.client, 'tasks_put_back_total{reason="busy"}') == 4
        put_back = 'broker_messages_published_total{routing_key="retry"}'
        assert await metric(live.client, put_back) == 1
        # Putting back never runs a task twice.
        assert predictors.calls == dict.fromkeys(inputs, 1)


async def test_tasks_sent_together_do_not_wait_behind_a_long_one_while_a_replica_idles(
    rabbitmq_url: str,
) -> None:
    settings = settings_for_test(
        rabbitmq_url, predictor="tests.predictors:sleeps_as_told", model_concurrency=1
    )
    async with live_app(settings) as first, live_app(settings.with_changes(port=free_port())):
        long, *short = await _publish_batch(settings, ["8", "0.1", "0.1", "0.1"])
        with anyio.fail_after(6):  # well before the long one ends
            for prediction_id in short:
                response = await wait_finished(first.client, prediction_id)
                assert response.status_code == 200, response.text
        assert (await first.client.get(f"/predict/{long}")).status_code == 400
        assert (await wait_finished(first.client, long)).status_code == 200


async def test_a_task_that_fails_in_a_batch_fails_alone(rabbitmq_url: str) -> None:
    settings = settings_for_test(
        rabbitmq_url, predictor="tests.predictors:fails_on_boom", max_attempts=2
    )
    async with live_app(settings) as live:
        first, boom, last = await _publish_batch(settings, ["fine", "boom", "also fine"])
        for prediction_id in (first, last):
            response = await wait_finished(live.client, prediction_id)
            assert response.json()["output"]["result"] == "42"
        response = await wait_finished(live.client, boom)
        assert response.status_code == 500
        assert response.json() == {"error": "Prediction failed: RuntimeError: boom in input"}
        # It went back alone, through the delay queue, was tried once more,
        # and only it was dead-lettered, with the attempts it spent.
        [dead] = await dead_letters(settings, 1)
        assert json.loads(dead)["prediction_id"] == boom
        assert json.loads(dead)["attempts"] == 2
        assert json.loads(dead)["last_error"] == "RuntimeError: boom in input"
        assert await metric(live.client, 'tasks_put_back_total{reason="model_failed"}') == 1
        assert await metric(live.client, 'predictions_failed_total{mode="async"}') == 1
        # Put-backs are publishes too, counted where they went.
        delayed = 'broker_messages_published_total{routing_key="delay"}'
        assert await metric(live.client, delayed) == 1
        dead_copies = 'broker_messages_published_total{routing_key="dead"}'
        assert await metric(live.client, dead_copies) == 1


async def test_a_batch_back_after_a_crash_is_split_and_only_the_crasher_fails(
    rabbitmq_url: str,
) -> None:
    predictor = "tests.predictors:crashes_the_process_after_a_moment"
    settings = settings_for_test(rabbitmq_url, predictor=predictor, max_attempts=2)
    service = ServiceProcess(settings)
    await service.start()
    try:
        fine, crash, also_fine = await _publish_batch(settings, ["fine", "crash", "also fine"])
        # The batch's other tasks finish before "crash" kills the worker; the
        # batch comes back and goes back as three tasks, each charged that
        # attempt. "crash" then kills a worker alone: MAX_ATTEMPTS runs in
        # all, and the next start gives it up without running it.
        assert await service.wait_exit() == 3
        for _ in range(settings.max_attempts - 1):
            await service.start(wait_ready=False)
            assert await service.wait_exit() == 3
        await service.start()
        async with httpx.AsyncClient(base_url=service.base_url) as client:
            for prediction_id in (fine, also_fine):
                response = await wait_finished(client, prediction_id)
                assert response.json()["output"]["result"] == "1"
            response = await wait_finished(client, crash)
            assert response.status_code == 500
            error = "Prediction failed: the worker stopped during each of 2 attempts"
            assert response.json() == {"error": error}
            [dead] = await dead_letters(settings, 1)
            assert json.loads(dead)["prediction_id"] == crash
            # The worker goes on serving.
            follow_up = await submit_async(client, "after the crashes")
            assert (await wait_finished(client, follow_up)).status_code == 200
    finally:
        await service.stop()


async def test_an_outcome_unconfirmed_during_a_memory_alarm_is_kept_uncharged(
    throwaway_broker: Node, caplog: pytest.LogCaptureFixture
) -> None:
    # One attempt: a requeue while the alarm blocks the outcome's confirm
    # would make the broker dead-letter a task whose result is known. The
    # alarm blocks every client of its broker: hence a node of its own.
    settings = settings_for_test(
        throwaway_broker.url, predictor="tests.predictors:sleeps_as_told", max_attempts=1
    )
    async with live_app(settings) as live:
        ids = await _publish_batch(settings, ["0.5", "0.5", "0.5"])
        with anyio.fail_after(10):
            while await metric(live.client, "predictions_in_flight") < 3:
                await asyncio.sleep(0.02)
        with throwaway_broker.memory_alarm():
            # Each outcome waits out at least one unconfirmed publish.
            with anyio.fail_after(5 * settings.publish_timeout_s):
                while caplog.text.count("could not record an outcome") < len(ids):
                    await asyncio.sleep(0.1)
            for prediction_id in ids:
                # Computed here, but not on the stream: it counts only once there.
                response = await live.client.get(f"/predict/{prediction_id}")
                assert response.status_code == 400
        # Once the alarm is off, the outcomes reach the stream and the
        # batch is acked: never requeued, never run again.
        for prediction_id in ids:
            assert (await wait_finished(live.client, prediction_id)).status_code == 200
        messages = await _stream_messages(settings, enough=2 * len(ids) + 1)
        done = [e["prediction_id"] for m in messages for e in _events(m) if e["kind"] == "done"]
        assert sorted(done) == sorted(ids)
        assert await metric(live.client, "model_latency_seconds_count") == len(ids)
        assert await metric(live.client, 'tasks_put_back_total{reason="redelivered"}') == 0
        assert await metric(live.client, 'predictions_completed_total{mode="async"}') == 3
        assert await _dead_letter_count(settings) == 0


async def test_a_task_behind_a_busy_replica_goes_to_a_free_one_uncharged(
    rabbitmq_url: str,
) -> None:
    # Replica A's two slots are taken by one batch: it asks the broker for
    # nothing more, so a task sent now goes to replica B, which has room,
    # and runs at once. With one attempt, were that task charged for any
    # wait, the broker would dead-letter it.
    settings = settings_for_test(
        rabbitmq_url,
        predictor="tests.predictors:sleeps_as_told",
        model_concurrency=2,
        max_attempts=1,
    )
    async with live_app(settings) as busy:
        slow = await _publish_batch(settings, ["8", "8"])
        with anyio.fail_after(10):
            while await metric(busy.client, "predictions_in_flight") < 2:
                await asyncio.sleep(0.02)
        async with live_app(settings.with_changes(port=free_port())) as free:
            quick = await submit_async(free.client, "0")
            response = await wait_finished(free.client, quick)
            assert response.status_code == 200
            # Done while A's batch still runs.
            for prediction_id in slow:
                assert (await busy.client.get(f"/predict/{prediction_id}")).status_code == 400
            assert await metric(free.client, 'predictions_completed_total{mode="async"}') == 1
            # (Both replicas stay up until the end: the last one out deletes the queues.)
            for prediction_id in slow:
                assert (await wait_finished(busy.client, prediction_id)).status_code == 200
            assert await metric(busy.client, 'predictions_completed_total{mode="async"}') == 2
            assert await metric_total(busy.client, "tasks_put_back_total") == 0


async def test_a_burst_deeper_than_the_slots_runs_once_each_with_nothing_redelivered(
    rabbitmq_url: str,
) -> None:
    # Batches of many tasks, three slots: the worker keeps asking the broker
    # for what its free slots can run, consumer after consumer. Nothing
    # comes back from the broker counted (a consumer cancelled with credit
    # left would get its in-flight messages returned so), and each task
    # runs once.
    settings = settings_for_test(
        rabbitmq_url, predictor="tests.predictors:counts_calls", model_concurrency=3
    )
    async with live_app(settings) as live:
        inputs = [f"0.0{i % 10}-{i}" for i in range(120)]
        ids = await asyncio.gather(*(submit_async(live.client, text) for text in inputs))
        for prediction_id in ids:
            assert (await wait_finished(live.client, prediction_id)).status_code == 200
        assert predictors.calls == dict.fromkeys(inputs, 1)
        assert await metric(live.client, 'tasks_put_back_total{reason="redelivered"}') == 0
        assert live.services.worker.intake.consumers_started > 1


async def test_a_start_is_on_the_stream_only_for_a_run_that_lasts(rabbitmq_url: str) -> None:
    # A run told as started at once would add an event per task; one that
    # ends within START_TELL_AFTER_S is told by its outcome alone.
    settings = settings_for_test(rabbitmq_url, predictor="tests.predictors:sleeps_as_told")
    async with live_app(settings) as live:
        quick, lasting = [await submit_async(live.client, text) for text in ("0", "0.5")]
        for prediction_id in (quick, lasting):
            assert (await wait_finished(live.client, prediction_id)).status_code == 200
        messages = await _stream_messages(settings, enough=2 * 2 + 1)
        started = [e for m in messages for e in _events(m) if e["kind"] == "started"]
        assert [(e["prediction_id"], e["attempt"]) for e in started] == [(lasting, 1)]
        for prediction_id in (quick, lasting):  # the outcome tells the start either way
            status = (await live.client.get(f"/predict/{prediction_id}/status")).json()
            assert status["attempts"] == 1 and status["started_at"] is not None
