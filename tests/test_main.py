"""`python -m service` as an operator starts it."""

from __future__ import annotations

import signal

import httpx

from tests.support import (
    ServiceProcess,
    delete_namespace,
    free_port,
    settings_for_test,
    submit_async,
    wait_finished,
)


async def test_bad_predictor_exits_at_start_with_one_line(rabbitmq_url: str) -> None:
    service = ServiceProcess(settings_for_test(rabbitmq_url, predictor="nowhere.at.all:predict"))
    await service.start(wait_ready=False)
    assert await service.wait_exit(timeout_s=15) != 0
    lines = service.log().strip().splitlines()
    assert lines == [
        "error: PREDICTOR='nowhere.at.all:predict': cannot import 'nowhere.at.all': "
        "No module named 'nowhere'"
    ]


async def test_unreachable_broker_exits_after_the_connect_timeout(rabbitmq_url: str) -> None:
    nowhere = f"amqp://guest:secret@127.0.0.1:{free_port()}/"
    service = ServiceProcess(settings_for_test(nowhere, broker_connect_timeout_s=1))
    await service.start(wait_ready=False)
    assert await service.wait_exit(timeout_s=20) == 1
    last_line = service.log().strip().splitlines()[-1]
    assert last_line.startswith("error: cannot reach RabbitMQ at amqp://guest:***@127.0.0.1")
    assert "secret" not in service.log()


async def test_serves_predictions_and_stops_cleanly_on_sigterm(rabbitmq_url: str) -> None:
    service = ServiceProcess(settings_for_test(rabbitmq_url))
    await service.start()
    try:
        async with httpx.AsyncClient(base_url=service.base_url) as client:
            sync = await client.post("/predict", json={"input": "hi"})
            assert sync.status_code == 200
            prediction_id = await submit_async(client, "hello")
            assert (await wait_finished(client, prediction_id)).status_code == 200
    finally:
        service.signal(signal.SIGTERM)
    # uvicorn re-raises SIGTERM after a graceful shutdown.
    assert await service.wait_exit() == -signal.SIGTERM


async def test_changed_queue_arguments_stop_the_start_with_one_line(rabbitmq_url: str) -> None:
    settings = settings_for_test(rabbitmq_url, max_attempts=3)
    first = ServiceProcess(settings)
    await first.start()
    await first.stop()
    changed = ServiceProcess(settings.with_changes(max_attempts=5))
    await changed.start(wait_ready=False)
    assert await changed.wait_exit() == 1
    last_line = changed.log().strip().splitlines()[-1]
    assert "was RESULT_TTL_S or MAX_ATTEMPTS changed?" in last_line
    await delete_namespace(settings)
