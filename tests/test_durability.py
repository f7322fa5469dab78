"""Nothing accepted is lost; any replica answers for any prediction.

Real `python -m service` processes against the real broker: killed,
stopped, restarted, cut off from the broker, and run side by side.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Iterable

import anyio
import httpx
import pytest

from service.broker import Names
from service.settings import Settings
from tests.support import (
    ServiceProcess,
    close_service_connections,
    dead_letters,
    free_port,
    metric,
    rabbitmqctl,
    settings_for_test,
    submit_async,
    wait_finished,
)


async def _submit_many(base_url: str, count: int) -> dict[str, str]:
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
        inputs = [f"task-{i}" for i in range(count)]
        ids = await asyncio.gather(*(submit_async(client, text) for text in inputs))
    return dict(zip(ids, inputs, strict=True))


async def _wait_running(base_url: str, timeout_s: float = 10) -> None:
    """Return once the model runs a prediction (the /metrics gauge says so)."""
    async with httpx.AsyncClient(base_url=base_url) as client:
        with anyio.fail_after(timeout_s):
            while await metric(client, "predictions_in_flight") < 1:
                await asyncio.sleep(0.02)


async def _assert_all_done(base_url: str, expected: dict[str, str], timeout_s: float = 40) -> None:
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
        for prediction_id, text in expected.items():
            response = await wait_finished(client, prediction_id, timeout_s)
            assert response.status_code == 200, response.text
            assert response.json()["output"]["input"] == text


async def test_kill_9_with_100_in_flight_loses_nothing(rabbitmq_url: str) -> None:
    settings = settings_for_test(rabbitmq_url, model_delay_min_s=1.0, model_delay_max_s=2.0)
    service = ServiceProcess(settings)
    await service.start()
    try:
        accepted = await _submit_many(service.base_url, 100)
        service.signal(signal.SIGKILL)
        await service.wait_exit()
        await service.start()
        await _assert_all_done(service.base_url, accepted)
    finally:
        await service.stop()


async def test_another_replica_answers_for_predictions_it_did_not_accept(
    rabbitmq_url: str,
) -> None:
    settings = settings_for_test(rabbitmq_url, model_delay_min_s=1.5, model_delay_max_s=1.6)
    first = ServiceProcess(settings)
    second = ServiceProcess(settings.with_changes(port=free_port()))
    await first.start()
    await second.start()
    try:
        async with httpx.AsyncClient(base_url=first.base_url) as on_first:
            prediction_id = await submit_async(on_first, "seen everywhere")
        async with httpx.AsyncClient(base_url=second.base_url) as on_second:
            with anyio.fail_after(1):  # the accepted event reaches the other replica
                while (await on_second.get(f"/predict/{prediction_id}")).status_code == 404:
                    await asyncio.sleep(0.01)
            pending = await on_second.get(f"/predict/{prediction_id}")
            assert pending.status_code == 400
            done = await wait_finished(on_second, prediction_id)
            assert done.status_code == 200
            assert done.json()["output"]["input"] == "seen everywhere"
    finally:
        await first.stop()
        await second.stop()


@pytest.mark.parametrize(
    ("delay_s", "grace_s", "left_over"),
    [
        (1.0, 10.0, False),  # in-flight tasks finish within the grace period
        (3.0, 0.5, True),  # they do not: left unacked for the next start
    ],
)
async def test_sigterm_with_predictions_in_flight_loses_nothing(
    rabbitmq_url: str, delay_s: float, grace_s: float, left_over: bool
) -> None:
    settings = settings_for_test(
        rabbitmq_url,
        model_delay_min_s=delay_s,
        model_delay_max_s=delay_s + 0.5,
        shutdown_grace_s=grace_s,
    )
    service = ServiceProcess(settings)
    await service.start()
    accepted = await _submit_many(service.base_url, 50)
    await _wait_running(service.base_url)
    service.signal(signal.SIGTERM)
    with anyio.fail_after(grace_s + 2):  # the grace period, not the model, bounds the stop
        assert await service.wait_exit() == -signal.SIGTERM
    assert ("left for redelivery" in service.log()) == left_over
    await service.start()
    try:
        await _assert_all_done(service.base_url, accepted)
    finally:
        await service.stop()


async def test_dropped_broker_connection_loses_nothing(rabbitmq_url: str) -> None:
    settings = settings_for_test(rabbitmq_url, model_delay_min_s=0.5, model_delay_max_s=1.0)
    service = ServiceProcess(settings)
    await service.start()
    try:
        accepted = await _submit_many(service.base_url, 100)
        await _wait_running(service.base_url)  # the connection drops under running tasks
        assert close_service_connections(settings) == 1
        async with httpx.AsyncClient(base_url=service.base_url, timeout=10) as client:
            # Sync predictions do not need the broker and keep working.
            assert (await client.post("/predict", json={"input": "sync"})).status_code == 200
            # Async ones answer 503 at once while it is down, and work again after.
            with anyio.fail_after(15):
                while True:
                    response = await client.post(
                        "/predict", json={"input": "later"}, headers={"Async-Mode": "true"}
                    )
                    assert response.status_code in (202, 503)
                    if response.status_code == 202:
                        accepted[response.json()["prediction_id"]] = "later"
                        break
                    assert response.headers["retry-after"]
                    await asyncio.sleep(0.1)
        await _assert_all_done(service.base_url, accepted)
    finally:
        await service.stop()


async def _statuses(client: httpx.AsyncClient, prediction_ids: Iterable[str]) -> list[int]:
    return [(await client.get(f"/predict/{i}")).status_code for i in prediction_ids]


async def test_results_survive_a_full_restart_until_the_ttl(rabbitmq_url: str) -> None:
    settings = settings_for_test(rabbitmq_url, result_ttl_s=4)
    service = ServiceProcess(settings)
    await service.start()
    # Results expire RESULT_TTL_S after their last change: their outcome,
    # written between these two instants (the service's clock is time.time too).
    submitted_s = time.time()
    accepted = await _submit_many(service.base_url, 5)
    await _assert_all_done(service.base_url, accepted)
    done_s = time.time()
    await service.stop()
    await service.start()
    try:
        async with httpx.AsyncClient(base_url=service.base_url) as client:
            for prediction_id in accepted:
                assert (await client.get(f"/predict/{prediction_id}")).status_code == 200
            kept_until_s = submitted_s + settings.result_ttl_s  # none is gone before
            gone_by_s = done_s + settings.result_ttl_s  # all are gone after
            with anyio.fail_after(max(gone_by_s - time.time(), 0) + 2):
                while True:
                    statuses = await _statuses(client, accepted)
                    assert set(statuses) <= {200, 404}, statuses
                    if 404 in statuses:
                        assert time.time() >= kept_until_s, "a result expired before its TTL"
                    if statuses == [404] * len(accepted):
                        break
                    await asyncio.sleep(0.1)
    finally:
        await service.stop()
    await service.start()
    try:
        async with httpx.AsyncClient(base_url=service.base_url) as client:
            for prediction_id in accepted:
                assert (await client.get(f"/predict/{prediction_id}")).status_code == 404
    finally:
        await service.stop()


async def test_a_task_that_keeps_crashing_its_worker_ends_dead_lettered_and_failed(
    rabbitmq_url: str,
) -> None:
    settings = settings_for_test(
        rabbitmq_url, predictor="tests.predictors:crashes_the_process", max_attempts=2
    )
    service = ServiceProcess(settings)
    await service.start()
    try:
        async with httpx.AsyncClient(base_url=service.base_url) as client:
            prediction_id = await submit_async(client, "crash")
        # Every start takes the task again and dies on it, until the broker gives up.
        for _ in range(settings.max_attempts - 1):
            assert await service.wait_exit() == 3
            await service.start(wait_ready=False)
        assert await service.wait_exit() == 3
        await service.start()
        async with httpx.AsyncClient(base_url=service.base_url) as client:
            response = await wait_finished(client, prediction_id)
            assert response.status_code == 500
            assert "set aside by the broker (delivery_limit)" in response.json()["error"]
            [dead] = await dead_letters(settings, 1)
            assert json.loads(dead)["prediction_id"] == prediction_id
            # The worker goes on serving.
            follow_up = await submit_async(client, "fine")
            assert (await wait_finished(client, follow_up)).status_code == 200
    finally:
        await service.stop()


def _task_consumers(settings: Settings) -> int:
    vhost = settings.rabbitmq_url.rsplit("/", 1)[1]
    listing = rabbitmqctl("list_consumers", "-p", vhost, "queue_name", "--no-table-headers")
    tasks = Names.for_namespace(settings.broker_namespace).tasks
    return sum(1 for line in listing.splitlines() if line.split("\t")[0] == tasks)


async def test_sigterm_stops_taking_tasks_before_http_requests_drain(rabbitmq_url: str) -> None:
    settings = settings_for_test(rabbitmq_url, predictor="tests.predictors:sleeps_as_told")
    service = ServiceProcess(settings)
    await service.start()
    assert _task_consumers(settings) == 1
    async with httpx.AsyncClient(base_url=service.base_url, timeout=10) as client:
        # A 3 s sync prediction keeps uvicorn draining connections after SIGTERM.
        sync = asyncio.create_task(client.post("/predict", json={"input": "3"}))
        await _wait_running(service.base_url)
        service.signal(signal.SIGTERM)
        with anyio.fail_after(2.5):  # the task consumer goes well before the 3 s prediction
            while await anyio.to_thread.run_sync(_task_consumers, settings) != 0:
                await asyncio.sleep(0.05)
        # ... and the HTTP request has not drained yet.
        assert not sync.done()
        assert service.process is not None and service.process.poll() is None
        response = await sync
    assert response.json() == {"input": "3", "result": "3"}
    assert await service.wait_exit() == -signal.SIGTERM


async def test_a_sync_prediction_cut_off_by_the_grace_period_answers_json_503(
    rabbitmq_url: str,
) -> None:
    settings = settings_for_test(
        rabbitmq_url, predictor="tests.predictors:sleeps_as_told", shutdown_grace_s=1
    )
    service = ServiceProcess(settings)
    await service.start()
    async with httpx.AsyncClient(base_url=service.base_url, timeout=10) as client:
        sync = asyncio.create_task(client.post("/predict", json={"input": "30"}))
        await _wait_running(service.base_url)
        assert not sync.done()
        service.signal(signal.SIGTERM)
        with anyio.fail_after(5):  # the grace period, not the 30 s model
            response = await sync
    assert response.status_code == 503
    assert response.headers["content-type"] == "application/json"
    assert response.headers["retry-after"]
    assert response.json() == {"error": "The service stopped before the model answered; retry."}
    assert await service.wait_exit() == -signal.SIGTERM
    assert "Exception in ASGI application" not in service.log()
