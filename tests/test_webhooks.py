"""Webhooks (shared/API.md, "Webhooks"), against the live broker and a real receiver.

The receiver is an aiohttp server in the test, on a port of its own: it
records every try and answers as the test tells it. The signatures are
checked with `standardwebhooks`, the spec's reference library.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import signal
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import anyio
import httpx
import pytest
from aiohttp import web
from standardwebhooks import Webhook, WebhookVerificationError

from service.settings import ConfigError, Settings
from tests.support import (
    ServiceProcess,
    delete_namespace,
    free_port,
    live_app,
    metric,
    settings_for_test,
    wait_finished,
)

SECRET = "whsec_" + base64.b64encode(b"a test's own webhook secret, 32b").decode()
OTHER_SECRET = "whsec_" + base64.b64encode(b"not the secret the service holds").decode()
SLEEPS = "tests.predictors:sleeps_as_told"  # its input is the seconds it sleeps
ASYNC = {"Async-Mode": "true"}
NOT_ENABLED = {"error": "Webhooks are not enabled on this server."}


@dataclass(frozen=True)
class Answer:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    hang: bool = False  # no answer at all, until the receiver stops


OK, FAIL, HANG = Answer(200), Answer(500), Answer(hang=True)


@dataclass(frozen=True)
class Try:
    """One POST the receiver got."""

    headers: dict[str, str]  # lowercase names, as standardwebhooks reads them
    body: bytes
    at: float  # time.monotonic()
    wall: float  # time.time()
    answered: int  # the status the receiver chose (0: none, it hung)

    @property
    def webhook_id(self) -> str:
        return self.headers["webhook-id"]

    @property
    def status(self) -> dict[str, Any]:
        decoded: dict[str, Any] = json.loads(self.body)
        return decoded


class Receiver:
    """A webhook receiver: answers each try with the next of `script`, then `otherwise`."""

    def __init__(self, *script: Answer, otherwise: Answer = OK) -> None:
        self.port = free_port()
        self.script = list(script)
        self.otherwise = otherwise
        self.tries: list[Try] = []
        self._release = asyncio.Event()

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        answer = self.script.pop(0) if self.script else self.otherwise
        headers = {name.lower(): value for name, value in request.headers.items()}
        status = 0 if answer.hang else answer.status
        self.tries.append(Try(headers, body, time.monotonic(), time.time(), status))
        if answer.hang:
            await self._release.wait()
        return web.Response(status=answer.status, headers=answer.headers)

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Receiver]:
        app = web.Application()
        app.router.add_post("/{path:.*}", self._handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", self.port).start()
        try:
            yield self
        finally:
            self._release.set()  # hanging answers end, so the server stops at once
            await runner.cleanup()

    def of(self, prediction_id: str, event: str = "completed") -> list[Try]:
        """The tries of one event of one prediction, in the order they came."""
        return [t for t in self.tries if t.webhook_id == f"msg_{prediction_id}_{event}"]

    async def wait_tries(
        self, prediction_id: str, count: int, event: str = "completed", timeout_s: float = 15
    ) -> list[Try]:
        await until(lambda: len(self.of(prediction_id, event)) >= count, timeout_s)
        return self.of(prediction_id, event)


async def until(condition: Callable[[], bool], timeout_s: float = 15) -> None:
    with anyio.fail_after(timeout_s):
        while not condition():
            await asyncio.sleep(0.02)


def deliveries(event: str, outcome: str) -> str:
    return f'webhook_deliveries_total{{event="{event}",outcome="{outcome}"}}'


async def until_metric(
    client: httpx.AsyncClient, series: str, at_least: float, timeout_s: float = 15
) -> None:
    with anyio.fail_after(timeout_s):
        while await metric(client, series) < at_least:
            await asyncio.sleep(0.05)


def webhook_settings(rabbitmq_url: str, **changes: object) -> Settings:
    """Webhooks on, and allowed to reach the test's receiver on 127.0.0.1."""
    return settings_for_test(
        rabbitmq_url, webhook_secret=SECRET, webhook_allow_private_networks=True, **changes
    )


async def submit(
    client: httpx.AsyncClient, text: str, url: str, events: list[str] | None = None
) -> str:
    payload: dict[str, object] = {"input": text, "webhook": url}
    if events is not None:
        payload["webhook_events_filter"] = events
    response = await client.post("/predict", json=payload, headers=ASYNC)
    assert response.status_code == 202, response.text
    prediction_id: str = response.json()["prediction_id"]
    return prediction_id


def verified(webhook: Try) -> dict[str, Any]:
    """The body, once its signature verifies (WebhookVerificationError if not)."""
    payload: dict[str, Any] = Webhook(SECRET).verify(webhook.body, webhook.headers)
    return payload


async def test_the_body_is_the_status_body_signed_to_the_standard(rabbitmq_url: str) -> None:
    receiver = Receiver()
    async with receiver.running(), live_app(webhook_settings(rabbitmq_url)) as live:
        prediction_id = await submit(live.client, "signed", receiver.url())
        [webhook] = await receiver.wait_tries(prediction_id, 1)
        status = await live.client.get(f"/predict/{prediction_id}/status")
    assert status.status_code == 200
    assert status.json()["status"] == "succeeded"
    assert verified(webhook) == status.json()
    assert json.loads(webhook.body) == status.json()
    assert webhook.headers["content-type"] == "application/json"
    assert webhook.webhook_id == f"msg_{prediction_id}_completed"
    assert abs(int(webhook.headers["webhook-timestamp"]) - webhook.wall) < 5
    with pytest.raises(WebhookVerificationError):
        Webhook(OTHER_SECRET).verify(webhook.body, webhook.headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(webhook.body.replace(b"signed", b"forged"), webhook.headers)


async def test_start_then_completed_arrive_in_that_order(rabbitmq_url: str) -> None:
    receiver = Receiver()
    async with (
        receiver.running(),
        live_app(webhook_settings(rabbitmq_url, predictor=SLEEPS)) as live,
    ):
        # A few at once: each start is told as its run begins, not later.
        both = ["start", "completed"]
        ids = await asyncio.gather(
            *[submit(live.client, "1.0", receiver.url(), both) for _ in range(4)]
        )
        for prediction_id in ids:
            await receiver.wait_tries(prediction_id, 1, "completed")
    assert len(receiver.tries) == 2 * len(ids)
    for prediction_id in ids:
        [start] = receiver.of(prediction_id, "start")
        [completed] = receiver.of(prediction_id, "completed")
        assert receiver.tries.index(start) < receiver.tries.index(completed)
        assert verified(start)["status"] == "processing", start.status
        assert start.status["started_at"] is not None
        assert start.status["completed_at"] is None
        assert verified(completed)["status"] == "succeeded"
        assert completed.status["result"] == "1.0"
        # The model ran (1 s) between the two.
        assert completed.at - start.at >= 0.8


async def test_the_events_filter_is_respected(rabbitmq_url: str) -> None:
    receiver = Receiver()
    async with (
        receiver.running(),
        live_app(webhook_settings(rabbitmq_url, predictor=SLEEPS)) as live,
    ):
        by_default = await submit(live.client, "0.3", receiver.url())
        start_only = await submit(live.client, "0.3", receiver.url(), ["start"])
        await receiver.wait_tries(by_default, 1, "completed")
        await receiver.wait_tries(start_only, 1, "start")
        for prediction_id in (by_default, start_only):
            assert (await wait_finished(live.client, prediction_id)).status_code == 200
        # A webhook not asked for would be owed as the outcome is recorded and
        # sent within milliseconds: a quiet second shows none is.
        await asyncio.sleep(1.0)
        assert await metric(live.client, deliveries("start", "delivered")) == 1
        assert await metric(live.client, deliveries("completed", "delivered")) == 1
    assert sorted(t.webhook_id for t in receiver.tries) == sorted(
        [f"msg_{start_only}_start", f"msg_{by_default}_completed"]
    )
    assert receiver.of(by_default, "start") == []
    assert receiver.of(start_only, "completed") == []


async def test_two_failures_then_a_success_are_three_tries_of_one_webhook_id(
    rabbitmq_url: str,
) -> None:
    receiver = Receiver(FAIL, FAIL, OK)
    async with receiver.running(), live_app(webhook_settings(rabbitmq_url)) as live:
        prediction_id = await submit(live.client, "retried", receiver.url())
        await receiver.wait_tries(prediction_id, 3, timeout_s=20)
        await until_metric(live.client, deliveries("completed", "delivered"), 1)
        assert await metric(live.client, deliveries("completed", "retried")) == 2
        assert await metric(live.client, deliveries("completed", "delivered")) == 1
        # Owed counts what waits in the broker every 5 s, and what is tried now.
        with anyio.fail_after(12):
            while await metric(live.client, "webhook_deliveries_owed") != 0:
                await asyncio.sleep(0.2)
    first, second, third = receiver.tries  # and no fourth: it was delivered
    assert [t.answered for t in receiver.tries] == [500, 500, 200]
    assert {t.webhook_id for t in receiver.tries} == {f"msg_{prediction_id}_completed"}
    for webhook in receiver.tries:  # each try signed with its own timestamp
        assert verified(webhook)["prediction_id"] == prediction_id
    # Backoff with jitter: 1-2 s, then 2-4 s (give or take the broker's delay queues).
    assert 0.9 <= second.at - first.at <= 3.0
    assert 1.9 <= third.at - second.at <= 6.0


async def test_retry_after_is_honoured(rabbitmq_url: str) -> None:
    receiver = Receiver(Answer(503, {"Retry-After": "4"}), OK)
    async with receiver.running(), live_app(webhook_settings(rabbitmq_url)) as live:
        prediction_id = await submit(live.client, "later", receiver.url())
        first, second = await receiver.wait_tries(prediction_id, 2)
        await until_metric(live.client, deliveries("completed", "delivered"), 1)
        assert await metric(live.client, deliveries("completed", "retried")) == 1
    # The backoff alone would have waited 1-2 s.
    assert second.at - first.at >= 3.9
    assert second.webhook_id == first.webhook_id


async def test_a_410_stops_the_retries(rabbitmq_url: str) -> None:
    receiver = Receiver(Answer(410), otherwise=FAIL)
    async with receiver.running(), live_app(webhook_settings(rabbitmq_url)) as live:
        prediction_id = await submit(live.client, "unwanted", receiver.url())
        await receiver.wait_tries(prediction_id, 1)
        await until_metric(live.client, deliveries("completed", "gone"), 1)
        # A retry would come 1-2 s after the try: none does.
        await asyncio.sleep(3.0)
        assert await metric(live.client, deliveries("completed", "gone")) == 1
        assert await metric(live.client, deliveries("completed", "retried")) == 0
        assert await metric(live.client, deliveries("completed", "delivered")) == 0
    assert len(receiver.tries) == 1


async def test_a_delivery_owed_survives_a_kill_9(rabbitmq_url: str) -> None:
    settings = webhook_settings(rabbitmq_url)
    receiver = Receiver(otherwise=FAIL)
    first = ServiceProcess(settings)
    second = ServiceProcess(settings.with_changes(port=free_port()))
    async with receiver.running():
        try:
            await first.start()
            async with httpx.AsyncClient(base_url=first.base_url) as client:
                prediction_id = await submit(client, "owed", receiver.url())
            # The outcome is recorded; the delivery is owed, failed once.
            [failed] = await receiver.wait_tries(prediction_id, 1)
            first.signal(signal.SIGKILL)
            assert await first.wait_exit() == -signal.SIGKILL
            receiver.otherwise = OK
            await second.start()
            await until(lambda: any(t.answered == 200 for t in receiver.tries), 20)
            async with httpx.AsyncClient(base_url=second.base_url) as client:
                await until_metric(client, deliveries("completed", "delivered"), 1)
        finally:
            await first.stop()
            await second.stop()
            await delete_namespace(settings)
    delivered = receiver.tries[-1]
    assert delivered.answered == 200
    assert {t.webhook_id for t in receiver.tries} == {failed.webhook_id}
    assert failed.webhook_id == f"msg_{prediction_id}_completed"
    assert verified(delivered)["status"] == "succeeded"


async def test_a_private_address_is_refused_without_the_flag(rabbitmq_url: str) -> None:
    port = free_port()
    refused = {
        f"http://127.0.0.1:{port}/hook": "127.0.0.1",
        f"http://localhost:{port}/hook": "localhost",
        "http://10.0.0.1/": "10.0.0.1",
        "http://192.168.1.20:8080/x": "192.168.1.20",
        "http://169.254.169.254/latest/meta-data/": "169.254.169.254",
        "http://[::1]/": "::1",
        "http://[::ffff:127.0.0.1]/": "127.0.0.1",
        "ftp://example.com/": "http",
        "not a url": "http",
        "http://[64:ff9b::7f00:1]/": "64:ff9b::7f00:1",  # NAT64 of 127.0.0.1
        f"http://{'a' * 64}.com/x": "not a valid host name",  # once a 500
        "http://a..b/x": "not a valid host name",
    }
    settings = settings_for_test(rabbitmq_url, webhook_secret=SECRET)
    async with live_app(settings) as live:
        for url, named in refused.items():
            response = await live.client.post(
                "/predict", json={"input": "x", "webhook": url}, headers=ASYNC
            )
            assert response.status_code == 422, (url, response.text)
            assert named in response.json()["error"], (url, response.text)
        assert await metric(live.client, "predictions_accepted_total") == 0


async def test_a_hanging_receiver_times_out_and_slows_no_other(rabbitmq_url: str) -> None:
    hanging, fast = Receiver(otherwise=HANG), Receiver()
    settings = webhook_settings(rabbitmq_url, predictor=SLEEPS, webhook_timeout_s=1)
    async with hanging.running(), fast.running(), live_app(settings) as live:
        to_hanging = [submit(live.client, "0.3", hanging.url()) for _ in range(6)]
        to_fast = [submit(live.client, "0.3", fast.url()) for _ in range(6)]
        ids = await asyncio.gather(*to_hanging, *to_fast)
        slow_ids, fast_ids = ids[:6], ids[6:]
        for prediction_id in fast_ids:
            await fast.wait_tries(prediction_id, 1)
        await until(lambda: all(hanging.of(p) for p in slow_ids), 10)
        # Each hung try is given up after WEBHOOK_TIMEOUT_S (1 s), and retried.
        with anyio.fail_after(4):
            while await metric(live.client, deliveries("completed", "retried")) < 6:
                await asyncio.sleep(0.05)
        assert await metric(live.client, deliveries("completed", "delivered")) == 6
    for webhook in fast.tries:
        completed_at = datetime.fromisoformat(verified(webhook)["completed_at"])
        assert webhook.wall - completed_at.timestamp() < 2.0, webhook.status
    assert len(fast.tries) == 6


async def test_webhook_fields_are_validated(rabbitmq_url: str) -> None:
    url = "http://example.com/hook"
    async with live_app(settings_for_test(rabbitmq_url, webhook_secret=SECRET)) as live:

        async def answer(payload: dict[str, object], *, async_mode: bool = True) -> httpx.Response:
            headers = ASYNC if async_mode else {}
            return await live.client.post("/predict", json=payload, headers=headers)

        sync = await answer({"input": "x", "webhook": url}, async_mode=False)
        assert sync.status_code == 422, sync.text
        assert "async" in sync.json()["error"].lower()
        invalid: list[dict[str, object]] = [
            {"input": "x", "webhook": url, "webhook_events_filter": ["bogus"]},
            {"input": "x", "webhook": url, "webhook_events_filter": "completed"},
            {"input": "x", "webhook": 123},
            {"input": "x", "webhook_events_filter": ["completed"]},
        ]
        for payload in invalid:
            response = await answer(payload)
            assert response.status_code == 422, (payload, response.text)
            assert response.json()["error"], payload
    async with live_app(settings_for_test(rabbitmq_url)) as without_secret:
        response = await without_secret.client.post(
            "/predict", json={"input": "x", "webhook": url}, headers=ASYNC
        )
        assert response.status_code == 422
        assert response.json() == NOT_ENABLED


async def test_a_malformed_webhook_secret_refuses_to_start(rabbitmq_url: str) -> None:
    for malformed in ("nope", "whsec_", "whsec_not*base64!", "shh_" + SECRET[6:]):
        with pytest.raises(ConfigError) as raised:
            Settings.from_env({"WEBHOOK_SECRET": malformed})
        message = str(raised.value)
        assert "WEBHOOK_SECRET" in message
        assert "\n" not in message
        given = malformed.removeprefix("whsec_")
        assert not given or given not in message
    settings = settings_for_test(rabbitmq_url)
    service = ServiceProcess(settings, WEBHOOK_SECRET="whsec_hunter2!!")
    await service.start(wait_ready=False)
    assert await service.wait_exit(timeout_s=15) != 0
    [line] = service.log().strip().splitlines()
    assert line.startswith("error: ")
    assert "WEBHOOK_SECRET" in line
    assert "hunter2" not in line


async def test_a_delivery_failing_past_the_retry_window_is_dead(
    rabbitmq_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    receiver = Receiver(otherwise=FAIL)
    settings = webhook_settings(rabbitmq_url, webhook_retry_for_s=3)
    with caplog.at_level(logging.INFO, logger="service"):
        async with receiver.running(), live_app(settings) as live:
            prediction_id = await submit(live.client, "hopeless", receiver.url())
            await until_metric(live.client, deliveries("completed", "dead"), 1)
            tries = len(receiver.tries)
            assert await metric(live.client, deliveries("completed", "retried")) == tries - 1
            assert await metric(live.client, deliveries("completed", "delivered")) == 0
    assert tries >= 2
    # Never tried past the window it was owed for.
    # The last try is cut to the end of the window (3 s after owed), give or take a try.
    assert receiver.tries[-1].at - receiver.tries[0].at <= 4.0
    assert len(receiver.tries) == tries
    [given_up] = [
        r for r in caplog.records if r.levelno == logging.WARNING and "given up" in r.getMessage()
    ]
    assert getattr(given_up, "prediction_id", None) == prediction_id
