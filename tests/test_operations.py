"""Operating the service: long polling, readiness, metrics and logs."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from pathlib import Path

import anyio
import httpx

from tests.support import (
    LiveApp,
    ServiceProcess,
    close_service_connections,
    free_port,
    live_app,
    metric,
    settings_for_test,
    submit_async,
    wait_finished,
)


async def test_long_poll_answers_as_soon_as_the_prediction_is_done(rabbitmq_url: str) -> None:
    settings = settings_for_test(rabbitmq_url, model_delay_min_s=0.5, model_delay_max_s=0.6)
    async with live_app(settings) as live:
        prediction_id = await submit_async(live.client, "waited for")
        started_s = time.monotonic()
        response = await live.client.get(f"/predict/{prediction_id}", headers={"Prefer": "wait=5"})
        elapsed_s = time.monotonic() - started_s
    assert response.status_code == 200
    assert response.json()["output"]["input"] == "waited for"
    assert response.headers["preference-applied"] == "wait=5"
    assert 0.3 < elapsed_s < 2  # it waited for the model, not for the 5 s


async def test_long_poll_is_capped_by_max_wait(rabbitmq_url: str) -> None:
    settings = settings_for_test(
        rabbitmq_url, model_delay_min_s=3, model_delay_max_s=3, max_wait_s=0.5
    )
    async with live_app(settings) as live:
        prediction_id = await submit_async(live.client, "slow")
        with anyio.fail_after(2):
            response = await live.client.get(
                f"/predict/{prediction_id}", headers={"Prefer": "wait=30"}
            )
    assert response.status_code == 400
    assert response.json() == {"error": "Prediction is still being processed."}
    assert response.headers["preference-applied"] == "wait=0.5"


async def test_long_poll_of_an_unknown_id_answers_404_at_once(live: LiveApp) -> None:
    with anyio.fail_after(1):
        response = await live.client.get("/predict/nope", headers={"Prefer": "wait=10"})
    assert response.status_code == 404


async def test_malformed_wait_preferences_are_ignored(live: LiveApp) -> None:
    prediction_id = await submit_async(live.client, "x")
    for prefer in ("wait=soon", "wait=-1", "wait=nan", "wait"):
        with anyio.fail_after(1):
            response = await live.client.get(
                f"/predict/{prediction_id}", headers={"Prefer": prefer}
            )
        assert response.status_code in (200, 400)
        assert "preference-applied" not in response.headers


async def test_long_poll_on_another_replica_wakes_on_the_streamed_result(
    rabbitmq_url: str,
) -> None:
    settings = settings_for_test(rabbitmq_url, model_delay_min_s=0.5, model_delay_max_s=0.6)
    async with live_app(settings) as first:
        other = settings.with_changes(port=free_port())
        async with live_app(other) as second:
            prediction_id = await submit_async(first.client, "cross replica")
            with anyio.fail_after(5):
                while (await second.client.get(f"/predict/{prediction_id}")).status_code == 404:
                    await asyncio.sleep(0.01)
            with anyio.fail_after(8):  # the wait itself is 10 s: a wake-up beats it
                response = await second.client.get(
                    f"/predict/{prediction_id}", headers={"Prefer": "wait=10"}
                )
            assert response.status_code == 200


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def test_a_thousand_long_polls_wait_without_burning_cpu(rabbitmq_url: str) -> None:
    # The model's 15 s leave the polls time to open (1,000 connections from
    # one httpx client take several seconds on a busy 2-core machine).
    settings = settings_for_test(
        rabbitmq_url, model_delay_min_s=15, model_delay_max_s=15, max_wait_s=30
    )
    service = ServiceProcess(settings, LOG_LEVEL="WARNING")
    await service.start()
    polls: list[asyncio.Task[httpx.Response]] = []
    try:
        limits = httpx.Limits(max_connections=1000)
        async with httpx.AsyncClient(
            base_url=service.base_url, limits=limits, timeout=40
        ) as client:
            prediction_id = await submit_async(client, "watched")
            polls = [
                asyncio.create_task(
                    client.get(f"/predict/{prediction_id}", headers={"Prefer": "wait=30"})
                )
                for _ in range(1000)
            ]
            await _wait_for_metric(service.base_url, "long_polls_waiting 1000.0")
            assert service.process is not None
            before = _cpu_seconds(service.process.pid)
            await asyncio.sleep(1.0)
            idle_cpu_s = _cpu_seconds(service.process.pid) - before
            responses = await asyncio.gather(*polls)
        assert idle_cpu_s < 0.1
        assert {r.status_code for r in responses} == {200}
    finally:
        # On a failure, the polls must not outlive this test (and fail the next).
        for poll in polls:
            poll.cancel()
        await asyncio.gather(*polls, return_exceptions=True)
        await service.stop()


async def _wait_for_metric(base_url: str, line: str) -> None:
    async with httpx.AsyncClient(base_url=base_url) as client:
        with anyio.fail_after(13):
            while line not in (await client.get("/metrics")).text:
                await asyncio.sleep(0.1)


async def test_metrics_count_the_status_every_kind_of_response_sent(live: LiveApp) -> None:
    client = live.client
    sent = [
        ("GET", "/docs", None, 200, "/docs"),
        ("GET", "/docs/static/swagger-ui.css", None, 200, "/docs/static/{name}"),
        ("GET", "/docs/static/nothing.js", None, 404, "/docs/static/{name}"),
        ("GET", "/nowhere", None, 404, "unmatched"),
        ("DELETE", "/predict", None, 405, "/predict"),
        ("POST", "/predict", b"not json", 400, "/predict"),
        ("POST", "/predict", b'{"input": 1}', 422, "/predict"),
        ("GET", "/openapi.json", None, 200, "/openapi.json"),
        ("GET", "/healthz/", None, 404, "unmatched"),  # no slash redirect
    ]
    for method, path, body, status, _ in sent:
        assert (await client.request(method, path, content=body)).status_code == status
    text = (await client.get("/metrics")).text
    for method, _, _, status, route in sent:
        line = f'http_requests_total{{method="{method}",route="{route}",status="{status}"}}'
        assert line in text, line


async def test_metrics_count_requests_predictions_and_latency(live: LiveApp) -> None:
    await live.client.post("/predict", json={"input": "sync"})
    prediction_id = await submit_async(live.client, "async")
    await wait_finished(live.client, prediction_id)
    await live.client.get("/predict/unknown")
    response = await live.client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert 'http_requests_total{method="POST",route="/predict",status="200"} 1.0' in text
    assert 'http_requests_total{method="POST",route="/predict",status="202"} 1.0' in text
    assert (
        'http_requests_total{method="GET",route="/predict/{prediction_id}",status="404"} 1.0'
        in text
    )
    assert "predictions_accepted_total 1.0" in text
    assert 'predictions_completed_total{mode="sync"} 1.0' in text
    assert 'predictions_completed_total{mode="async"} 1.0' in text
    assert "model_latency_seconds_count 2.0" in text
    assert "http_request_duration_seconds_bucket" in text
    assert "predictions_in_flight 0.0" in text
    assert "task_queue_depth 0.0" in text
    assert "long_polls_waiting 0.0" in text


async def test_metrics_show_predictions_in_flight_and_queued(rabbitmq_url: str) -> None:
    settings = settings_for_test(
        rabbitmq_url, model_delay_min_s=2, model_delay_max_s=2, model_concurrency=2
    )
    async with live_app(settings) as live:
        for i in range(5):
            await submit_async(live.client, f"q{i}")
        # The model takes its two, well before the first 2 s prediction ends.
        with anyio.fail_after(1.5):
            while await metric(live.client, "predictions_in_flight") < 2:
                await asyncio.sleep(0.02)
        text = (await live.client.get("/metrics")).text
    assert "predictions_in_flight 2.0" in text
    assert "task_queue_depth 5.0" in text


async def test_json_logs_carry_the_prediction_id_and_skip_probes(rabbitmq_url: str) -> None:
    service = ServiceProcess(settings_for_test(rabbitmq_url), LOG_FORMAT="json")
    await service.start()
    try:
        async with httpx.AsyncClient(base_url=service.base_url) as client:
            prediction_id = await submit_async(client, "logged")
            await wait_finished(client, prediction_id)
            await client.get("/healthz")
            await client.get("/metrics")
    finally:
        await service.stop()
    lines = [json.loads(line) for line in service.log().splitlines()]
    assert all({"ts", "level", "logger", "message"} <= set(line) for line in lines)
    about = [line for line in lines if line.get("prediction_id") == prediction_id]
    messages = {line["message"] for line in about}
    assert "prediction accepted" in messages
    assert "prediction done" in messages
    assert any(line["logger"] == "service.access" for line in about)
    assert not any("/healthz" in line["message"] or "/metrics" in line["message"] for line in lines)


async def test_readyz_answers_503_while_the_broker_connection_is_down(rabbitmq_url: str) -> None:
    settings = settings_for_test(rabbitmq_url, broker_reconnect_interval_s=2)
    async with live_app(settings) as live:
        assert close_service_connections(settings) == 1
        with anyio.fail_after(2):
            while (await live.client.get("/readyz")).status_code == 200:
                await asyncio.sleep(0.02)
        down = await live.client.get("/readyz")
        assert down.status_code == 503
        assert set(down.json()) == {"error"}
        with anyio.fail_after(10):
            while (await live.client.get("/readyz")).status_code != 200:
                await asyncio.sleep(0.05)


async def test_follower_resumes_after_its_channel_alone_is_closed(rabbitmq_url: str) -> None:
    settings = settings_for_test(rabbitmq_url)
    async with live_app(settings) as first:
        other = settings.with_changes(port=free_port())
        async with live_app(other) as second:
            # A channel error (here: a passive declare of a missing exchange)
            # closes only the event channel; the connection stays up.
            with contextlib.suppress(Exception):
                await second.services.broker.events_channel.declare_exchange(
                    "no-such-exchange", passive=True
                )
            prediction_id = await submit_async(first.client, "after the channel error")
            with anyio.fail_after(15):
                while (await second.client.get(f"/predict/{prediction_id}")).status_code != 200:
                    await asyncio.sleep(0.05)
