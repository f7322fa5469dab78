"""The small edges: long polls end with their client, clear errors, failures logged, CSP."""

from __future__ import annotations

import asyncio
import logging

import anyio
import httpx
import pytest

from bench.httpclient import encode_request
from tests.support import LiveApp, live_app, metric, settings_for_test, submit_async


async def _raw_request(
    port: int, request: bytes
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    return reader, writer


async def test_a_long_poll_is_released_when_its_client_goes_away(
    rabbitmq_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    settings = settings_for_test(rabbitmq_url, model_delay_min_s=5, model_delay_max_s=5)
    async with live_app(settings) as live:
        prediction_id = await submit_async(live.client, "slow")
        request = encode_request("GET", f"/predict/{prediction_id}", headers={"Prefer": "wait=30"})
        connections = [await _raw_request(settings.port, request) for _ in range(20)]
        with anyio.fail_after(5):
            while await metric(live.client, "long_polls_waiting") < 20:
                await asyncio.sleep(0.02)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="service.access"):
            for _, writer in connections:
                writer.close()
            # Released at once, not when the model is done (5 s) or the wait is over (30 s).
            with anyio.fail_after(1):
                while await metric(live.client, "long_polls_waiting") > 0:
                    await asyncio.sleep(0.02)
            with anyio.fail_after(1):
                while len(_access_lines(caplog, " 499 ")) < 20:
                    await asyncio.sleep(0.02)
        answered = await metric(
            live.client,
            'http_requests_total{method="GET",route="/predict/{prediction_id}",status="499"}',
        )
        assert answered == 20
        # The prediction itself goes on, for whoever asks next.
        response = await live.client.get(f"/predict/{prediction_id}")
        assert response.status_code == 400


def _access_lines(caplog: pytest.LogCaptureFixture, fragment: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "service.access" and fragment in r.getMessage()
    ]


async def test_only_an_answer_that_waited_says_preference_applied(live: LiveApp) -> None:
    unknown = await live.client.get("/predict/no-such-id", headers={"Prefer": "wait=5"})
    assert unknown.status_code == 404
    assert "preference-applied" not in unknown.headers
    prediction_id = await submit_async(live.client, "quick")
    waited = await live.client.get(f"/predict/{prediction_id}", headers={"Prefer": "wait=5"})
    assert waited.status_code == 200
    assert waited.headers["preference-applied"] == "wait=5"
    # Finished already: answered at once, nothing waited.
    again = await live.client.get(f"/predict/{prediction_id}", headers={"Prefer": "wait=5"})
    assert again.status_code == 200
    assert "preference-applied" not in again.headers


@pytest.mark.parametrize("body", [b"", b"   ", b"\r\n"])
async def test_an_empty_body_says_so(live: LiveApp, body: bytes) -> None:
    response = await live.client.post(
        "/predict", content=body, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400
    assert response.json() == {"error": "Request body is empty."}


async def test_a_truncated_body_says_it_ends_early(live: LiveApp) -> None:
    response = await live.client.post("/predict", content=b'{"input": "abc')
    assert response.status_code == 400
    assert response.json() == {
        "error": "Request body is not valid JSON: it ends before the JSON value is complete"
    }


async def test_a_lone_surrogate_escape_is_not_called_truncated(live: LiveApp) -> None:
    response = await live.client.post("/predict", content=b'{"input": "a\\ud800b"}')
    assert response.status_code == 400
    assert response.json() == {
        "error": "Request body is not valid JSON: "
        "it holds a \\uD800-\\uDFFF escape that is not half of a pair"
    }


async def test_a_failed_sync_prediction_logs_its_reason(
    rabbitmq_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    settings = settings_for_test(rabbitmq_url, predictor="tests.predictors:always_fails")
    async with live_app(settings) as live:
        with caplog.at_level(logging.INFO):
            response = await live.client.post("/predict", json={"input": "x\n2026 FORGED"})
        assert response.status_code == 500
    [warning] = [
        r for r in caplog.records if r.levelno == logging.WARNING and "failed" in r.getMessage()
    ]
    assert warning.getMessage() == (
        "sync prediction failed: ValueError: cannot predict 'x\\n2026 FORGED'"
    )
    # The traceback only at DEBUG.
    assert not [r for r in caplog.records if r.exc_info]
    caplog.clear()
    async with live_app(settings) as live:
        with caplog.at_level(logging.DEBUG, logger="service"):
            await live.client.post("/predict", json={"input": "y"})
    [traced] = [r for r in caplog.records if r.exc_info]
    assert traced.levelno == logging.DEBUG


async def test_docs_carry_a_strict_content_security_policy(live: LiveApp) -> None:
    page = await live.client.get("/docs")
    policy = page.headers["content-security-policy"]
    assert "default-src 'none'" in policy
    assert "script-src 'self';" in policy and "unsafe-inline" not in policy
    assert "frame-ancestors 'none'" in policy
    # No inline script left for the policy to block: the set-up is a file.
    assert "<script>" not in page.text
    init = await live.client.get("/docs/static/swagger-init.js")
    assert init.status_code == 200
    assert "SwaggerUIBundle" in init.text
    assert init.headers["content-type"].startswith("text/javascript")


async def test_every_response_says_nosniff_and_names_no_server(live: LiveApp) -> None:
    async with httpx.AsyncClient(base_url=live.client.base_url) as client:
        for method, path in (
            ("GET", "/healthz"),
            ("GET", "/docs"),
            ("GET", "/nope"),
            ("POST", "/predict"),
        ):
            response = await client.request(method, path, content=b"{")
            assert response.headers["x-content-type-options"] == "nosniff", path
            assert "server" not in response.headers, path


async def test_a_websocket_upgrade_is_answered_as_plain_http(live: LiveApp) -> None:
    upgrade = {
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version": "13",
    }
    for path, status in (("/healthz", 200), ("/docs", 200), ("/nope", 404)):
        response = await live.client.get(path, headers=upgrade)
        assert response.status_code == status, path
        assert response.headers["x-content-type-options"] == "nosniff"


async def test_wait_zero_is_answered_at_once_and_says_nothing_applied(
    rabbitmq_url: str,
) -> None:
    settings = settings_for_test(rabbitmq_url, model_delay_min_s=5, model_delay_max_s=5)
    async with live_app(settings) as live:
        prediction_id = await submit_async(live.client, "slow")
        response = await live.client.get(f"/predict/{prediction_id}", headers={"Prefer": "wait=0"})
        assert response.status_code == 400
        assert "preference-applied" not in response.headers


async def test_the_request_line_of_an_accepted_prediction_names_its_id(
    live: LiveApp, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="service.access"):
        prediction_id = await submit_async(live.client, "named")
    [line] = [r for r in caplog.records if r.name == "service.access" and " 202 " in r.getMessage()]
    assert getattr(line, "prediction_id", None) == prediction_id
