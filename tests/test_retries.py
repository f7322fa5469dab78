"""Retries that wait, in the broker, and attempts counted once: against the live broker."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid

import anyio
import pytest

from service.schemas import Accepted, TaskBatch
from tests import predictors
from tests.support import (
    dead_letters,
    free_port,
    live_app,
    metric,
    publish_tasks,
    settings_for_test,
    submit_async,
    wait_finished,
)

FLAKY = "tests.predictors:fails_first_time"


async def _until_called(text: str, times: int) -> None:
    with anyio.fail_after(10):
        while len(predictors.call_times.get(text, [])) < times:
            await asyncio.sleep(0.01)


async def test_a_failed_attempt_is_retried_after_its_backoff_without_a_slot(
    rabbitmq_url: str,
) -> None:
    # One model slot. While "flaky" waits out its backoff, "steady" (which
    # fails once too, then answers) gets the slot: the wait holds none.
    backoff_s = 0.8
    settings = settings_for_test(
        rabbitmq_url, predictor=FLAKY, model_concurrency=1, retry_backoff_s=backoff_s
    )
    async with live_app(settings) as live:
        flaky = await submit_async(live.client, "flaky")
        await _until_called("flaky", 1)
        steady = await submit_async(live.client, "steady")
        await _until_called("steady", 1)
        response = await wait_finished(live.client, flaky)
        assert response.json()["output"]["result"] == "2"
        assert (await wait_finished(live.client, steady)).status_code == 200
    first, second = predictors.call_times["flaky"]
    # The backoff, give or take its jitter (25 %), and not much more.
    assert 0.75 * backoff_s <= second - first <= 1.25 * backoff_s + 1.0
    assert predictors.call_times["steady"][0] < second


async def test_a_retry_waiting_in_the_broker_survives_a_restart(rabbitmq_url: str) -> None:
    settings = settings_for_test(rabbitmq_url, predictor=FLAKY, retry_backoff_s=1.5)
    async with live_app(settings, keep_namespace=True) as first:
        prediction_id = await submit_async(first.client, "restarted")
        await _until_called("restarted", 1)
        with anyio.fail_after(5):
            while await metric(first.client, 'tasks_put_back_total{reason="model_failed"}') < 1:
                await asyncio.sleep(0.02)
    # Nothing of this replica is left: the wait is a message in a delay queue.
    async with live_app(settings.with_changes(port=free_port())) as second:
        response = await wait_finished(second.client, prediction_id)
        assert response.status_code == 200, response.text
        assert response.json()["output"]["result"] == "2"
    first_call, second_call = predictors.call_times["restarted"]
    assert second_call - first_call >= 0.75 * 1.5


async def test_a_task_that_always_fails_runs_exactly_max_attempts_times(
    rabbitmq_url: str,
) -> None:
    settings = settings_for_test(
        rabbitmq_url, predictor="tests.predictors:counts_then_fails", max_attempts=3
    )
    async with live_app(settings) as live:
        alone = await submit_async(live.client, "alone")
        batch = [Accepted(str(uuid.uuid4()), f"in a batch {i}", 1e10) for i in range(3)]
        await publish_tasks(settings, TaskBatch(batch))
        for prediction_id in [alone, *(task.prediction_id for task in batch)]:
            response = await wait_finished(live.client, prediction_id)
            assert response.status_code == 500
            assert "ConnectionError: no model for" in response.json()["error"]
        assert predictors.calls == {"alone": 3, **{task.input: 3 for task in batch}}
        dead = [json.loads(body) for body in await dead_letters(settings, 4)]
        assert sorted(d["attempts"] for d in dead) == [3, 3, 3, 3]
        assert await metric(live.client, 'tasks_put_back_total{reason="model_failed"}') == 8
        assert await metric(live.client, 'predictions_failed_total{mode="async"}') == 4


async def test_each_failed_attempt_is_logged_with_its_error_and_traceback(
    rabbitmq_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="service.consumer")
    settings = settings_for_test(rabbitmq_url, predictor=FLAKY)
    async with live_app(settings) as live:
        prediction_id = await submit_async(live.client, "logged")
        assert (await wait_finished(live.client, prediction_id)).status_code == 200
    [warning] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.getMessage() == (
        "model failed on attempt 1: ConnectionError: model server hiccup"
    )
    [debug] = [r for r in caplog.records if r.levelno == logging.DEBUG and r.exc_info]
    assert debug.exc_info is not None
    assert isinstance(debug.exc_info[1], ConnectionError)
    assert getattr(debug, "prediction_id", None) == prediction_id


async def test_no_backoff_retries_at_once(rabbitmq_url: str) -> None:
    settings = settings_for_test(rabbitmq_url, predictor=FLAKY, retry_backoff_s=0)
    async with live_app(settings) as live:
        prediction_id = await submit_async(live.client, "at once")
        response = await wait_finished(live.client, prediction_id)
        assert response.status_code == 200, response.text
        assert response.json()["output"]["result"] == "2"
        delayed = 'broker_messages_published_total{routing_key="delay"}'
        assert await metric(live.client, delayed) == 0
