"""Error paths of the webhook sender, against the live broker and a real receiver.

What the queue may hold that is not a delivery the sender can make (a
message it cannot decode, a delivery for a prediction nobody submitted),
and what /metrics says of the deliveries owed, with the broker away too.
The receiver, the signature check and the settings are those of
tests/test_webhooks.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import uuid
from collections.abc import Iterator

import aio_pika
import anyio
import httpx
import msgspec
import pytest

from service.broker import WEBHOOK_DELAY_LEVELS, BrokerAddress, Names
from service.schemas import WebhookJob
from service.settings import Settings
from tests.support import (
    LiveApp,
    close_service_connections,
    connect_to_broker,
    delete_namespace,
    live_app,
    metric,
    rabbitmqctl,
    wait_ready_at,
)
from tests.test_webhooks import (
    HANG,
    OK,
    Answer,
    Receiver,
    deliveries,
    submit,
    until,
    until_metric,
    verified,
    webhook_settings,
)

DROPPED = "dropping an undecodable webhook delivery"
UNHANDLED = "giving up a webhook delivery that could not be handled"
OWED = "webhook_deliveries_owed"
LATER = Answer(503, {"Retry-After": "30"})  # a failure whose retry waits past the test
# Bodies no WebhookJob decodes from, each a way of being wrong.
UNDECODABLE = [
    b"",
    b"not json at all",
    b"\xff\xfe\x00 not utf-8",
    b"null",
    b'{"kind":"webhook"}',  # fields missing
    b'{"kind":"tasks","tasks":[]}',  # another message's tag
    b'{"kind":"webhook","prediction_id":"p","event":"finished",'
    b'"url":"http://127.0.0.1/","first_at_s":0}',  # no such event
    b'{"kind":"webhook","x":' + b"[" * 100_000,  # nested past any depth limit
]


def webhook_queues(settings: Settings) -> list[str]:
    """Where a delivery owed can wait: the webhooks queue and its delay queues."""
    names = Names.for_namespace(settings.broker_namespace)
    return [names.webhooks] + [names.webhook_delay(level) for level in range(WEBHOOK_DELAY_LEVELS)]


async def put_on_webhooks_queue(settings: Settings, *bodies: bytes) -> None:
    """Publish raw bodies straight to the namespace's webhooks queue, confirmed."""
    names = Names.for_namespace(settings.broker_namespace)
    connection = await connect_to_broker(settings)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        for body in bodies:
            message = aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
            # mandatory (aio-pika's default): an unroutable message raises.
            await channel.default_exchange.publish(message, names.webhooks)


async def messages_in(settings: Settings, queues: list[str]) -> int:
    """The messages ready in these queues, as the broker counts them."""
    connection = await connect_to_broker(settings)
    async with connection:
        channel = await connection.channel()
        total = 0
        for name in queues:
            queue = await channel.declare_queue(name, passive=True)
            total += queue.declaration_result.message_count or 0
    return total


async def until_drained(settings: Settings, queues: list[str], timeout_s: float = 10) -> None:
    with anyio.fail_after(timeout_s):
        while await messages_in(settings, queues) > 0:
            await asyncio.sleep(0.1)


def records(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if text in r.getMessage()]


def series_in(exposition: str, series: str) -> float:
    """One series of a /metrics text (0 if absent, as a counter never incremented)."""
    match = re.search(rf"^{re.escape(series)} (\S+)$", exposition, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def owed_in(exposition: str) -> float:
    """The owed gauge of a /metrics text; it must be there."""
    match = re.search(rf"^{OWED} (\S+)$", exposition, re.MULTILINE)
    assert match is not None, exposition
    return float(match.group(1))


async def test_an_undecodable_delivery_is_dropped_and_the_sender_goes_on(
    rabbitmq_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    receiver = Receiver()
    settings = webhook_settings(rabbitmq_url)
    queue = webhook_queues(settings)[:1]
    try:
        with caplog.at_level(logging.INFO, logger="service"):
            async with receiver.running(), live_app(settings, keep_namespace=True) as live:
                await put_on_webhooks_queue(settings, *UNDECODABLE)
                await until(lambda: len(records(caplog, DROPPED)) >= len(UNDECODABLE), 10)
                await until_drained(settings, queue)
                # The sender still delivers.
                prediction_id = await submit(live.client, "after the garbage", receiver.url())
                [webhook] = await receiver.wait_tries(prediction_id, 1)
                await until_metric(live.client, deliveries("completed", "delivered"), 1)
                status = await live.client.get(f"/predict/{prediction_id}/status")
                for outcome in ("dead", "retried", "gone"):
                    assert await metric(live.client, deliveries("completed", outcome)) == 0
        # The replica is gone: a message it had taken and not acked would be back.
        assert await messages_in(settings, webhook_queues(settings)) == 0
    finally:
        await delete_namespace(settings)
    dropped = records(caplog, DROPPED)
    # Each once: none was put back and handed out again.
    assert len(dropped) == len(UNDECODABLE), [r.getMessage() for r in dropped]
    assert all(r.levelno == logging.ERROR for r in dropped)
    assert records(caplog, UNHANDLED) == []
    assert receiver.tries == [webhook]
    assert status.status_code == 200
    assert status.json()["status"] == "succeeded"
    assert verified(webhook) == status.json()
    assert webhook.webhook_id == f"msg_{prediction_id}_completed"


async def test_a_delivery_for_an_unknown_prediction_is_given_up_once(
    rabbitmq_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    receiver = Receiver()
    settings = webhook_settings(rabbitmq_url)
    # Ids as the service issues them: lookups read the stream back before "unknown".
    never, never_started = str(uuid.uuid4()), str(uuid.uuid4())
    jobs = [
        WebhookJob(never, "completed", receiver.url(), time.time()),
        WebhookJob(never_started, "start", receiver.url(), time.time()),
    ]
    try:
        with caplog.at_level(logging.INFO, logger="service"):
            async with receiver.running(), live_app(settings, keep_namespace=True) as live:
                await put_on_webhooks_queue(settings, *[msgspec.json.encode(j) for j in jobs])
                await until_metric(live.client, deliveries("completed", "dead"), 1)
                await until_metric(live.client, deliveries("start", "dead"), 1)
                # A retry, or a pause for a view that lags, comes back within 1-2 s.
                await asyncio.sleep(3.0)
                text = (await live.client.get("/metrics")).text
                await until_drained(settings, webhook_queues(settings), timeout_s=2)
        assert await messages_in(settings, webhook_queues(settings)) == 0
    finally:
        await delete_namespace(settings)
    lines = text.splitlines()
    assert 'webhook_deliveries_total{event="completed",outcome="dead"} 1.0' in lines, text
    assert 'webhook_deliveries_total{event="start",outcome="dead"} 1.0' in lines, text
    for outcome in ("delivered", "retried", "gone"):
        for event in ("completed", "start"):
            assert series_in(text, deliveries(event, outcome)) == 0, text
    # Counted (the family is there), and never put in a delay queue to come again.
    assert "# TYPE broker_messages_published_total counter" in lines, text
    assert series_in(text, 'broker_messages_published_total{routing_key="webhook_delay"}') == 0
    assert receiver.tries == []
    given_up = records(caplog, "webhook given up")
    assert sorted(str(getattr(r, "prediction_id", "")) for r in given_up) == sorted(
        [never, never_started]
    )
    for record in given_up:
        assert record.levelno == logging.WARNING
        assert "no longer known" in record.getMessage()
    assert records(caplog, UNHANDLED) == []


async def until_owed(client: httpx.AsyncClient, count: int, timeout_s: float = 12) -> None:
    """Until /metrics shows `count` owed: the broker's part is counted every 5 s."""
    with anyio.fail_after(timeout_s):
        while owed_in((await client.get("/metrics")).text) != count:
            await asyncio.sleep(0.1)


def reconnections(caplog: pytest.LogCaptureFixture) -> int:
    return len(records(caplog, "broker connection restored"))


async def drop_connections(live: LiveApp, caplog: pytest.LogCaptureFixture) -> None:
    """Have the broker close the replica's connection, and wait until it is back."""
    before = reconnections(caplog)
    assert close_service_connections(live.settings) == 1
    await until(lambda: reconnections(caplog) > before, 10)
    await wait_ready_at(live.client)


async def test_owed_deliveries_are_counted_and_shown_with_the_broker_away(
    rabbitmq_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Each failed try waits 30 s in a delay queue: none is being tried while
    # the test looks, so the count is exact (a try in progress at a count is
    # "held", and could leave the owed short by one until the next count).
    receiver = Receiver(otherwise=LATER)
    settings = webhook_settings(rabbitmq_url, broker_reconnect_interval_s=7)
    with caplog.at_level(logging.INFO, logger="service"):
        async with receiver.running(), live_app(settings) as live:
            assert owed_in((await live.client.get("/metrics")).text) == 0
            ids = await asyncio.gather(
                *[submit(live.client, f"held back {n}", receiver.url()) for n in range(3)]
            )
            for prediction_id in ids:
                await receiver.wait_tries(prediction_id, 1)
            await until_owed(live.client, 3)
            # aio-pika waits the interval after each connection attempt, so a drop
            # more than 7 s after the last one reconnects at once: drop it twice,
            # and the second time it stays away for the rest of the 7 s.
            await drop_connections(live, caplog)
            assert close_service_connections(settings) == 1
            with anyio.fail_after(3):
                while (await live.client.get("/readyz")).status_code == 200:
                    await asyncio.sleep(0.02)
            # While it is away /metrics answers, promptly, with what is owed.
            away_since, samples = time.monotonic(), 0
            with anyio.fail_after(15):
                while (await live.client.get("/readyz")).status_code == 503:
                    with anyio.fail_after(2):
                        response = await live.client.get("/metrics")
                    assert response.status_code == 200
                    assert owed_in(response.text) == 3
                    samples += 1
                    await asyncio.sleep(0.1)
            # Away for seconds: a count of the owed (every 5 s) mostly fails meanwhile.
            assert time.monotonic() - away_since >= 4.0, samples
            await wait_ready_at(live.client)
            # Back: the count goes on, and sees a delivery owed since.
            another = await submit(live.client, "owed after the outage", receiver.url())
            await receiver.wait_tries(another, 1)
            await until_owed(live.client, 4)
            assert await metric(live.client, deliveries("completed", "retried")) == 4
            for outcome in ("delivered", "dead", "gone"):
                assert await metric(live.client, deliveries("completed", outcome)) == 0
    # One try each: the others wait out the receiver's Retry-After.
    assert sorted(t.webhook_id for t in receiver.tries) == sorted(
        f"msg_{p}_completed" for p in [*ids, another]
    )
    for webhook in receiver.tries:
        assert verified(webhook)["status"] == "succeeded"


async def test_a_try_cut_off_by_a_dropped_connection_is_tried_again_and_delivered(
    rabbitmq_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # The first try hangs; the connection drops meanwhile, which cancels the
    # try (aiormq cancels a closing channel's consumer tasks) and puts the
    # message back in the broker. It is tried again once the connection is
    # back, without being taken for a bug.
    receiver = Receiver(HANG, otherwise=OK)
    settings = webhook_settings(rabbitmq_url, broker_reconnect_interval_s=0.5)
    with caplog.at_level(logging.INFO, logger="service"):
        async with receiver.running(), live_app(settings) as live:
            prediction_id = await submit(live.client, "cut off", receiver.url())
            await receiver.wait_tries(prediction_id, 1)
            await drop_connections(live, caplog)
            await until(lambda: any(t.answered == 200 for t in receiver.tries), 10)
            await until_metric(live.client, deliveries("completed", "delivered"), 1)
            await until_owed(live.client, 0)
    assert not records(caplog, UNHANDLED)
    assert [t.answered for t in receiver.tries] == [0, 200]
    assert {t.webhook_id for t in receiver.tries} == {f"msg_{prediction_id}_completed"}
    for webhook in receiver.tries:
        assert verified(webhook)["status"] == "succeeded"


async def test_tries_cut_off_while_the_broker_is_away_are_still_counted_owed(
    rabbitmq_url: str,
) -> None:
    # Three tries hang; the connection drops, which cuts them off and puts
    # their messages back in the broker. The owed count must not drop to
    # nothing while the broker is away and cannot be asked.
    receiver = Receiver(otherwise=HANG)
    settings = webhook_settings(rabbitmq_url, broker_reconnect_interval_s=0.2)
    async with receiver.running(), live_app(settings) as live:
        ids = await asyncio.gather(
            *[submit(live.client, f"hangs {n}", receiver.url()) for n in range(3)]
        )
        for prediction_id in ids:
            await receiver.wait_tries(prediction_id, 1)
        await until_owed(live.client, 3)
        with kept_out(rabbitmq_url):
            assert close_service_connections(settings) == 1
            with anyio.fail_after(3):
                while (await live.client.get("/readyz")).status_code == 200:
                    await asyncio.sleep(0.02)
            # Away for good until the access comes back: sample for 2 s.
            for _ in range(20):
                assert owed_in((await live.client.get("/metrics")).text) == 3
                await asyncio.sleep(0.1)
            assert (await live.client.get("/readyz")).status_code == 503
        await wait_ready_at(live.client)


@contextlib.contextmanager
def kept_out(rabbitmq_url: str) -> Iterator[None]:
    """guest may not use the test vhost meanwhile: every reconnection is refused."""
    vhost = BrokerAddress.parse(rabbitmq_url).vhost
    rabbitmqctl("clear_permissions", "-p", vhost, "guest")
    try:
        yield
    finally:
        rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
