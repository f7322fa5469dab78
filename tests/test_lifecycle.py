"""The prediction lifecycle (shared/API.md): status and cancel, against the live broker.

GET /predict/{id}/status tells the whole story of a prediction, the same on
every replica; POST /predict/{id}/cancel stops it whether it waits in line
or runs, on whichever replica runs it, and afterwards GET /predict/{id}
answers 410 (a waiting long poll too). A cancel racing the model's answer
ends one way or the other, the same everywhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import httpx
import pytest
from yarl import URL

from service.broker import Names
from service.settings import Settings
from tests import predictors
from tests.support import (
    LiveApp,
    free_port,
    live_app,
    metric,
    rabbitmqctl,
    settings_for_test,
    submit_async,
    wait_finished,
)

STATUS_KEYS = [
    "prediction_id",
    "status",
    "input",
    "result",
    "error",
    "created_at",
    "started_at",
    "completed_at",
    "attempts",
    "queued_ahead",
]
TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
NOT_FOUND = {"error": "Prediction ID not found."}
CANCELED = {"error": "Prediction was canceled."}
COUNTS = "tests.predictors:counts_calls"
NOTES = "tests.predictors:notes_cancellation"

Status = dict[str, Any]


@pytest.fixture(autouse=True)
def fresh_lifecycle_predictors() -> None:
    predictors.started_at.clear()
    predictors.cancelled.clear()
    predictors.blocking_done.clear()
    predictors.blocking_most_at_once = 0


# -- helpers -------------------------------------------------------------------


async def status_of(client: httpx.AsyncClient, prediction_id: str) -> Status:
    response = await client.get(f"/predict/{prediction_id}/status")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    body: Status = response.json()
    return body


async def cancel(client: httpx.AsyncClient, prediction_id: str) -> Status:
    response = await client.post(f"/predict/{prediction_id}/cancel")
    assert response.status_code == 200, response.text
    body: Status = response.json()
    return body


async def until(condition: Callable[[], Awaitable[bool]], timeout_s: float = 10) -> None:
    with anyio.fail_after(timeout_s):
        while not await condition():
            await asyncio.sleep(0.02)


async def until_status(
    client: httpx.AsyncClient, prediction_id: str, wanted: str, timeout_s: float = 10
) -> Status:
    with anyio.fail_after(timeout_s):
        while (status := await status_of(client, prediction_id))["status"] != wanted:
            await asyncio.sleep(0.02)
    return status


async def until_model_started(text: str, timeout_s: float = 10) -> float:
    """When `notes_cancellation` began on `text` (time.monotonic())."""
    with anyio.fail_after(timeout_s):
        while text not in predictors.started_at:
            await asyncio.sleep(0.005)
    return predictors.started_at[text]


async def until_model_cancelled(text: str, timeout_s: float = 5) -> None:
    with anyio.fail_after(timeout_s):
        while text not in predictors.cancelled:
            await asyncio.sleep(0.01)


def parse_time(text: str) -> datetime:
    assert TIME.fullmatch(text), text
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


def assert_recent(text: str) -> None:
    """A time of this test's, in UTC (not local time, not seconds since anything else)."""
    assert abs(datetime.now(UTC) - parse_time(text)) < timedelta(minutes=2), text


async def work_queue_is_empty(settings: Settings) -> bool:
    """No task message left on the work queue, ready or delivered and unacked."""
    vhost = URL(settings.rabbitmq_url).path.lstrip("/")
    tasks = Names.for_namespace(settings.broker_namespace).tasks
    listing = await anyio.to_thread.run_sync(
        rabbitmqctl, "list_queues", "-p", vhost, "name", "messages", "--no-table-headers"
    )
    counts = dict(line.split("\t") for line in listing.splitlines() if "\t" in line)
    return counts.get(tasks) == "0"


@contextlib.asynccontextmanager
async def two_replicas(settings: Settings) -> AsyncIterator[tuple[LiveApp, LiveApp]]:
    """Two replicas of one namespace, in this process (so the test sees their models)."""
    async with (
        live_app(settings) as first,
        live_app(settings.with_changes(port=free_port()), keep_namespace=True) as second,
    ):
        yield first, second


# -- status ----------------------------------------------------------------------


async def test_a_queued_prediction_counts_those_ahead_of_it_as_the_line_moves(
    rabbitmq_url: str,
) -> None:
    # One model slot: the first runs 1 s, the next three wait their turn (0.3 s each).
    settings = settings_for_test(rabbitmq_url, predictor=COUNTS, model_concurrency=1)
    async with live_app(settings) as live:
        first = await submit_async(live.client, "1.0-first")
        line = [await submit_async(live.client, f"0.3-{i}") for i in range(3)]
        assert (await until_status(live.client, first, "processing"))["queued_ahead"] is None
        for ahead, prediction_id in enumerate(line):
            status = await status_of(live.client, prediction_id)
            assert status["status"] == "queued"
            assert status["queued_ahead"] == ahead
            assert status["started_at"] is None
            assert status["completed_at"] is None
            assert status["attempts"] == 0
            assert status["result"] is None and status["error"] is None
        # The last one's place falls, 2, 1, 0, until it runs.
        seen: list[int] = []
        with anyio.fail_after(10):
            while (status := await status_of(live.client, line[-1]))["status"] == "queued":
                if not seen or seen[-1] != status["queued_ahead"]:
                    seen.append(status["queued_ahead"])
                await asyncio.sleep(0.02)
        assert seen == [2, 1, 0]
        assert status["status"] == "processing"
        assert status["queued_ahead"] is None
        assert status["attempts"] == 1
        assert status["started_at"] is not None and status["completed_at"] is None
        assert (await wait_finished(live.client, line[-1])).status_code == 200


async def test_status_times_are_in_order_and_rfc3339_with_milliseconds(
    rabbitmq_url: str,
) -> None:
    async with live_app(settings_for_test(rabbitmq_url)) as live:
        prediction_id = await submit_async(live.client, "timed")
        response = await wait_finished(live.client, prediction_id)
        assert response.status_code == 200
        status = await status_of(live.client, prediction_id)
        assert status["prediction_id"] == prediction_id
        assert status["status"] == "succeeded"
        assert status["input"] == "timed"
        assert status["result"] == response.json()["output"]["result"]
        assert status["error"] is None
        assert status["attempts"] == 1
        assert status["queued_ahead"] is None
        created, started, completed = (
            parse_time(status[key]) for key in ("created_at", "started_at", "completed_at")
        )
        assert created <= started <= completed
        assert_recent(status["created_at"])


async def test_a_failed_prediction_tells_its_error_and_every_attempt(rabbitmq_url: str) -> None:
    settings = settings_for_test(
        rabbitmq_url, predictor="tests.predictors:always_fails", max_attempts=2, retry_backoff_s=0
    )
    async with live_app(settings) as live:
        prediction_id = await submit_async(live.client, "doomed")
        response = await wait_finished(live.client, prediction_id)
        assert response.status_code == 500
        status = await status_of(live.client, prediction_id)
        assert status["status"] == "failed"
        assert status["attempts"] == 2
        assert status["result"] is None
        assert status["error"] == "ValueError: cannot predict 'doomed'"
        assert response.json() == {"error": f"Prediction failed: {status['error']}"}
        assert status["queued_ahead"] is None
        created, started, completed = (
            parse_time(status[key]) for key in ("created_at", "started_at", "completed_at")
        )
        assert created <= started <= completed


async def test_started_at_is_the_first_run_and_stays_so_after_a_retry(rabbitmq_url: str) -> None:
    # The first run fails, the second (0.5 s later) answers. started_at is when
    # the prediction's first run began: once told, it does not move.
    settings = settings_for_test(
        rabbitmq_url, predictor="tests.predictors:fails_first_time", retry_backoff_s=0.5
    )
    async with live_app(settings) as live:
        prediction_id = await submit_async(live.client, "retried")
        running = await until_status(live.client, prediction_id, "processing")
        assert (await wait_finished(live.client, prediction_id)).status_code == 200
        status = await status_of(live.client, prediction_id)
        assert status["status"] == "succeeded"
        assert status["attempts"] == 2
        assert status["started_at"] == running["started_at"], (running, status)
        assert status["created_at"] == running["created_at"]


async def test_the_status_body_has_exactly_its_keys_in_order(rabbitmq_url: str) -> None:
    settings = settings_for_test(rabbitmq_url, predictor=NOTES, model_concurrency=1)
    async with live_app(settings) as live:
        running = await submit_async(live.client, "30-running")
        queued = await submit_async(live.client, "0.01-queued")
        await until_status(live.client, running, "processing")
        bodies = [await live.client.get(f"/predict/{i}/status") for i in (running, queued)]
        await cancel(live.client, running)
        assert (await wait_finished(live.client, queued)).status_code == 200
        bodies += [await live.client.get(f"/predict/{i}/status") for i in (running, queued)]
    statuses = []
    for response in bodies:
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/json"
        pairs: list[tuple[str, object]] = json.loads(
            response.content, object_pairs_hook=lambda pairs: pairs
        )
        assert [key for key, _ in pairs] == STATUS_KEYS, response.text
        statuses.append(dict(pairs)["status"])
    assert statuses == ["processing", "queued", "canceled", "succeeded"]


@pytest.mark.parametrize("prediction_id", [str(uuid.uuid4()), "not-a-uuid", "x" * 300])
async def test_status_and_cancel_of_an_unknown_id_are_404(
    live: LiveApp, prediction_id: str
) -> None:
    status = await live.client.get(f"/predict/{prediction_id}/status")
    assert (status.status_code, status.json()) == (404, NOT_FOUND)
    canceled = await live.client.post(f"/predict/{prediction_id}/cancel")
    assert (canceled.status_code, canceled.json()) == (404, NOT_FOUND)


async def test_the_lifecycle_routes_answer_405_to_a_method_they_do_not_take(
    live: LiveApp,
) -> None:
    # A cancel sent as a GET must not be read as GET /predict/{id} of an id
    # holding "/cancel": that 404 would say a prediction that exists does not.
    prediction_id = await submit_async(live.client, "exists")
    for method, path, allowed in [
        ("GET", f"/predict/{prediction_id}/cancel", "POST"),
        ("DELETE", f"/predict/{prediction_id}/cancel", "POST"),
        ("POST", f"/predict/{prediction_id}/status", "GET"),
    ]:
        response = await live.client.request(method, path)
        assert response.status_code == 405, (method, path, response.text)
        assert response.json() == {"error": "Method Not Allowed"}
        assert allowed in response.headers["allow"]


# -- cancel ------------------------------------------------------------------------


async def test_a_prediction_canceled_while_queued_never_runs(rabbitmq_url: str) -> None:
    settings = settings_for_test(rabbitmq_url, predictor=COUNTS, model_concurrency=1)
    async with live_app(settings) as live:
        blocker = await submit_async(live.client, "1.0-blocker")
        skipped = await submit_async(live.client, "0.05-skipped")
        await until_status(live.client, blocker, "processing")
        assert (await status_of(live.client, skipped))["status"] == "queued"
        answer = await cancel(live.client, skipped)
        assert answer["status"] == "canceled"
        assert answer["prediction_id"] == skipped
        assert answer["input"] == "0.05-skipped"
        assert answer["result"] is None and answer["error"] is None
        assert answer["started_at"] is None
        assert answer["attempts"] == 0
        assert answer["queued_ahead"] is None
        assert parse_time(answer["created_at"]) <= parse_time(answer["completed_at"])
        assert await status_of(live.client, skipped) == answer
        response = await live.client.get(f"/predict/{skipped}")
        assert (response.status_code, response.json()) == (410, CANCELED)
        # The line reaches it, and passes it by: one after it runs, and the
        # work queue is left empty, its message taken without a model run.
        after = await submit_async(live.client, "0.05-after")
        assert (await wait_finished(live.client, blocker)).status_code == 200
        assert (await wait_finished(live.client, after)).status_code == 200
        await until(lambda: work_queue_is_empty(settings), timeout_s=20)
        assert predictors.calls == {"1.0-blocker": 1, "0.05-after": 1}
        assert await status_of(live.client, skipped) == answer
        assert (await live.client.get(f"/predict/{skipped}")).status_code == 410


async def test_a_running_prediction_canceled_stops_its_model_and_frees_its_slot(
    rabbitmq_url: str,
) -> None:
    settings = settings_for_test(rabbitmq_url, predictor=NOTES, model_concurrency=1)
    async with live_app(settings) as live:
        long = await submit_async(live.client, "30-long")
        await until_model_started("30-long")
        await until_status(live.client, long, "processing")
        answer = await cancel(live.client, long)
        assert answer["status"] == "canceled"
        assert answer["attempts"] == 1
        assert answer["result"] is None and answer["error"] is None
        created, started, completed = (
            parse_time(answer[key]) for key in ("created_at", "started_at", "completed_at")
        )
        assert created <= started <= completed
        await until_model_cancelled("30-long")
        # Its slot is free: the next one runs at once, not 30 s from now.
        next_one = await submit_async(live.client, "0.05-next")
        assert (await wait_finished(live.client, next_one, timeout_s=5)).status_code == 200
        assert await metric(live.client, "model_runs_canceled_total") == 1
        assert await metric(live.client, "predictions_canceled_total") == 1
        response = await live.client.get(f"/predict/{long}")
        assert (response.status_code, response.json()) == (410, CANCELED)
        assert await status_of(live.client, long) == answer
    assert predictors.cancelled == ["30-long"]


async def test_a_blocking_model_canceled_runs_on_but_its_answer_is_discarded(
    rabbitmq_url: str,
) -> None:
    settings = settings_for_test(
        rabbitmq_url, predictor="tests.predictors:blocks_as_told", model_concurrency=1
    )
    async with live_app(settings) as live:
        blocking = await submit_async(live.client, "1.0-blocking")
        await until_status(live.client, blocking, "processing")
        answer = await cancel(live.client, blocking)
        assert answer["status"] == "canceled"
        # Its thread cannot be stopped: it answers, and the answer is thrown away.
        # Until it returns it holds the one model slot (README: "its slot frees
        # when the function returns"): MODEL_CONCURRENCY=1 still means one call.
        next_one = await submit_async(live.client, "0.01-next")
        assert (await wait_finished(live.client, next_one, timeout_s=5)).status_code == 200
        assert predictors.blocking_most_at_once == 1
        assert predictors.blocking_done == ["1.0-blocking", "0.01-next"]
        assert await status_of(live.client, blocking) == answer
        response = await live.client.get(f"/predict/{blocking}")
        assert (response.status_code, response.json()) == (410, CANCELED)
        assert await metric(live.client, 'predictions_completed_total{mode="async"}') == 1
        assert await metric(live.client, "predictions_canceled_total") == 1


async def test_a_cancel_on_one_replica_stops_the_run_on_another(rabbitmq_url: str) -> None:
    settings = settings_for_test(rabbitmq_url, predictor=NOTES, model_concurrency=1)
    async with live_app(settings) as runner:
        long = await submit_async(runner.client, "30-elsewhere")
        await until_model_started("30-elsewhere")
        await until_status(runner.client, long, "processing")
        # The second replica starts once the first has taken the task: the run is the first's.
        other = settings.with_changes(port=free_port())
        async with live_app(other, keep_namespace=True) as canceler:
            assert (await status_of(canceler.client, long))["status"] == "processing"
            answer = await cancel(canceler.client, long)
            assert answer["status"] == "canceled"
            await until_model_cancelled("30-elsewhere")
            assert await metric(runner.client, "model_runs_canceled_total") == 1
            assert await metric(canceler.client, "model_runs_canceled_total") == 0
            assert await metric(canceler.client, "predictions_canceled_total") == 1
            assert await metric(runner.client, "predictions_canceled_total") == 0
            for replica in (runner, canceler):
                assert await status_of(replica.client, long) == answer
                response = await replica.client.get(f"/predict/{long}")
                assert (response.status_code, response.json()) == (410, CANCELED)
            # The runner's slot is free again.
            next_one = await submit_async(runner.client, "0.05-next")
            assert (await wait_finished(runner.client, next_one, timeout_s=5)).status_code == 200
    assert predictors.cancelled == ["30-elsewhere"]


async def test_a_cancel_after_the_end_changes_nothing(rabbitmq_url: str) -> None:
    async with live_app(settings_for_test(rabbitmq_url)) as live:
        prediction_id = await submit_async(live.client, "finished")
        done = await wait_finished(live.client, prediction_id)
        assert done.status_code == 200
        before = await status_of(live.client, prediction_id)
        assert before["status"] == "succeeded"
        assert await cancel(live.client, prediction_id) == before
        assert await cancel(live.client, prediction_id) == before
        assert await status_of(live.client, prediction_id) == before
        after = await live.client.get(f"/predict/{prediction_id}")
        assert (after.status_code, after.content) == (200, done.content)
        assert await metric(live.client, "predictions_canceled_total") == 0


async def test_a_waiting_long_poll_wakes_with_410_when_canceled(rabbitmq_url: str) -> None:
    settings = settings_for_test(rabbitmq_url, predictor=NOTES, max_wait_s=30)
    async with live_app(settings) as live:
        prediction_id = await submit_async(live.client, "30-polled")
        await until_model_started("30-polled")
        poll = asyncio.create_task(
            live.client.get(f"/predict/{prediction_id}", headers={"Prefer": "wait=20"})
        )
        try:
            await until(lambda: _long_polls_waiting(live, 1))
            canceled_at = time.monotonic()
            await cancel(live.client, prediction_id)
            with anyio.fail_after(5):
                response = await poll
        finally:
            poll.cancel()
        assert time.monotonic() - canceled_at < 3
        assert (response.status_code, response.json()) == (410, CANCELED)
        await until_model_cancelled("30-polled")


async def _long_polls_waiting(live: LiveApp, count: int) -> bool:
    return await metric(live.client, "long_polls_waiting") == count


# The model answers 0.3 s after it begins; the cancel comes this long after.
RACE_OFFSETS_S = [0.22, 0.28, 0.3, 0.32, 0.38]


async def test_a_cancel_racing_the_answer_ends_the_same_on_every_replica(
    rabbitmq_url: str,
) -> None:
    settings = settings_for_test(rabbitmq_url, predictor=NOTES)
    async with two_replicas(settings) as replicas:
        for round_, offset_s in enumerate(RACE_OFFSETS_S):
            text = f"0.3-race{round_}"
            prediction_id = await submit_async(replicas[0].client, text)
            began = await until_model_started(text)
            await asyncio.sleep(max(0.0, began + offset_s - time.monotonic()))
            answer = await cancel(replicas[round_ % 2].client, prediction_id)
            assert answer["status"] in ("succeeded", "canceled"), answer
            expected_code = 200 if answer["status"] == "succeeded" else 410
            for replica in replicas:
                response = await wait_finished(replica.client, prediction_id)
                assert response.status_code == expected_code, (answer, response.text)
                assert await status_of(replica.client, prediction_id) == answer
            if answer["status"] == "succeeded":
                assert answer["result"] == text
                assert text not in predictors.cancelled  # the model answered, uninterrupted
            else:
                assert answer["result"] is None


async def test_the_canceled_predictions_metric_counts_the_cancels_that_canceled(
    rabbitmq_url: str,
) -> None:
    settings = settings_for_test(rabbitmq_url, predictor=NOTES, model_concurrency=1)
    async with live_app(settings) as live:
        finished = await submit_async(live.client, "0.01-finished")
        assert (await wait_finished(live.client, finished)).status_code == 200
        running = await submit_async(live.client, "30-running")
        queued = [await submit_async(live.client, f"30-queued{i}") for i in range(2)]
        await until_status(live.client, running, "processing")
        assert await metric(live.client, "predictions_canceled_total") == 0
        for prediction_id in queued:
            assert (await cancel(live.client, prediction_id))["status"] == "canceled"
        assert await metric(live.client, "predictions_canceled_total") == 2
        assert (await cancel(live.client, running))["status"] == "canceled"
        assert await metric(live.client, "predictions_canceled_total") == 3
        # Cancels that change nothing are not counted: a repeat, a finished one.
        await cancel(live.client, running)
        await cancel(live.client, queued[0])
        await cancel(live.client, finished)
        assert await metric(live.client, "predictions_canceled_total") == 3
        await until_model_cancelled("30-running")
        assert await metric(live.client, "model_runs_canceled_total") == 1
    assert predictors.cancelled == ["30-running"]
