"""The two hot routes, served past Starlette's router, answer as the router would."""

from __future__ import annotations

import logging
from collections.abc import MutableMapping
from typing import Any

import httpx
import pytest
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Scope

from service.http.api import plain_asgi
from service.http.errors import EXCEPTION_HANDLERS, ApiError
from service.http.hotroutes import HotRoutes
from service.http.responses import JsonResponse
from tests.support import LiveApp, submit_async, wait_finished

Sent = list[MutableMapping[str, Any]]


def _scope(method: str, path: str, root_path: str = "") -> Scope:
    return {"type": "http", "method": method, "path": path, "root_path": root_path, "headers": []}


async def _no_body() -> MutableMapping[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


def _routes(get: plain_asgi) -> HotRoutes:
    async def predict(_: Request) -> Response:
        return JsonResponse({"posted": True})

    return HotRoutes(get, predict, EXCEPTION_HANDLERS)


async def _served(routes: HotRoutes, scope: Scope) -> Sent:
    app = routes.match(scope)
    assert app is not None
    sent: Sent = []

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    await app(scope, _no_body, send)
    return sent


async def test_only_the_two_routes_are_taken_past_the_router() -> None:
    async def found(scope: Scope) -> Response:
        return JsonResponse({"id": scope["path_params"]["prediction_id"]})

    routes = _routes(plain_asgi(found))
    for method, path in (("HEAD", "/predict/x"), ("GET", "/predict"), ("POST", "/predict/x")):
        assert routes.match(_scope(method, path)) is None, (method, path)
    assert routes.match(_scope("GET", "/predict/x", root_path="/api")) is None
    # The router's `.*$` stops at a newline: those stay its own, as HEAD's are.
    assert routes.match(_scope("GET", "/predict/x\n")) is None
    assert routes.match(_scope("GET", "/predict/a\nb")) is None
    scope = _scope("GET", "/predict/a/b")
    sent = await _served(routes, scope)
    assert sent[1]["body"] == b'{"id":"a/b"}'  # any string, slashes included, as `:path`
    assert isinstance(scope["endpoint"], plain_asgi)  # what /metrics labels the route by


async def test_their_errors_get_the_apps_answers_and_the_unexpected_go_up() -> None:
    async def refused(_: Scope) -> Response:
        raise ApiError(503, "not now", {"Retry-After": "1"})

    sent = await _served(_routes(plain_asgi(refused)), _scope("GET", "/predict/x"))
    assert sent[0]["status"] == 503
    assert (b"retry-after", b"1") in sent[0]["headers"]
    assert sent[1]["body"] == b'{"error":"not now"}'

    async def broken(_: Scope) -> Response:
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError):  # to ServerErrorMiddleware, which answers a JSON 500
        await _served(_routes(plain_asgi(broken)), _scope("GET", "/predict/x"))


async def test_get_and_head_agree_on_a_path_with_a_newline(live: LiveApp) -> None:
    prediction_id = await submit_async(live.client, "x")
    await wait_finished(live.client, prediction_id)
    for path in (f"/predict/{prediction_id}%0A", "/predict/a%0Ab"):
        got = await live.client.get(path)
        head = await live.client.head(path)
        assert (got.status_code, len(got.content)) == (
            head.status_code,
            int(head.headers["content-length"]),
        ), path


async def test_an_unexpected_error_on_a_hot_route_is_a_logged_json_500(
    live: LiveApp, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(_: str) -> None:
        raise RuntimeError("a bug in the handler")

    monkeypatch.setattr("service.http.api.decode_predict_request", broken)
    async with httpx.AsyncClient(base_url=live.client.base_url) as client:
        with caplog.at_level(logging.ERROR):
            response = await client.post("/predict", json={"input": "x"})
    assert response.status_code == 500
    assert response.json() == {"error": "Internal server error."}
    assert "a bug in the handler" in caplog.text
