"""The prediction lifecycle: its status, a cancel, and keyed (idempotent) submits.

Every answer here is built from the event log as this replica has read
it, so every replica gives the same one. A cancel is an outcome on the
log like a result: the first outcome there wins, whoever wrote it, and
the replica running the model stops it when it reads the cancel
(service/consumer.py).
"""

from __future__ import annotations

import time
import uuid

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from service.broker import BrokerUnavailable
from service.http.errors import ApiError
from service.http.idempotency import REUSED, fingerprint, prediction_id_for
from service.http.lookup import RETRY_AFTER_S, find, read_back, unavailable_as_503
from service.http.responses import (
    CANCELED,
    NOT_FOUND,
    JsonResponse,
    accepted_response,
    error_response,
)
from service.http.webhooks import Requested
from service.schemas import (
    Accepted,
    Canceled,
    PredictionStatus,
    PredictRequest,
    PredictResponse,
    Status,
)
from service.services import Services
from service.store import Found, Pending, Prediction

# A keyed sync request waits for its outcome in rounds of this long (a
# long poll each), so that nothing is held past a replica's stop.
SYNC_ROUND_S = 60.0


def _services(request: Request) -> Services:
    services: Services = request.scope["state"]["services"]
    return services


# -- status ------------------------------------------------------------------


async def get_status(request: Request) -> Response:
    services = _services(request)
    prediction_id: str = request.path_params["prediction_id"]
    status = await current_status(services, prediction_id)
    if status is None:
        return error_response(404, NOT_FOUND)
    return JsonResponse(status)


async def current_status(services: Services, prediction_id: str) -> PredictionStatus | None:
    """The status body, as the log read up to now tells it; None if unknown."""
    found = await find(services, prediction_id)
    if not isinstance(found, Pending):
        return None if found is None else finished_status(prediction_id, found)
    text = await _pending_input(services, prediction_id)
    if text is None:
        # Noted here at accept time, not read back from the stream yet.
        found = await read_back(services, prediction_id)
        if not isinstance(found, Pending):
            return None if found is None else finished_status(prediction_id, found)
        text = await _pending_input(services, prediction_id)
        if text is None:
            raise _unreadable()
    return pending_status(prediction_id, found, text, services.store.queued_ahead(prediction_id))


def pending_status(prediction_id: str, stub: Pending, text: str, ahead: int) -> PredictionStatus:
    started = stub.started_at_s > 0
    return PredictionStatus(
        prediction_id,
        "processing" if started else "queued",
        text,
        None,
        None,
        rfc3339(stub.at_s),
        rfc3339(stub.started_at_s) if started else None,
        None,
        stub.attempts,
        None if started else ahead,
    )


def finished_status(prediction_id: str, entry: Prediction) -> PredictionStatus:
    return PredictionStatus(
        prediction_id,
        _how_it_ended(entry),
        entry.input,
        entry.result,
        entry.error,
        rfc3339(entry.created_at_s or entry.updated_at_s),
        rfc3339(entry.started_at_s) if entry.started_at_s else None,
        rfc3339(entry.updated_at_s),
        entry.attempts,
        None,
    )


def _how_it_ended(entry: Prediction) -> Status:
    if entry.canceled:
        return "canceled"
    return "succeeded" if entry.result is not None else "failed"


def rfc3339(at_s: float) -> str:
    """UTC with milliseconds, as API.md spells times: 2026-12-01T04:58:00.123Z."""
    whole_ms = int(at_s * 1000)
    seconds, ms = divmod(whole_ms, 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{ms:03d}Z"


async def _pending_input(services: Services, prediction_id: str) -> str | None:
    return await unavailable_as_503(services.store.pending_input(prediction_id))


def _unreadable() -> ApiError:
    return ApiError(
        503,
        "Cannot read this prediction's state right now; retry.",
        {"Retry-After": RETRY_AFTER_S},
    )


# -- cancel ------------------------------------------------------------------


async def cancel(request: Request) -> Response:
    services = _services(request)
    prediction_id: str = request.path_params["prediction_id"]
    status = await current_status(services, prediction_id)
    if status is None:
        return error_response(404, NOT_FOUND)
    if status.status not in ("queued", "processing"):
        return JsonResponse(status)  # finished: a cancel changes nothing
    await _publish(services, Canceled(prediction_id, status.input, time.time()))
    # Read back: the answer is the log's first outcome, the cancel or a
    # result that got there before it.
    found = await unavailable_as_503(
        services.store.wait_finished(prediction_id, services.settings.publish_timeout_s)
    )
    if not isinstance(found, Prediction):
        raise _unreadable()
    if found.canceled:
        services.metrics.canceled.inc()
    return JsonResponse(finished_status(prediction_id, found))


async def cancel_is_a_post(_: Request) -> Response:
    """A GET of a cancel URL: 405, as for any other method the route does not take."""
    raise HTTPException(405, headers={"Allow": "POST"})


async def _publish(services: Services, event: Canceled) -> None:
    try:
        await services.journal.record((event,))
    except BrokerUnavailable as exc:
        raise ApiError(
            503,
            f"The event log is unavailable ({exc}); retry later.",
            {"Retry-After": RETRY_AFTER_S},
        ) from None


# -- submits -----------------------------------------------------------------


async def enqueue(services: Services, task: Accepted) -> None:
    """Put the task on the queue (and the log), or answer 503: nothing was accepted."""
    try:
        await services.journal.accept(task)
    except BrokerUnavailable as exc:
        raise ApiError(
            503,
            f"The task queue is unavailable ({exc}); retry later.",
            {"Retry-After": RETRY_AFTER_S},
        ) from None


# -- keyed submits -----------------------------------------------------------


async def submit_keyed(
    services: Services,
    key: str,
    request: PredictRequest,
    async_mode: bool,
    webhook: Requested = ("", ()),
) -> Response:
    """Answer a keyed submit with the prediction its key names, made now if need be.

    A sync submit waits for the outcome (the model runs in a worker, so a
    retry after a dropped connection finds it); the caller answers a
    cancellation of this wait.
    """
    prediction_id = prediction_id_for(key, services.settings.broker_namespace)
    request_fingerprint = fingerprint(request)
    found = await find(services, prediction_id)
    if isinstance(found, Pending) and not found.logged:
        found = None  # a submit of this replica still on its way: the stream decides
    fresh = found is None
    if found is None:
        found = await _submit(services, prediction_id, request, request_fingerprint, webhook)
    if not _same_request(found, request, request_fingerprint):
        raise ApiError(422, REUSED)
    if not fresh:
        services.metrics.idempotent_repeats.inc()
    if async_mode:
        return accepted_response(prediction_id)
    return _sync_answer(prediction_id, await _outcome(services, prediction_id, found))


async def _submit(
    services: Services,
    prediction_id: str,
    request: PredictRequest,
    request_fingerprint: str,
    webhook: Requested,
) -> Pending | Prediction:
    """Publish the task, then read the stream back past it: the first with this id wins."""
    nonce = uuid.uuid4().hex
    url, events = webhook
    task = Accepted(
        prediction_id,
        request.input,
        time.time(),
        nonce=nonce,
        fingerprint=request_fingerprint,
        webhook=url,
        webhook_events=events,
    )
    await enqueue(services, task)
    found = await read_back(services, prediction_id)
    if found is None:
        raise _unreadable()
    if isinstance(found, Pending) and found.nonce == nonce:
        services.metrics.accepted.inc()
    else:
        services.metrics.idempotent_repeats.inc()
    return found


def _same_request(found: Pending | Prediction, request: PredictRequest, print_: str) -> bool:
    if isinstance(found, Pending):
        return not found.fingerprint or found.fingerprint == print_
    return found.input == request.input


async def _outcome(services: Services, prediction_id: str, found: Found) -> Found:
    store = services.store
    while isinstance(found, Pending) and not store.releasing:
        found = await unavailable_as_503(store.wait_finished(prediction_id, SYNC_ROUND_S))
    return found


def _sync_answer(prediction_id: str, found: Found) -> Response:
    if found is None:
        return error_response(404, NOT_FOUND)  # expired while waiting
    if isinstance(found, Pending):
        return error_response(
            503,
            "The service stopped before the model answered; retry with the same key.",
            {"Retry-After": RETRY_AFTER_S},
        )
    if found.result is not None:
        return JsonResponse(PredictResponse(found.input, found.result))
    if found.canceled:
        return error_response(410, CANCELED)
    return error_response(500, f"Prediction failed: {found.error}")
