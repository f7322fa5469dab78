"""Every failure becomes {"error": "..."} with the right status, never a trace."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import msgspec
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from service.http.responses import error_response

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An answer other than success, raised from anywhere in a handler."""

    def __init__(
        self, status_code: int, message: str, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.headers = headers


class BodyNotJson(ApiError):
    def __init__(self, detail: str) -> None:
        super().__init__(400, f"Request body is not valid JSON: {detail}")


async def on_api_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(exc.status_code, exc.message, exc.headers)


async def on_validation_error(_: Request, exc: Exception) -> Response:
    # msgspec names the field and what it expected, e.g.
    # "Expected `str`, got `int` - at `$.input`".
    text = str(exc)
    if "$.webhook" in text:  # about the optional fields: the rest is fine
        return error_response(422, f"Invalid request: {text}.")
    return error_response(
        422, f"Invalid request: {text}; expected a JSON object with a string field `input`."
    )


async def on_http_exception(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return error_response(exc.status_code, exc.detail, exc.headers)


async def on_unexpected_error(request: Request, exc: Exception) -> Response:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, "Internal server error.")


EXCEPTION_HANDLERS = {
    ApiError: on_api_error,
    msgspec.ValidationError: on_validation_error,
    HTTPException: on_http_exception,
    Exception: on_unexpected_error,
}
