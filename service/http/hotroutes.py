"""The two routes that carry the load, served without Starlette's router.

`GET /predict/{id}` and `POST /predict` are most of the traffic. Through
Starlette, each went through its ExceptionMiddleware (which wraps `send`),
the Router (a regular expression per route until one matches) and, for
the POST, a per-route exception wrapper: about 1.5 us of a 9 us GET. Here
they are matched by two string comparisons and called directly; the same
exception handlers answer their errors (an unexpected one still reaches
ServerErrorMiddleware, which logs it and answers a JSON 500). Any other
request, or any request under a root path, takes Starlette's way.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

if TYPE_CHECKING:
    from service.http.api import plain_asgi

PREDICTION_PREFIX = "/predict/"
# GET /predict/{id}/status, and a GET of /predict/{id}/cancel, take Starlette's way.
NOT_AN_ID = ("/status", "/cancel")
Handler = Callable[[Request, Exception], Awaitable[Response]]


class HotRoutes:
    def __init__(
        self,
        get_prediction: plain_asgi,
        predict: Callable[[Request], Awaitable[Response]],
        handlers: Mapping[type[Exception], Handler],
    ) -> None:
        self._get_prediction = get_prediction  # the route's endpoint: /metrics labels by it
        self._predict = predict
        # Only the errors the app answers itself: the rest go up, as in Starlette.
        self._handlers = {kind: h for kind, h in handlers.items() if kind is not Exception}

    def match(self, scope: Scope) -> Callable[[Scope, Receive, Send], Awaitable[None]] | None:
        """The app for this request if it is one of the two; the scope set as the router would."""
        method, path = scope["method"], scope["path"]
        if scope["root_path"] or "\n" in path:
            # A newline: the router's `.*$` reads "/predict/<id>\n" as <id>,
            # and no id at all past one; it answers those as it always has.
            return None
        if method == "GET" and path.startswith(PREDICTION_PREFIX) and not path.endswith(NOT_AN_ID):
            scope["endpoint"] = self._get_prediction
            scope["path_params"] = {"prediction_id": path[len(PREDICTION_PREFIX) :]}
            return self._serve_get
        if method == "POST" and path == "/predict":
            scope["endpoint"] = self._predict
            scope["path_params"] = {}
            return self._serve_post
        return None

    async def _serve_get(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            response = await self._get_prediction.handler(scope)
        except Exception as exc:
            await self._answer(exc, scope, receive, send)
            return
        await response(scope, receive, send)

    async def _serve_post(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive, send)
        try:
            response = await self._predict(request)
        except Exception as exc:
            await self._answer(exc, scope, receive, send)
            return
        await response(scope, receive, send)

    async def _answer(self, exc: Exception, scope: Scope, receive: Receive, send: Send) -> None:
        for kind in type(exc).__mro__:
            handler = self._handlers.get(kind)
            if handler is not None:
                response = await handler(Request(scope, receive, send), exc)
                await response(scope, receive, send)
                return
        raise exc
