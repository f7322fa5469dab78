"""Idempotency-Key on POST /predict (../shared/API.md): a retried submit runs the model once.

- A repeat with the same key and body gets the first answer: the same
  202 body, or for a sync request the same 200 / 500; the model runs once,
  also when two replicas get the key at the same moment.
- The same key with another body: 422. A malformed key: 400.
- A key lives as long as its prediction (RESULT_TTL_S), then names a new one.

The model (tests/keyed_predictors.py) counts its calls per input, in this
process: every replica here is in-process, so the count is the model's runs.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

import anyio
import httpx
import pytest

from service.http.idempotency import prediction_id_for
from service.settings import Settings
from tests import keyed_predictors
from tests.keyed_predictors import calls
from tests.support import (
    LiveApp,
    free_port,
    live_app,
    metric,
    metric_total,
    settings_for_test,
    submit_async,
    wait_finished,
)

NUMBERED = "tests.keyed_predictors:numbered"
FAILS = "tests.keyed_predictors:fails"
REUSED = b'{"error":"Idempotency-Key reused with a different request."}'
REPEATS = "idempotent_repeats_total"
DROPPED = 'http_requests_total{method="POST",route="/predict",status="499"}'
# Past an outcome, long enough for a duplicate task (delivered when it was
# published, at the submit) to have started a run of its own.
DUPLICATE_RUN_GRACE_S = 0.5


@pytest.fixture(autouse=True)
def fresh_calls() -> None:
    keyed_predictors.calls.clear()


def _settings(rabbitmq_url: str, **changes: object) -> Settings:
    return settings_for_test(rabbitmq_url, **({"predictor": NUMBERED} | changes))


async def _post(
    client: httpx.AsyncClient, text: str, key: str | bytes | None, *, async_mode: bool = True
) -> httpx.Response:
    """POST /predict with the key as the header's raw value (str: quoted as an sf-string)."""
    headers: list[tuple[bytes, bytes]] = []
    if async_mode:
        headers.append((b"Async-Mode", b"true"))
    if isinstance(key, str):
        headers.append((b"Idempotency-Key", f'"{key}"'.encode()))
    elif key is not None:
        headers.append((b"Idempotency-Key", key))
    return await client.post("/predict", json={"input": text}, headers=headers)


def _prediction_id(response: httpx.Response) -> str:
    assert response.status_code == 202, response.text
    prediction_id: str = response.json()["prediction_id"]
    assert str(uuid.UUID(prediction_id)) == prediction_id
    assert uuid.UUID(prediction_id).version == 4
    return prediction_id


async def _succeeded(client: httpx.AsyncClient, prediction_id: str) -> str:
    done = await wait_finished(client, prediction_id)
    assert done.status_code == 200, done.text
    result: str = done.json()["output"]["result"]
    return result


# -- repeats -----------------------------------------------------------------


async def test_an_async_repeat_gets_the_same_202_and_the_model_runs_once(
    rabbitmq_url: str,
) -> None:
    async with live_app(_settings(rabbitmq_url)) as live:
        first = await _post(live.client, "0.1 once", "k-repeat")
        again = await _post(live.client, "0.1 once", "k-repeat")
        prediction_id = _prediction_id(first)
        assert again.status_code == 202
        assert again.content == first.content
        assert again.headers["location"] == first.headers["location"]
        assert await metric(live.client, REPEATS) == 1
        assert await metric(live.client, "predictions_accepted_total") == 1

        done = await wait_finished(live.client, prediction_id)
        assert done.json() == {
            "prediction_id": prediction_id,
            "output": {"input": "0.1 once", "result": "0.1 once #1"},
        }
        # Once it is done, a repeat still gets the same 202.
        late = await _post(live.client, "0.1 once", "k-repeat")
        assert late.status_code == 202
        assert late.content == first.content
        await asyncio.sleep(DUPLICATE_RUN_GRACE_S)
        assert calls == {"0.1 once": 1}
        assert await metric(live.client, REPEATS) == 2


async def test_the_same_key_at_two_replicas_at_once_is_one_prediction(rabbitmq_url: str) -> None:
    settings = _settings(rabbitmq_url)
    async with (
        live_app(settings) as first,
        live_app(settings.with_changes(port=free_port()), keep_namespace=True) as second,
    ):
        texts = [f"0.3 race {i}" for i in range(8)]

        async def both_at_once(i: int, text: str) -> tuple[httpx.Response, httpx.Response]:
            key = f"k-race-{i}"
            here, there = await asyncio.gather(
                _post(first.client, text, key), _post(second.client, text, key)
            )
            return here, there

        pairs = await asyncio.gather(*(both_at_once(i, text) for i, text in enumerate(texts)))
        for text, (here, there) in zip(texts, pairs, strict=True):
            prediction_id = _prediction_id(here)
            assert there.status_code == 202, there.text
            assert there.content == here.content
            # Both replicas tell the same outcome, of one run.
            assert await _succeeded(first.client, prediction_id) == f"{text} #1"
            assert await _succeeded(second.client, prediction_id) == f"{text} #1"
        # Sync requests, too: both clients wait for the same run.
        sync_here, sync_there = await asyncio.gather(
            _post(first.client, "0.3 race sync", "k-race-sync", async_mode=False),
            _post(second.client, "0.3 race sync", "k-race-sync", async_mode=False),
        )
        expected = {"input": "0.3 race sync", "result": "0.3 race sync #1"}
        assert sync_here.status_code == sync_there.status_code == 200
        assert sync_here.json() == sync_there.json() == expected

        await asyncio.sleep(DUPLICATE_RUN_GRACE_S)
        assert calls == {text: 1 for text in [*texts, "0.3 race sync"]}
        # One prediction per key, the other submit of each was a repeat.
        clients = (first.client, second.client)
        assert sum([await metric_total(c, REPEATS) for c in clients]) == len(texts) + 1
        accepted = sum([await metric_total(c, "predictions_accepted_total") for c in clients])
        assert accepted == len(texts) + 1


async def test_an_async_repeat_while_running_answers_at_once(rabbitmq_url: str) -> None:
    async with live_app(_settings(rabbitmq_url)) as live:
        first = await _post(live.client, "2 slow", "k-running")
        prediction_id = _prediction_id(first)
        with anyio.fail_after(5):
            while (await live.client.get(f"/predict/{prediction_id}/status")).json()[
                "status"
            ] != "processing":
                await asyncio.sleep(0.02)
        started_s = time.monotonic()
        again = await _post(live.client, "2 slow", "k-running")
        assert time.monotonic() - started_s < 0.5  # not held until the model answers
        assert again.status_code == 202
        assert again.content == first.content
        assert (await live.client.get(f"/predict/{prediction_id}")).status_code == 400
        assert await _succeeded(live.client, prediction_id) == "2 slow #1"
        assert calls == {"2 slow": 1}


async def test_a_sync_repeat_while_running_waits_for_the_same_outcome(rabbitmq_url: str) -> None:
    async with live_app(_settings(rabbitmq_url)) as live:
        first = asyncio.create_task(
            _post(live.client, "2 sync slow", "k-sync-running", async_mode=False)
        )
        await asyncio.sleep(1)
        assert not first.done()
        repeated_s = time.monotonic()
        again = await _post(live.client, "2 sync slow", "k-sync-running", async_mode=False)
        # The first run's answer, half-way through: sooner than a run of its own.
        assert time.monotonic() - repeated_s < 1.8
        answer = await first
        expected = {"input": "2 sync slow", "result": "2 sync slow #1"}
        assert answer.status_code == again.status_code == 200
        assert answer.json() == again.json() == expected
        assert again.content == answer.content
        await asyncio.sleep(DUPLICATE_RUN_GRACE_S)
        assert calls == {"2 sync slow": 1}


# -- another body --------------------------------------------------------------


async def test_the_same_key_with_another_body_is_refused(rabbitmq_url: str) -> None:
    async with live_app(_settings(rabbitmq_url)) as live:
        first = await _post(live.client, "1 first body", "k-body")
        prediction_id = _prediction_id(first)
        # While the first is pending: async and sync alike, at once.
        for async_mode in (True, False):
            with anyio.fail_after(1):
                reused = await _post(live.client, "1 other body", "k-body", async_mode=async_mode)
            assert reused.status_code == 422
            assert reused.content == REUSED
            assert reused.headers["content-type"] == "application/json"
        assert await _succeeded(live.client, prediction_id) == "1 first body #1"
        # Once it is finished.
        for async_mode in (True, False):
            reused = await _post(live.client, "1 other body", "k-body", async_mode=async_mode)
            assert reused.status_code == 422
            assert reused.content == REUSED
        # The first body is still welcome, and what was refused never ran.
        assert (await _post(live.client, "1 first body", "k-body")).content == first.content
        await asyncio.sleep(DUPLICATE_RUN_GRACE_S)
        assert calls == {"1 first body": 1}


@pytest.mark.parametrize("async_mode", [True, False], ids=["async", "sync"])
async def test_the_same_key_with_bodies_sent_at_once_makes_one_prediction(
    rabbitmq_url: str, async_mode: bool
) -> None:
    # Several bodies with one key, all at the same moment or a few ms
    # apart: the first on the event stream is the prediction, every other
    # body is refused (422), none is told it was accepted, none gets
    # another body's result.
    async with live_app(_settings(rabbitmq_url)) as live:

        async def a_moment_later(text: str, key: str, delay_s: float) -> httpx.Response:
            await asyncio.sleep(delay_s)
            return await _post(live.client, text, key, async_mode=async_mode)

        answered = 202 if async_mode else 200
        for round_, stagger_s in enumerate([0.0, 0.001, 0.002, 0.003, 0.005, 0.008]):
            key = f"k-bodies-{round_}"
            texts = [f"0.2 body {round_}-{i}" for i in range(4)]
            responses = await asyncio.gather(
                *(a_moment_later(text, key, i * stagger_s) for i, text in enumerate(texts))
            )
            got = [
                (text, r.status_code, r.json()) for text, r in zip(texts, responses, strict=True)
            ]
            assert sorted(status for _, status, _ in got) == [answered, 422, 422, 422], got
            for text, status, body in got:
                if status == 422:
                    assert body == json.loads(REUSED)
                elif not async_mode:
                    assert body == {"input": text, "result": f"{text} #1"}, got
            winner = texts[[status for _, status, _ in got].index(answered)]
            prediction_id = prediction_id_for(key, live.settings.broker_namespace)
            assert await _succeeded(live.client, prediction_id) == f"{winner} #1"
        await asyncio.sleep(DUPLICATE_RUN_GRACE_S)
        assert set(calls.values()) == {1}
        assert len(calls) == 6


async def test_another_body_while_the_first_is_read_back_is_refused(rabbitmq_url: str) -> None:
    # The replica reads the event stream slowly, as under load: a submit it
    # has just published is pending here before the stream says whose it
    # is. Another body with the key, in that moment, is still refused.
    async with live_app(_settings(rabbitmq_url)) as live:
        _slow_down_the_follower(live, delay_s=0.3)
        for mode, answered in (("async", 202), ("sync", 200)):
            key, text = f"k-read-back-{mode}", f"0.2 first {mode}"
            prediction_id = prediction_id_for(key, live.settings.broker_namespace)
            async_mode = mode == "async"
            first = asyncio.create_task(_post(live.client, text, key, async_mode=async_mode))
            with anyio.fail_after(5):
                while live.services.store.get(prediction_id) is None:
                    await asyncio.sleep(0.002)
            other = await _post(live.client, f"0.2 other {mode}", key, async_mode=async_mode)
            assert (other.status_code, other.content) == (422, REUSED)
            assert (await first).status_code == answered
            assert await _succeeded(live.client, prediction_id) == f"{text} #1"
        assert calls == {"0.2 first async": 1, "0.2 first sync": 1}


def _slow_down_the_follower(live: LiveApp, delay_s: float) -> None:
    store = live.services.store
    apply_logged = store.apply_logged

    async def slower(*args: Any, **kwargs: Any) -> None:
        await asyncio.sleep(delay_s)
        await apply_logged(*args, **kwargs)

    store.apply_logged = slower  # type: ignore[method-assign]


# -- the header ----------------------------------------------------------------


MALFORMED_KEYS = {
    "empty": b"",
    "blank": b"   ",
    "empty sf-string": b'""',
    "256 characters": b"k" * 256,
    "256 characters quoted": b'"' + b"k" * 256 + b'"',
    "a space": b"k 123",
    "a space, quoted": b'"k 123"',
    "a non-ASCII byte": b"k-\xff",
    "a non-ASCII byte, quoted": b'"k-\xe9"',
    "an unterminated quote": b'"k-123',
    "a quote at the end only": b'k-123"',
    "two strings": b'"k-1", "k-2"',
}


async def _raw_post(port: int, key: bytes, *, async_mode: bool) -> tuple[int, bytes]:
    """POST /predict written by hand: httpx refuses to send some of these header values."""
    body = b'{"input":"x"}'
    request = (
        b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + (b"Async-Mode: true\r\n" if async_mode else b"")
        + b"Idempotency-Key: %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
        % (key, len(body), body)
    )
    with anyio.fail_after(5):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request)
        await writer.drain()
        answer = await reader.read()
        writer.close()
        await writer.wait_closed()
    head, _, content = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), content


async def test_a_malformed_key_answers_400(live: LiveApp) -> None:
    wrong: dict[str, tuple[int, bytes]] = {}
    for name, raw in MALFORMED_KEYS.items():
        for async_mode in (True, False):
            status, content = await _raw_post(live.settings.port, raw, async_mode=async_mode)
            if status != 400 or set(json.loads(content)) != {"error"}:
                wrong[f"{name} ({'async' if async_mode else 'sync'})"] = (status, content)
    assert wrong == {}, "\n".join(f"{name}: {answer}" for name, answer in wrong.items())
    # Nothing was accepted, nothing counted as a repeat.
    assert await metric(live.client, "predictions_accepted_total") == 0
    assert await metric(live.client, REPEATS) == 0


async def test_a_quoted_key_and_a_bare_one_name_the_same_prediction(live: LiveApp) -> None:
    quoted = _prediction_id(await _post(live.client, "x", b'"k-123"'))
    bare = _prediction_id(await _post(live.client, "x", b"k-123"))
    assert bare == quoted
    assert quoted == prediction_id_for("k-123", live.settings.broker_namespace)
    status, padded = await _raw_post(live.settings.port, b' \t"k-123" ', async_mode=True)
    assert status == 202
    assert json.loads(padded)["prediction_id"] == quoted
    # 255 visible ASCII characters is the longest key.
    longest = "".join(chr(0x21 + i % 94) for i in range(255)).replace('"', "#").replace("\\", "/")
    long_quoted = _prediction_id(await _post(live.client, "y", longest))
    long_bare = _prediction_id(await _post(live.client, "y", longest.encode()))
    assert long_bare == long_quoted != quoted
    assert await metric(live.client, "predictions_accepted_total") == 2
    assert await metric(live.client, REPEATS) == 3


# -- sync ----------------------------------------------------------------------


async def test_a_keyed_sync_request_answers_as_an_unkeyed_one_and_repeats(
    rabbitmq_url: str,
) -> None:
    async with live_app(_settings(rabbitmq_url)) as live:
        unkeyed = await _post(live.client, "0.1 plain", None, async_mode=False)
        assert unkeyed.status_code == 200
        assert unkeyed.json() == {"input": "0.1 plain", "result": "0.1 plain #1"}

        answer = await _post(live.client, "0.1 keyed", "k-sync", async_mode=False)
        assert answer.status_code == 200
        assert answer.headers["content-type"] == unkeyed.headers["content-type"]
        assert answer.json() == {"input": "0.1 keyed", "result": "0.1 keyed #1"}
        again = await _post(live.client, "0.1 keyed", "k-sync", async_mode=False)
        assert again.status_code == 200
        assert again.content == answer.content
        # It is a prediction like any other: it can be polled by the id its key names.
        prediction_id = prediction_id_for("k-sync", live.settings.broker_namespace)
        assert await _succeeded(live.client, prediction_id) == "0.1 keyed #1"
        await asyncio.sleep(DUPLICATE_RUN_GRACE_S)
        assert calls == {"0.1 plain": 1, "0.1 keyed": 1}
        assert await metric(live.client, REPEATS) == 1


async def test_a_keyed_sync_retry_after_a_dropped_connection_gets_the_first_run(
    rabbitmq_url: str,
) -> None:
    async with live_app(_settings(rabbitmq_url)) as live:
        body = b'{"input":"2 dropped"}'
        request = (
            b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Idempotency-Key: "k-dropped"\r\nContent-Length: %d\r\n\r\n%s' % (len(body), body)
        )
        with anyio.fail_after(5):
            reader, writer = await asyncio.open_connection("127.0.0.1", live.settings.port)
            writer.write(request)
            await writer.drain()
            await asyncio.sleep(0.5)
            assert reader.at_eof() is False
            writer.close()  # the client gives up
            await writer.wait_closed()
            # The server saw it go: its wait was cut off (499), the run goes on.
            while await metric(live.client, DROPPED) < 1:
                await asyncio.sleep(0.02)
        assert calls == {"2 dropped": 1}
        retried_s = time.monotonic()
        retry = await _post(live.client, "2 dropped", "k-dropped", async_mode=False)
        # The run the dropped request started, sooner than a run of its own.
        assert time.monotonic() - retried_s < 1.8
        assert retry.status_code == 200
        assert retry.json() == {"input": "2 dropped", "result": "2 dropped #1"}
        await asyncio.sleep(DUPLICATE_RUN_GRACE_S)
        assert calls == {"2 dropped": 1}


async def test_a_keyed_sync_request_that_fails_for_good_repeats_its_500(
    rabbitmq_url: str,
) -> None:
    settings = _settings(rabbitmq_url, predictor=FAILS, max_attempts=1)
    async with live_app(settings) as live:
        failed = await _post(live.client, "doomed", "k-doomed", async_mode=False)
        assert failed.status_code == 500
        error = failed.json()["error"]
        assert set(failed.json()) == {"error"}
        assert error.startswith("Prediction failed: ")
        assert "no answer for 'doomed'" in error
        assert "Traceback" not in error
        again = await _post(live.client, "doomed", "k-doomed", async_mode=False)
        assert again.status_code == 500
        assert again.content == failed.content
        # A poll of its id says the same.
        prediction_id = prediction_id_for("k-doomed", settings.broker_namespace)
        polled = await live.client.get(f"/predict/{prediction_id}")
        assert polled.status_code == 500
        assert polled.content == failed.content
        await asyncio.sleep(DUPLICATE_RUN_GRACE_S)
        assert calls == {"doomed": 1}


# -- expiry, and requests without a key -------------------------------------------


async def test_a_key_names_a_new_prediction_once_its_result_expired(rabbitmq_url: str) -> None:
    settings = _settings(rabbitmq_url, result_ttl_s=2)
    async with live_app(settings) as live:
        first = _prediction_id(await _post(live.client, "0.1 short-lived", "k-ttl"))
        other = _prediction_id(await _post(live.client, "0.1 one body", "k-ttl-other"))
        assert await _succeeded(live.client, first) == "0.1 short-lived #1"
        assert await _succeeded(live.client, other) == "0.1 one body #1"
        with anyio.fail_after(settings.result_ttl_s + 5):
            while {
                (await live.client.get(f"/predict/{i}")).status_code for i in (first, other)
            } != {404}:
                await asyncio.sleep(0.1)

        again = await _post(live.client, "0.1 short-lived", "k-ttl")
        assert _prediction_id(again) == first  # the key's id, of a new prediction
        assert await _succeeded(live.client, first) == "0.1 short-lived #2"
        # The key is free for another body, too.
        renamed = _prediction_id(await _post(live.client, "0.1 another body", "k-ttl-other"))
        assert renamed == other
        assert await _succeeded(live.client, other) == "0.1 another body #1"
        await asyncio.sleep(DUPLICATE_RUN_GRACE_S)
        assert calls == {"0.1 short-lived": 2, "0.1 one body": 1, "0.1 another body": 1}
        assert await metric(live.client, REPEATS) == 0


async def test_requests_without_a_key_are_unaffected(rabbitmq_url: str) -> None:
    async with live_app(_settings(rabbitmq_url)) as live:
        ids = [await submit_async(live.client, "0.1 unkeyed") for _ in range(3)]
        assert len(set(ids)) == 3
        for prediction_id in ids:
            assert uuid.UUID(prediction_id).version == 4
        results = {await _succeeded(live.client, prediction_id) for prediction_id in ids}
        assert results == {"0.1 unkeyed #1", "0.1 unkeyed #2", "0.1 unkeyed #3"}
        plain = await _post(live.client, "0.1 unkeyed", None, async_mode=False)
        assert plain.json() == {"input": "0.1 unkeyed", "result": "0.1 unkeyed #4"}
        assert calls == {"0.1 unkeyed": 4}
        assert await metric(live.client, REPEATS) == 0
        assert await metric(live.client, "predictions_accepted_total") == 3


async def test_two_key_lines_are_no_single_key(rabbitmq_url: str) -> None:
    """Two Idempotency-Key lines are a comma-joined list (RFC 9110): 400, as the list is."""
    async with live_app(settings_for_test(rabbitmq_url)) as live:
        for headers in (
            [("Idempotency-Key", '"a1"'), ("Idempotency-Key", '"a2"')],
            [("Idempotency-Key", '"a1", "a2"')],
        ):
            response = await live.client.post(
                "/predict", json={"input": "x"}, headers=[("Async-Mode", "true"), *headers]
            )
            assert response.status_code == 400, response.text
            assert "Idempotency-Key" in response.json()["error"]
