"""JSON responses encoded once, by msgspec, at the edge."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from starlette.responses import Response

from service.schemas import ErrorResponse, json_encoder

JSON_CONTENT_TYPE = (b"content-type", b"application/json")


class JsonResponse(Response):
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
