"""Every row of the HTTP contract (shared/API.md), against the real app and broker."""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import AsyncIterator

import anyio
import httpx
import pytest

from service.settings import Settings
from tests.support import (
    LiveApp,
    dead_letters,
    free_port,
    live_app,
    settings_for_test,
    submit_async,
    wait_finished,
)

UUID4 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
ACCEPTED = b'{"message":"Request received. Processing asynchronously.","prediction_id":"%s"}'


async def test_sync_predict_answers_input_and_a_number(live: LiveApp) -> None:
    response = await live.client.post("/predict", json={"input": "hello"})
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    result = response.json()["result"]
    assert result.isdigit() and 1000 <= int(result) <= 20000
    assert response.content == b'{"input":"hello","result":"%s"}' % result.encode()


async def test_sync_predict_keeps_unicode_input_byte_exact(live: LiveApp) -> None:
    text = 'h\u00e9llo "w\u00f6rld"\n\u2603'
    response = await live.client.post("/predict", json={"input": text})
    assert response.status_code == 200
    assert response.json()["input"] == text


@pytest.mark.parametrize("value", ["true", "TRUE", "tRuE"])
async def test_async_mode_true_in_any_case_answers_202(live: LiveApp, value: str) -> None:
    response = await live.client.post(
        "/predict", json={"input": "x"}, headers={"Async-Mode": value}
    )
    assert response.status_code == 202
    prediction_id = response.json()["prediction_id"]
    assert UUID4.match(prediction_id)
    assert response.content == ACCEPTED % prediction_id.encode()
    assert response.headers["location"] == f"/predict/{prediction_id}"


async def test_async_mode_ignores_surrounding_blanks(live: LiveApp) -> None:
    # httpx refuses to send such a header, so write the request by hand.
    body = b'{"input":"x"}'
    request = (
        b"POST /predict HTTP/1.1\r\nHost: x\r\nAsync-Mode: \t True  \r\n"
        b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
    )
    with anyio.fail_after(5):
        reader, writer = await asyncio.open_connection("127.0.0.1", live.settings.port)
        writer.write(request)
        await writer.drain()
        answer = await reader.read()
        writer.close()
    assert answer.startswith(b"HTTP/1.1 202")


@pytest.mark.parametrize("value", ["false", "1", "yes", "", "true-ish"])
async def test_other_async_mode_values_stay_sync(live: LiveApp, value: str) -> None:
    response = await live.client.post(
        "/predict", json={"input": "x"}, headers={"Async-Mode": value}
    )
    assert response.status_code == 200
    assert response.json()["input"] == "x"


@pytest.mark.parametrize("prefer", ["respond-async", "wait=5, Respond-Async", "respond-async; x=1"])
async def test_prefer_respond_async_answers_202(live: LiveApp, prefer: str) -> None:
    response = await live.client.post("/predict", json={"input": "x"}, headers={"Prefer": prefer})
    assert response.status_code == 202
    assert response.headers["preference-applied"] == "respond-async"
    assert response.headers["location"].endswith(response.json()["prediction_id"])


async def test_poll_answers_400_while_processing_then_200(rabbitmq_url: str) -> None:
    settings = settings_for_test(rabbitmq_url, model_delay_min_s=0.8, model_delay_max_s=0.9)
    async with live_app(settings) as live:
        prediction_id = await submit_async(live.client, "slow one")
        pending = await live.client.get(f"/predict/{prediction_id}")
        assert pending.status_code == 400
        assert pending.content == b'{"error":"Prediction is still being processed."}'
        done = await wait_finished(live.client, prediction_id)
        assert done.status_code == 200
        result = done.json()["output"]["result"]
        assert done.content == (
            b'{"prediction_id":"%s","output":{"input":"slow one","result":"%s"}}'
            % (prediction_id.encode(), result.encode())
        )


@pytest.mark.parametrize(
    "prediction_id", [str(uuid.uuid4()), "not-a-uuid", "a/b/c", "%20", "a..b", "\u00e9"]
)
async def test_unknown_ids_answer_404(live: LiveApp, prediction_id: str) -> None:
    response = await live.client.get(f"/predict/{prediction_id}")
    assert response.status_code == 404
    assert response.content == b'{"error":"Prediction ID not found."}'


async def test_empty_id_answers_404(live: LiveApp) -> None:
    response = await live.client.get("/predict/")
    assert response.status_code == 404
    assert response.json() == {"error": "Prediction ID not found."}


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"{",
        b'{"input":"a"} trailing',
        b'{"input":"\xff"}',
        b'{"input":"a","extra":"\xc3\x28"}',
        b"\xef\xbb\xbf{}",
        b'{"input":"\\ud800"}',
    ],
)
async def test_body_that_is_not_json_answers_400(live: LiveApp, body: bytes) -> None:
    response = await live.client.post("/predict", content=body)
    assert response.status_code == 400
    assert set(response.json()) == {"error"}
    assert "not valid JSON" in response.json()["error"]


@pytest.mark.parametrize(
    "body",
    [
        b'{"input":"a","x":' + b"[" * 5000 + b"]" * 5000 + b"}",
        b'{"input":"a","x":' + b'{"a":' * 5000 + b"1" + b"}" * 5000 + b"}",
    ],
    ids=["deep array", "deep object"],
)
async def test_absurdly_nested_json_answers_400(live: LiveApp, body: bytes) -> None:
    response = await live.client.post("/predict", content=body)
    assert response.status_code == 400
    assert response.json() == {"error": "Request body is nested too deeply."}
    # Still fine: nesting well past what real clients send.
    ok = b'{"input":"a","x":' + b"[" * 500 + b"]" * 500 + b"}"
    assert (await live.client.post("/predict", content=ok)).status_code == 200


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"{}", "missing required field `input`"),
        (b'{"input": 1}', "Expected `str`, got `int` - at `$.input`"),
        (b'{"input": null}', "Expected `str`, got `null` - at `$.input`"),
        (b'{"input": ["a"]}', "Expected `str`, got `array` - at `$.input`"),
        (b"[1]", "Expected `object`, got `array`"),
        (b"null", "Expected `object`, got `null`"),
        (b'"input"', "Expected `object`, got `str`"),
    ],
)
async def test_wrong_shape_answers_422_naming_the_field(
    live: LiveApp, body: bytes, expected: str
) -> None:
    response = await live.client.post("/predict", content=body)
    assert response.status_code == 422
    message = response.json()["error"]
    assert expected in message
    assert "`input`" in message


async def test_unknown_fields_are_ignored(live: LiveApp) -> None:
    response = await live.client.post("/predict", json={"input": "x", "model": "v2", "n": [1]})
    assert response.status_code == 200
    assert set(response.json()) == {"input", "result"}


async def test_unknown_route_and_wrong_method_answer_json_errors(live: LiveApp) -> None:
    missing = await live.client.get("/nowhere")
    assert missing.status_code == 404
    assert missing.json() == {"error": "Not Found"}
    wrong_method = await live.client.get("/predict")
    assert wrong_method.status_code == 405
    assert wrong_method.json() == {"error": "Method Not Allowed"}
    assert "POST" in wrong_method.headers["allow"]


@pytest.mark.parametrize("path", ["/healthz/", "/docs/", "/docs/static/nothing.js"])
async def test_near_miss_paths_answer_the_json_404(live: LiveApp, path: str) -> None:
    response = await live.client.get(path)
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"error": "Not Found"}


async def test_sync_model_failure_answers_500_with_reason(rabbitmq_url: str) -> None:
    settings = settings_for_test(rabbitmq_url, predictor="tests.predictors:fails_on_boom")
    async with live_app(settings) as live:
        response = await live.client.post("/predict", json={"input": "boom"})
        assert response.status_code == 500
        assert response.content == b'{"error":"Prediction failed: RuntimeError: boom in input"}'
        healthy = await live.client.post("/predict", json={"input": "fine"})
        assert healthy.json() == {"input": "fine", "result": "42"}


async def test_sync_prediction_does_not_block_other_requests(rabbitmq_url: str) -> None:
    settings = settings_for_test(rabbitmq_url, model_delay_min_s=3, model_delay_max_s=3)
    async with live_app(settings) as live:
        slow = asyncio.create_task(live.client.post("/predict", json={"input": "slow"}))
        await asyncio.sleep(0.2)
        with anyio.fail_after(1.5):  # far less than the 3 s the model takes
            for _ in range(10):
                assert (await live.client.get("/healthz")).status_code == 200
                assert (await live.client.get("/predict/unknown")).status_code == 404
                await submit_async(live.client, "meanwhile")
        assert not slow.done()
        assert (await slow).status_code == 200


async def test_many_sync_predictions_wait_together_not_in_turn(rabbitmq_url: str) -> None:
    settings = settings_for_test(rabbitmq_url, model_delay_min_s=1, model_delay_max_s=1)
    async with live_app(settings) as live:
        with anyio.fail_after(4):  # 50 in turn would take 50 s
            responses = await asyncio.gather(
                *(live.client.post("/predict", json={"input": f"n{i}"}) for i in range(50))
            )
        assert [r.json()["input"] for r in responses] == [f"n{i}" for i in range(50)]


async def test_many_async_predictions_complete_with_their_inputs(rabbitmq_url: str) -> None:
    # 200 at once: a confirm may take over the tests' usual 2 s on a busy CI machine.
    async with live_app(settings_for_test(rabbitmq_url, publish_timeout_s=10)) as live:
        await _many_complete_with_their_inputs(live)


async def _many_complete_with_their_inputs(live: LiveApp) -> None:
    inputs = [f"input-{i}-\u00e9" for i in range(200)]
    ids = await asyncio.gather(*(submit_async(live.client, text) for text in inputs))
    assert len(set(ids)) == len(ids)
    for prediction_id, text in zip(ids, inputs, strict=True):
        response = await wait_finished(live.client, prediction_id)
        assert response.status_code == 200
        body = response.json()
        assert body["prediction_id"] == prediction_id
        assert body["output"]["input"] == text
        assert body["output"]["result"].isdigit()


class TestBodyLimit:
    @pytest.fixture
    def settings(self, rabbitmq_url: str) -> Settings:
        return settings_for_test(rabbitmq_url, max_body_bytes=100)

    async def test_body_at_the_limit_is_accepted(self, live: LiveApp) -> None:
        body = json.dumps({"input": "x" * 87}).encode()
        assert len(body) == 100
        assert (await live.client.post("/predict", content=body)).status_code == 200

    async def test_body_over_the_limit_answers_413(self, live: LiveApp) -> None:
        body = json.dumps({"input": "x" * 88}).encode()
        response = await live.client.post("/predict", content=body)
        assert response.status_code == 413
        assert response.json() == {"error": "Request body is larger than 100 bytes."}

    async def test_chunked_body_over_the_limit_answers_413(self, live: LiveApp) -> None:
        async def chunks() -> AsyncIterator[bytes]:
            yield b'{"input":"'
            for _ in range(10):
                yield b"x" * 50
            yield b'"}'

        response = await live.client.post("/predict", content=chunks())
        assert response.status_code == 413

    async def test_huge_declared_body_is_refused_before_it_is_sent(self, live: LiveApp) -> None:
        # Declare 10 GiB and send nothing: the answer must come at once.
        with anyio.fail_after(3):
            reader, writer = await asyncio.open_connection("127.0.0.1", live.settings.port)
            writer.write(
                b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 10737418240\r\n\r\n"
            )
            await writer.drain()
            status_line = await reader.readline()
            writer.close()
        assert status_line.startswith(b"HTTP/1.1 413")


async def test_async_answers_503_with_retry_after_when_broker_is_absent(rabbitmq_url: str) -> None:
    nowhere = f"amqp://guest:guest@127.0.0.1:{free_port()}/"
    settings = settings_for_test(nowhere, broker_connect_timeout_s=60)
    async with live_app(settings, wait_ready=False) as live:
        with anyio.fail_after(2):
            response = await live.client.post(
                "/predict", json={"input": "x"}, headers={"Async-Mode": "true"}
            )
        assert response.status_code == 503
        assert response.headers["retry-after"].isdigit()
        assert set(response.json()) == {"error"}
        # Sync predictions do not need the broker.
        assert (await live.client.post("/predict", json={"input": "x"})).status_code == 200
        ready = await live.client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json() == {"error": "The broker connection is down."}


async def test_async_poll_of_failed_model_answers_500(rabbitmq_url: str) -> None:
    settings = settings_for_test(
        rabbitmq_url, predictor="tests.predictors:always_fails", max_attempts=2
    )
    async with live_app(settings) as live:
        prediction_id = await submit_async(live.client, "doomed")
        response = await wait_finished(live.client, prediction_id)
        assert response.status_code == 500
        assert response.content == (
            b'{"error":"Prediction failed: ValueError: cannot predict \'doomed\'"}'
        )
        [dead] = await dead_letters(settings, 1)
        assert json.loads(dead)["prediction_id"] == prediction_id


async def test_healthz_answers_ok(live: LiveApp) -> None:
    response = await live.client.get("/healthz")
    assert response.status_code == 200
    assert response.content == b'{"status":"ok"}'


async def test_readyz_answers_ready_once_caught_up(live: LiveApp) -> None:
    response = await live.client.get("/readyz")
    assert response.status_code == 200
    assert response.content == b'{"status":"ready"}'


async def test_a_sync_client_that_goes_away_frees_its_model_slot(rabbitmq_url: str) -> None:
    settings = settings_for_test(
        rabbitmq_url, predictor="tests.predictors:sleeps_as_told", model_concurrency=1
    )
    async with live_app(settings) as live:
        with pytest.raises(httpx.ReadTimeout):
            # The only model slot, for 30 s, by a client that gives up at once.
            await live.client.post("/predict", json={"input": "30"}, timeout=0.5)
        with anyio.fail_after(5):
            response = await live.client.post("/predict", json={"input": "0.1"})
        assert response.json() == {"input": "0.1", "result": "0.1"}
        metrics = (await live.client.get("/metrics")).text
        assert 'route="/predict",status="499"' in metrics
        assert "predictions_in_flight 0.0" in metrics
