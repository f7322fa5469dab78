"""JSON responses encoded once, by msgspec, at the edge."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from service.schemas import AcceptedResponse, ErrorResponse, json_encoder

JSON_CONTENT_TYPE = (b"content-type", b"application/json")
# Where a response leaves its status for InstrumentMiddleware (see there).
STATUS_KEY = "service.status"

# The contract's fixed messages (../shared/API.md), byte for byte.
ACCEPTED_MESSAGE = "Request received. Processing asynchronously."
STILL_PROCESSING = "Prediction is still being processed."
NOT_FOUND = "Prediction ID not found."
CANCELED = "Prediction was canceled."


class NotedResponse(Response):
    """A response that notes its status in the ASGI scope as it is sent.

    Every response the app sends is one of these, so the metrics middleware
    reads the status from the scope instead of wrapping `send`, which cost
    a closure and an extra await per message on every request.
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Response.__call__'s two sends, without its websocket and background
        # branches: the app serves HTTP only and runs no background tasks.
        scope[STATUS_KEY] = self.status_code
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        await send({"type": "http.response.body", "body": self.body})


class HtmlResponse(NotedResponse):
    media_type = "text/html"


class JsonResponse(NotedResponse):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return content if isinstance(content, bytes) else json_encoder.encode(content)

    def init_headers(self, headers: Mapping[str, str] | None = None) -> None:
        if headers:
            super().init_headers(headers)
            return
        # The common case, without the general method's checks: a JSON body
        # needs its length and type, nothing else.
        self.raw_headers = [(b"content-length", b"%d" % len(self.body)), JSON_CONTENT_TYPE]


def error_response(
    status_code: int, message: str, headers: Mapping[str, str] | None = None
) -> JsonResponse:
    """The contract's one error shape: {"error": "<message>"}."""
    return JsonResponse(ErrorResponse(message), status_code, headers=headers)


def accepted_response(prediction_id: str) -> JsonResponse:
    """The 202 of an async submit, with where to ask for the prediction."""
    return JsonResponse(
        AcceptedResponse(ACCEPTED_MESSAGE, prediction_id),
        202,
        headers={"Location": f"/predict/{prediction_id}"},
    )
