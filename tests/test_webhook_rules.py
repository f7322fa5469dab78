"""The webhook rules that need no broker: signatures, addresses, the retry schedule."""

from __future__ import annotations

import asyncio
import base64
import email.utils
import ipaddress
import time
from collections.abc import Callable

import anyio
import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from service.settings import ConfigError, Settings, webhook_key
from service.webhooks.addresses import WebhookRefused, check_public, forbidden, parse_url
from service.webhooks.endpoints import Endpoints
from service.webhooks.schedule import (
    Dead,
    Delivered,
    Gone,
    RetryLater,
    backoff_s,
    judge,
    level_of,
    retry_after_s,
)
from service.webhooks.signing import signed_headers

SECRET = "whsec_" + base64.b64encode(b"a key of thirty-two bytes, fine.").decode()
NOW_S = 1_800_000_000.0


# -- signing -------------------------------------------------------------------


def test_a_signature_verifies_with_the_reference_library() -> None:
    key = webhook_key(SECRET)
    assert key is not None
    body = b'{"prediction_id":"p","status":"succeeded"}'
    headers = signed_headers(key, "msg_p_completed", int(time.time()), body)
    verifier = Webhook(SECRET)
    assert verifier.verify(body, headers) is not None
    tampered = body.replace(b"succeeded", b"failed")
    with pytest.raises(WebhookVerificationError):
        verifier.verify(tampered, headers)


@pytest.mark.parametrize("secret", ["nope", "whsec_", "whsec_not base64!", "sk_" + SECRET[6:]])
def test_a_malformed_secret_refuses_to_start_without_echoing_it(secret: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"WEBHOOK_SECRET": secret})
    message = str(caught.value)
    assert "WEBHOOK_SECRET" in message and "\n" not in message
    assert secret not in message or secret == "whsec_"


# -- addresses -----------------------------------------------------------------


@pytest.mark.parametrize(
    "address",
    ["127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "::1",
     "fe80::1", "fd00::1", "0.0.0.0", "::ffff:127.0.0.1", "100.64.0.1", "224.0.0.1",
     "64:ff9b::7f00:1", "2002:7f00:1::", "2002:a00:1::"],
)  # fmt: skip
def test_loopback_private_link_local_and_the_like_are_forbidden(address: str) -> None:
    assert forbidden(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ["93.184.215.14", "1.1.1.1", "2606:4700:4700::1111"])
def test_public_addresses_are_allowed(address: str) -> None:
    assert not forbidden(ipaddress.ip_address(address))


@pytest.mark.parametrize(
    "url",
    [
        "ftp://example.com/",
        "example.com/hook",
        "http:///nohost",
        "http://x:99999/",
        f"http://{'a' * 64}.com/x",  # a label of more than 63 characters
        "http://a..b/x",
    ],
)
def test_only_http_urls_with_a_host_are_taken(url: str) -> None:
    with pytest.raises(WebhookRefused):
        parse_url(url)


def test_default_ports_follow_the_scheme() -> None:
    assert parse_url("https://example.com/h") == ("example.com", 443)
    assert parse_url("http://example.com:8080/h") == ("example.com", 8080)


@pytest.mark.parametrize("url", ["http://127.0.0.1:9/h", "http://[::1]/h", "http://10.0.0.1/"])
async def test_a_private_literal_is_refused_unless_allowed(url: str) -> None:
    with pytest.raises(WebhookRefused, match="private"):
        await check_public(url, allow_private=False)
    await check_public(url, allow_private=True)


async def test_a_name_resolving_to_loopback_is_refused() -> None:
    with pytest.raises(WebhookRefused, match="localhost"):
        await check_public("http://localhost:8080/hook", allow_private=False)


# -- the schedule -----------------------------------------------------------------


def _judge(
    status: int | None, retry_after: str | None = None, *, tries: int = 1, owed_for_s: float = 0
) -> object:
    return judge(
        status,
        retry_after,
        "ConnectionError: refused",
        tries=tries,
        owed_for_s=owed_for_s,
        retry_for_s=100.0,
        jitter=0.5,
        now_s=NOW_S,
    )


@pytest.mark.parametrize("status", [200, 201, 204, 299])
def test_any_2xx_is_delivered(status: int) -> None:
    assert _judge(status) == Delivered()


def test_410_means_no_more_tries() -> None:
    assert _judge(410) == Gone()


@pytest.mark.parametrize("status", [None, 301, 400, 404, 429, 500, 503])
def test_anything_else_is_retried_first_within_one_to_two_seconds(status: int | None) -> None:
    verdict = _judge(status)
    assert isinstance(verdict, RetryLater)
    assert 1.0 <= verdict.delay_s < 2.0
    assert verdict.reason in ("ConnectionError: refused", f"answered {status}")


def test_the_wait_doubles_per_try() -> None:
    assert [backoff_s(tries, 0.0) for tries in (1, 2, 3, 4)] == [1.0, 2.0, 4.0, 8.0]
    assert backoff_s(1, 0.999) < 2.0


def test_a_longer_retry_after_wins_a_shorter_does_not() -> None:
    longer = _judge(503, "30")
    assert isinstance(longer, RetryLater) and longer.delay_s == 30.0
    shorter = _judge(503, "0", tries=3)
    assert isinstance(shorter, RetryLater) and shorter.delay_s == 4.0 * 1.5


def test_retry_after_as_an_http_date() -> None:
    date = email.utils.formatdate(NOW_S + 20, usegmt=True)
    assert retry_after_s(date, NOW_S) == pytest.approx(20.0)
    assert retry_after_s("garbage", NOW_S) is None
    assert retry_after_s(None, NOW_S) is None


def test_a_wait_past_the_window_is_cut_to_one_last_try_at_its_end() -> None:
    verdict = _judge(500, tries=7, owed_for_s=90)  # 64-128 s more would pass 100 s
    assert isinstance(verdict, RetryLater) and verdict.delay_s == pytest.approx(10.0)
    longer = _judge(503, "3600", owed_for_s=40)  # Retry-After past the window: same
    assert isinstance(longer, RetryLater) and longer.delay_s == pytest.approx(60.0)


def test_at_the_end_of_the_window_it_is_dead() -> None:
    verdict = _judge(500, tries=8, owed_for_s=100)
    assert isinstance(verdict, Dead)
    assert "answered 500" in verdict.reason and "8 tries" in verdict.reason


def test_each_wait_goes_to_the_queue_of_its_power_of_two() -> None:
    assert [level_of(d) for d in (0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 1e9)] == [0, 0, 1, 1, 2, 2, 17]


# -- turns per endpoint ----------------------------------------------------------


async def test_an_endpoint_runs_its_share_a_few_wait_the_rest_come_back_later() -> None:
    endpoints = Endpoints(per_endpoint=2, max_waiting=1)
    release = asyncio.Event()
    got: list[tuple[str, bool]] = []

    async def deliver(url: str) -> None:
        async with endpoints.turn(url) as mine:
            got.append((url, mine))
            if mine:
                await release.wait()

    slow = "http://slow.example:80/a"
    async with anyio.create_task_group() as group:
        for _ in range(4):
            group.start_soon(deliver, slow)
        await wait_until(lambda: len(got) == 3 and endpoints.waiting == 1)
        # Two run, one waits, the fourth is told to come back later...
        assert got == [(slow, True), (slow, True), (slow, False)]
        # ...while another endpoint is not held up at all.
        group.start_soon(deliver, "https://fast.example/b")
        await wait_until(lambda: len(got) == 4)
        assert got[3] == ("https://fast.example/b", True)
        release.set()
    assert got.count((slow, True)) == 3  # the waiter got a turn when one ended


async def test_a_waiter_cancelled_leaves_its_place_to_the_next() -> None:
    endpoints = Endpoints(per_endpoint=2, max_waiting=2)
    release = asyncio.Event()
    served: list[int] = []

    async def deliver(number: int) -> None:
        async with endpoints.turn("http://one.example/") as mine:
            assert mine
            served.append(number)
            await release.wait()

    running = [asyncio.create_task(deliver(number)) for number in (1, 2)]
    await wait_until(lambda: served == [1, 2])
    gives_up, stays = asyncio.create_task(deliver(3)), asyncio.create_task(deliver(4))
    await wait_until(lambda: endpoints.waiting == 2)
    gives_up.cancel()
    await wait_until(lambda: endpoints.waiting == 1)
    release.set()
    await asyncio.gather(*running, stays)
    assert served == [1, 2, 4]
    assert gives_up.cancelled()


async def wait_until(condition: Callable[[], bool]) -> None:
    with anyio.fail_after(2):
        while not condition():
            await asyncio.sleep(0.001)
