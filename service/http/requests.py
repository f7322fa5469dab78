"""Reading what a client sent: a bounded body, Async-Mode and Prefer."""

from __future__ import annotations

import re

import msgspec
from starlette.requests import Request
from starlette.types import Scope

from service.http.errors import ApiError, BodyNotJson
from service.http.protocol import BODY_TIMED_OUT_KEY
from service.schemas import PredictRequest, request_decoder

# Headers of which the first one counts, and where ClientHeaders keeps them.
_FIRST_WINS = {
    b"content-length": "content_length",
    b"async-mode": "async_mode",
    b"idempotency-key": "idempotency_key",
}


class ClientHeaders:
    """The request headers the API reads, found in one pass over the raw ASGI list.

    Read from the raw list (lower-case names, as ASGI servers give them):
    request.headers builds a Headers object per request, and a scan per
    header costs more than one pass for all of them, on every POST.
    The first Content-Length and Async-Mode win; every Prefer counts.
    """

    __slots__ = ("async_mode", "content_length", "idempotency_key", "prefer")

    def __init__(self, request: Request) -> None:
        self.content_length: str | None = None
        self.async_mode: str | None = None
        self.idempotency_key: str | None = None
        self.prefer: list[str] = []
        for name, value in request.scope["headers"]:
            if name == b"prefer":
                self.prefer.append(value.decode("latin-1"))
                continue
            if name == b"idempotency-key" and self.idempotency_key is not None:
                # Two lines are one comma-joined list (RFC 9110): no single key, 400.
                self.idempotency_key += ", " + value.decode("latin-1")
                continue
            attribute = _FIRST_WINS.get(name)
            if attribute is not None and getattr(self, attribute) is None:
                setattr(self, attribute, value.decode("latin-1"))


async def read_body(request: Request, headers: ClientHeaders, limit_bytes: int) -> bytes:
    """The whole body, or 413 as soon as it is known to exceed the limit.

    A declared Content-Length over the limit is refused before reading a
    byte; a chunked body is counted as it arrives, so a huge one is never
    held in memory.
    """
    declared = headers.content_length
    if declared is not None and declared.isdigit() and int(declared) > limit_bytes:
        raise _too_large(limit_bytes)
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            raise _body_cut_off(request)
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > limit_bytes:
            raise _too_large(limit_bytes)
        if not message.get("more_body", False):
            # Most bodies arrive in one message: no list join needed.
            return b"".join((*chunks, chunk)) if chunks else chunk
        chunks.append(chunk)


SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def decode_predict_request(body: bytes) -> PredictRequest:
    """400 if the body is not JSON or absurdly nested; 422 (ValidationError) if misshapen."""
    if not body.strip():
        raise ApiError(400, "Request body is empty.")
    if not body.isascii():
        # msgspec skips unknown fields without checking their UTF-8.
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BodyNotJson(f"invalid UTF-8 at byte {exc.start}") from None
    try:
        return request_decoder.decode(body)
    except msgspec.ValidationError:
        raise
    except msgspec.DecodeError as exc:
        raise BodyNotJson(_plainly(str(exc), body)) from None
    except RecursionError:
        # Unknown fields are skipped, but still parsed: `"x": [[[...]]]` a
        # thousand deep reaches Python's recursion limit in a 2 KB body.
        raise ApiError(400, "Request body is nested too deeply.") from None


def _body_cut_off(request: Request) -> ApiError:
    # Nobody reads this answer: the status is for the log and /metrics.
    if BODY_TIMED_OUT_KEY in request.scope:
        return ApiError(408, "The request body stalled.")  # the protocol answered 408
    return ApiError(499, "The client closed the request before sending its body.")


def _plainly(reason: str, body: bytes) -> str:
    # msgspec says "truncated" for a body that stops mid-value, and for a
    # lone surrogate escape too (a string Python could not encode again).
    if reason != "Input data was truncated":
        return reason
    if SURROGATE_ESCAPE.search(body):
        return "it holds a \\uD800-\\uDFFF escape that is not half of a pair"
    return "it ends before the JSON value is complete"


def wants_async(headers: ClientHeaders) -> bool:
    """`Async-Mode: true` (any case, blanks ignored) or `Prefer: respond-async`."""
    mode = headers.async_mode
    if mode is not None and mode.strip().lower() == "true":
        return True
    return "respond-async" in preferences(headers.prefer)


def requested_wait_s(scope: Scope, cap_s: float) -> float | None:
    """`Prefer: wait=N` as seconds capped at `cap_s`; None if absent or malformed."""
    value = preferences(header_values(scope, b"prefer")).get("wait")
    if value is None:
        return None
    try:
        wait_s = float(value)
    except ValueError:
        return None
    if not wait_s >= 0:  # also rejects NaN
        return None
    return min(wait_s, cap_s)


def preferences(prefer_headers: list[str]) -> dict[str, str]:
    """RFC 7240 preferences: `Prefer: respond-async, wait=10; x=y` -> {name: value}.

    Names are case-insensitive; parameters after `;` are ignored; the first
    occurrence of a preference wins, as the RFC asks.
    """
    found: dict[str, str] = {}
    for header in prefer_headers:
        for item in header.split(","):
            name, _, value = item.split(";", 1)[0].partition("=")
            name = name.strip().lower()
            if name and name not in found:
                found[name] = value.strip().strip('"')
    return found


def header_values(scope: Scope, name: bytes) -> list[str]:
    """Every value of header `name` (lower-case), from the raw ASGI list."""
    return [value.decode("latin-1") for key, value in scope["headers"] if key == name]


def _too_large(limit_bytes: int) -> ApiError:
    return ApiError(413, f"Request body is larger than {limit_bytes} bytes.")
