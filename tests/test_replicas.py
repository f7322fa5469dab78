"""Every replica answers what the event stream says, the same for every id.

- No replica says 404 for an id another replica has answered 202 for: it
  reads the stream up to the request first (a fence), one marker for all
  lookups of the same moment.
- When it cannot read the stream, it says so (503), not "unknown".
- Two replicas that both ran a task end with the same answer: the first
  outcome on the stream, including on the replica whose outcome lost.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any

import aio_pika
import anyio
import httpx

from service.broker import Names
from service.settings import Settings
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


async def test_no_replica_says_404_for_an_id_another_has_just_accepted(rabbitmq_url: str) -> None:
    # The second replica's follower lags behind the stream, as under load:
    # it reads one message at a time (STREAM_PREFETCH=1), each taking 50 ms
    # longer to apply. Without reading the stream up to each request first,
    # it answers 404 for ids it has not read yet.
    settings = settings_for_test(
        rabbitmq_url, model_delay_min_s=5, model_delay_max_s=6, publish_timeout_s=20
    )
    first = ServiceProcess(settings)
    await first.start()
    try:
        lagging = settings.with_changes(port=free_port(), stream_prefetch=1)
        async with (
            live_app(lagging) as second,
            httpx.AsyncClient(base_url=first.base_url, timeout=30) as on_first,
        ):
            _slow_down_the_follower(second, delay_s=0.05)

            async def accept_here_read_there(i: int) -> int:
                prediction_id = await submit_async(on_first, f"seen {i}")
                return (await second.client.get(f"/predict/{prediction_id}")).status_code

            statuses = await asyncio.gather(*(accept_here_read_there(i) for i in range(100)))
            assert statuses.count(404) == 0, statuses
            assert set(statuses) == {400}
            # It did have to read the stream up to the requests: it was behind.
            assert await metric(second.client, "event_stream_fences_total") > 0
    finally:
        await first.stop()


def _slow_down_the_follower(live: LiveApp, delay_s: float) -> None:
    store = live.services.store
    apply_logged = store.apply_logged

    async def slower(*args: Any, **kwargs: Any) -> None:
        await apply_logged(*args, **kwargs)
        await asyncio.sleep(delay_s)

    store.apply_logged = slower  # type: ignore[method-assign]


async def test_a_flood_of_unknown_ids_shares_its_trips_to_the_stream(rabbitmq_url: str) -> None:
    async with live_app(settings_for_test(rabbitmq_url)) as live:
        unknown = [str(uuid.uuid4()) for _ in range(500)]
        responses = await asyncio.gather(*(live.client.get(f"/predict/{i}") for i in unknown))
        assert {response.status_code for response in responses} == {404}
        assert responses[0].json() == {"error": "Prediction ID not found."}
        fences = await metric(live.client, "event_stream_fences_total")
        assert 1 <= fences <= 100  # one marker per batch of waiting lookups, not one each
        # An id this service could never have issued needs no look at all.
        assert (await live.client.get("/predict/not-a-uuid")).status_code == 404
        assert await metric(live.client, "event_stream_fences_total") == fences


async def test_a_replica_that_cannot_read_the_stream_says_503_not_404(rabbitmq_url: str) -> None:
    settings = settings_for_test(rabbitmq_url, broker_reconnect_interval_s=10)
    async with live_app(settings) as live:
        known = await submit_async(live.client, "known")
        assert (await wait_finished(live.client, known)).status_code == 200
        assert close_service_connections(settings) == 1
        with anyio.fail_after(5):
            while live.services.broker.is_up:
                await asyncio.sleep(0.02)
        response = await live.client.get(f"/predict/{uuid.uuid4()}")
        assert response.status_code == 503
        assert response.headers["retry-after"]
        assert response.json()["error"].startswith("Cannot tell whether this prediction exists")
        # What it knows it still answers; what it could never have issued is still unknown.
        assert (await live.client.get(f"/predict/{known}")).status_code == 200
        assert (await live.client.get("/predict/nonsense")).status_code == 404


async def test_two_replicas_that_both_ran_a_task_keep_the_first_outcome_on_the_stream(
    rabbitmq_url: str, tmp_path: Path
) -> None:
    # The model answers its process id, so the two replicas' outcomes differ.
    # The replica running the task loses its connection mid-run and stays
    # away; the broker hands the task to the other, which runs it too. The
    # first publishes its outcome once back, after the other's: both
    # replicas must end with the same answer, the first on the stream.
    settings = settings_for_test(
        rabbitmq_url,
        predictor="tests.predictors:sleeps_then_names_its_process",
        broker_reconnect_interval_s=5,
    )
    calls = {"PREDICTOR_CALLS_DIR": str(tmp_path)}
    replicas = [ServiceProcess(settings, **calls)]
    replicas.append(ServiceProcess(settings.with_changes(port=free_port()), **calls))
    for replica in replicas:
        await replica.start()
    try:
        async with httpx.AsyncClient(base_url=replicas[0].base_url, timeout=30) as client:
            prediction_id = await submit_async(client, "3")
        with anyio.fail_after(10):
            while not (runs := [path async for path in anyio.Path(tmp_path).iterdir()]):
                await asyncio.sleep(0.02)
        runner_pid = int(runs[0].name.split("-")[0])
        assert close_service_connections(settings, pid=runner_pid) == 1
        # The runner comes back after its 5 s reconnect interval; a loaded CI
        # machine has taken longer than 30 s for the second outcome.
        with anyio.fail_after(60):
            while len(outcomes := await _outcomes(settings, prediction_id)) < 2:
                await asyncio.sleep(0.2)
        runs = [path async for path in anyio.Path(tmp_path).iterdir()]
        assert len(runs) == 2  # the race happened: both ran the model
        pids = {str(replica.process.pid) for replica in replicas if replica.process}
        assert {outcome["result"] for outcome in outcomes} == pids
        for replica in replicas:
            async with httpx.AsyncClient(base_url=replica.base_url, timeout=30) as client:
                response = await wait_finished(client, prediction_id)
                assert response.json()["output"]["result"] == outcomes[0]["result"]
    finally:
        for replica in replicas:
            await replica.stop()


async def _outcomes(settings: Settings, prediction_id: str) -> list[dict[str, str]]:
    """The `done` events on the stream for one id, in stream order."""
    names = Names.for_namespace(settings.broker_namespace)
    found: list[dict[str, str]] = []
    connection = await aio_pika.connect(settings.rabbitmq_url, timeout=5)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=100)
        queue = await channel.get_queue(names.events, ensure=False)
        marker = uuid.uuid4().hex
        read_all = asyncio.Event()

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            body = json.loads(message.body)
            events = body.get("outcomes") or body.get("tasks") or body.get("events") or [body]
            for event in events:
                if event.get("kind") == "done" and event.get("prediction_id") == prediction_id:
                    found.append(event)
                if event.get("marker_id") == marker:
                    read_all.set()
            await message.ack()

        await queue.consume(on_message, arguments={"x-stream-offset": "first"})
        exchange = await channel.get_exchange(names.exchange)
        body = json.dumps({"kind": "marker", "marker_id": marker}).encode()
        await exchange.publish(aio_pika.Message(body), "event")
        with anyio.fail_after(10):
            await read_all.wait()
    return found
