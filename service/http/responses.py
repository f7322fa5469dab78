"""JSON responses encoded once, by msgspec, at the edge."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from starlette.responses import Response

from service.schemas import ErrorResponse, json_encoder


class JsonResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return content if isinstance(content, bytes) else json_encoder.encode(content)


def error_response(
    status_code: int, message: str, headers: Mapping[str, str] | None = None
) -> JsonResponse:
    """The contract's one error shape: {"error": "<message>"}."""
    return JsonResponse(ErrorResponse(message), status_code, headers=headers)
