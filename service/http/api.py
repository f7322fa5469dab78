"""The route handlers. Each one parses, calls one service, and answers."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from service.http.errors import ApiError
from service.http.idempotency import parse_key
from service.http.instrument import ACCEPTED_ID_KEY
from service.http.lifecycle import enqueue, submit_keyed
from service.http.lookup import RETRY_AFTER_S, find, unavailable_as_503
from service.http.protocol import CANCEL_ON_DISCONNECT_KEY, CLIENT_GONE_KEY
from service.http.requests import (
    ClientHeaders,
    decode_predict_request,
    preferences,
    read_body,
    requested_wait_s,
    wants_async,
)
from service.http.responses import (
    CANCELED,
    NOT_FOUND,
    STILL_PROCESSING,
    JsonResponse,
    NotedResponse,
    accepted_response,
    error_response,
)
from service.http.webhooks import Requested, requested_webhook
from service.metrics import CONTENT_TYPE
from service.model import ModelError
from service.schemas import (
    Accepted,
    PredictionResponse,
    PredictRequest,
    PredictResponse,
    StatusResponse,
    json_encoder,
)
from service.services import Services
from service.store import Found, Pending

log = logging.getLogger(__name__)


# Constant bodies are encoded once.
_HEALTHY = json_encoder.encode(StatusResponse("ok"))
_READY = json_encoder.encode(StatusResponse("ready"))


class plain_asgi:
    """Serve a handler as a plain ASGI endpoint: `handler(scope) -> Response`.

    Starlette wraps a function endpoint in a Request and a per-route
    exception handler; for the hottest route, reading nothing but the
    scope, that was a measurable share of a GET. Errors raised here are
    still answered by the app's ExceptionMiddleware.
    """

    def __init__(self, handler: Callable[[Scope], Awaitable[Response]]) -> None:
        self.handler = handler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = await self.handler(scope)
        await response(scope, receive, send)


def services_of(request: Request) -> Services:
    # The lifespan's state dict, read directly: request.state wraps it in a
    # new State object on every request.
    services: Services = request.scope["state"]["services"]
    return services


async def predict(request: Request) -> Response:
    services = services_of(request)
    headers = ClientHeaders(request)
    body = await read_body(request, headers, services.settings.max_body_bytes)
    payload = decode_predict_request(body)
    key = parse_key(headers.idempotency_key)
    async_mode = wants_async(headers)
    webhook = await requested_webhook(services.settings, payload, async_mode)
    if key is not None:
        response = await _keyed(
            services, key, payload, async_mode, webhook=webhook, scope=request.scope
        )
    elif async_mode:
        response = await _accept(services, payload.input, webhook, request.scope)
    else:
        return await _predict_now(services, payload.input, request.scope)
    if async_mode and "respond-async" in preferences(headers.prefer):
        response.headers["Preference-Applied"] = "respond-async"
    return response


async def _keyed(
    services: Services,
    key: str,
    payload: PredictRequest,
    async_mode: bool,
    *,
    webhook: Requested,
    scope: Scope,
) -> Response:
    if async_mode:
        return await submit_keyed(services, key, payload, async_mode, webhook)
    # A sync one waits for the outcome: cut off if its client goes away.
    scope[CANCEL_ON_DISCONNECT_KEY] = asyncio.current_task()
    try:
        return await submit_keyed(services, key, payload, async_mode, webhook)
    except asyncio.CancelledError:
        return _cut_off(client_gone=CLIENT_GONE_KEY in scope)
    finally:
        del scope[CANCEL_ON_DISCONNECT_KEY]


async def _predict_now(services: Services, input: str, scope: Scope) -> Response:
    scope[CANCEL_ON_DISCONNECT_KEY] = asyncio.current_task()  # see http.protocol
    try:
        result = await services.runner.predict(input)
    except ModelError as exc:
        services.metrics.failed_sync.inc()
        _log_model_failure(exc)
        raise ApiError(500, f"Prediction failed: {exc}") from None
    except asyncio.CancelledError:
        return _cut_off(client_gone=CLIENT_GONE_KEY in scope)
    finally:
        del scope[CANCEL_ON_DISCONNECT_KEY]  # answering is not to be cut off
    services.metrics.completed_sync.inc()
    return JsonResponse(PredictResponse(input, result))


def _log_model_failure(exc: ModelError) -> None:
    # The reason at WARNING, the model's traceback only for DEBUG: a model
    # failing on bad inputs would otherwise flood the log.
    log.warning("sync prediction failed: %s", exc)
    if log.isEnabledFor(logging.DEBUG):
        log.debug("the model raised:", exc_info=exc.__cause__ or exc)


def _cut_off(*, client_gone: bool) -> Response:
    # Cancelled because the client went away (http.protocol), or because
    # SHUTDOWN_GRACE_S is over: uvicorn then cancels what still runs and
    # would answer a plain-text 500 of its own. Either way the cancellation
    # is the request's end, so it is answered, not propagated.
    task = asyncio.current_task()
    if task is not None:
        task.uncancel()
    if client_gone:
        # Nobody reads it; 499 (nginx's "client closed request") is for /metrics.
        return error_response(499, "The client closed the request.")
    # A JSON 503 the client can retry on a replica that is not stopping.
    return error_response(
        503,
        "The service stopped before the model answered; retry.",
        {"Retry-After": RETRY_AFTER_S},
    )


async def _accept(services: Services, input: str, webhook: Requested, scope: Scope) -> Response:
    prediction_id = str(uuid.uuid4())
    scope[ACCEPTED_ID_KEY] = prediction_id  # the request log's line names it
    url, events = webhook
    task = Accepted(prediction_id, input, time.time(), webhook=url, webhook_events=events)
    await enqueue(services, task)
    services.metrics.accepted.inc()
    log.info("prediction accepted", extra={"prediction_id": prediction_id})
    return accepted_response(prediction_id)


@plain_asgi
async def get_prediction(scope: Scope) -> Response:
    services: Services = scope["state"]["services"]
    prediction_id: str = scope["path_params"]["prediction_id"]
    wait_s = requested_wait_s(scope, services.settings.max_wait_s)
    entry = services.store.get(prediction_id)  # memory: the hot path
    if entry is None:
        entry = await find(services, prediction_id)
    if wait_s is None or wait_s <= 0 or not isinstance(entry, Pending):
        # Answered at once: no wait was applied, so none is said.
        return _prediction_response(prediction_id, entry)
    try:
        entry = await _long_poll(scope, services, prediction_id, wait_s)
    except asyncio.CancelledError:
        return _cut_off(client_gone=CLIENT_GONE_KEY in scope)
    response = _prediction_response(prediction_id, entry)
    response.headers["Preference-Applied"] = f"wait={wait_s:g}"
    return response


async def _long_poll(scope: Scope, services: Services, prediction_id: str, wait_s: float) -> Found:
    # Cancelled if its client goes away (http.protocol): the waiter is
    # released at once, not when the prediction ends or the wait is over.
    scope[CANCEL_ON_DISCONNECT_KEY] = asyncio.current_task()
    try:
        return await unavailable_as_503(services.store.wait_finished(prediction_id, wait_s))
    finally:
        del scope[CANCEL_ON_DISCONNECT_KEY]


def _prediction_response(prediction_id: str, entry: Found) -> Response:
    if entry is None:
        return error_response(404, NOT_FOUND)
    if isinstance(entry, Pending):
        return error_response(400, STILL_PROCESSING)
    if entry.result is not None:
        output = PredictResponse(entry.input, entry.result)
        return JsonResponse(PredictionResponse(prediction_id, output))
    if entry.canceled:
        return error_response(410, CANCELED)
    return error_response(500, f"Prediction failed: {entry.error}")


async def healthz(_: Request) -> Response:
    return JsonResponse(_HEALTHY)


async def readyz(request: Request) -> Response:
    reason = services_of(request).not_ready_reason()
    if reason is None:
        return JsonResponse(_READY)
    return error_response(503, reason)


async def metrics(request: Request) -> Response:
    return NotedResponse(services_of(request).metrics.render(), media_type=CONTENT_TYPE)
