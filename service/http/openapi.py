"""The OpenAPI 3.1 document, its schemas generated from the msgspec types.

Built once per app: the schemas come from the same Structs the handlers
encode and decode, so the document cannot drift from the bodies.
"""

from __future__ import annotations

from typing import Any

import msgspec

from service.schemas import (
    AcceptedResponse,
    ErrorResponse,
    PredictionResponse,
    PredictionStatus,
    PredictRequest,
    PredictResponse,
    StatusResponse,
)

REF = "#/components/schemas/{name}"
JSON = "application/json"
_PREDICTION_ID = {
    "name": "prediction_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string"},
}


def build_openapi(version: str, max_wait_s: float) -> dict[str, Any]:
    (_, _, _, _, _, _, _), components = msgspec.json.schema_components(
        [
            PredictRequest,
            PredictResponse,
            AcceptedResponse,
            PredictionResponse,
            ErrorResponse,
            StatusResponse,
            PredictionStatus,
        ],
        ref_template=REF,
    )
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Prediction service",
            "version": version,
            "description": "Run the model now (sync) or queue it and poll by id (async).",
        },
        "paths": {
            "/predict": {"post": _predict_operation()},
            "/predict/{prediction_id}": {"get": _get_prediction_operation(max_wait_s)},
            "/predict/{prediction_id}/status": {"get": _status_of_operation()},
            "/predict/{prediction_id}/cancel": {"post": _cancel_operation()},
            "/healthz": {"get": _status_operation("Liveness: the process is up.", "ok")},
            "/readyz": {"get": _readyz_operation()},
            "/metrics": {"get": _text_operation("Prometheus metrics.", "text/plain")},
            "/openapi.json": {"get": _text_operation("This document.", JSON)},
            "/docs": {"get": _text_operation("Interactive API docs.", "text/html")},
        },
        "webhooks": {"prediction": {"post": _webhook_operation()}},
        "components": {"schemas": components},
    }


def _predict_operation() -> dict[str, Any]:
    return {
        "summary": "Predict, now or asynchronously",
        "operationId": "predict",
        "parameters": [
            _header("Async-Mode", "`true` (any case) queues the prediction and answers 202."),
            _header("Prefer", "`respond-async` (RFC 7240) does the same as `Async-Mode: true`."),
            _header(
                "Idempotency-Key",
                'A quoted string (`"order-123"`) or a bare token, 1 to 255 visible ASCII'
                " characters. A repeat with the same key and body within RESULT_TTL_S gets"
                " the first answer (the same prediction_id, or the same result) and the"
                " model runs once, whichever replica takes it.",
            ),
        ],
        "requestBody": {
            "required": True,
            # The body "Try it out" starts from: the optional webhook fields
            # left out (null would be sent as such, and means "none").
            "content": {JSON: {"schema": _ref(PredictRequest), "example": {"input": "string"}}},
        },
        "responses": {
            "200": _body("The model's answer.", PredictResponse),
            "202": _body(
                "Accepted; poll the Location.",
                AcceptedResponse,
                headers={
                    "Location": _header_doc("Where to poll: /predict/{prediction_id}."),
                    "Preference-Applied": _header_doc("`respond-async` when it was asked."),
                },
            ),
            "400": _error("The body is not JSON, or the Idempotency-Key is malformed."),
            "410": _error("Sync with an Idempotency-Key: the prediction was canceled."),
            "413": _error("The body is larger than MAX_BODY_BYTES."),
            "422": _error(
                "The JSON is not an object with a string `input`, the Idempotency-Key"
                " was used before with a different request, or the webhook cannot be"
                " honoured (webhooks off, a sync request, not http(s), a private address)."
            ),
            "500": _error("The model failed."),
            "503": _error(
                "Async: the broker could not take the task. Sync: the service stopped"
                " (SHUTDOWN_GRACE_S ran out) before the model answered. With an"
                " Idempotency-Key: the event log cannot be read or written. Retry later.",
                headers={"Retry-After": _header_doc("Seconds to wait before retrying.")},
            ),
        },
    }


def _get_prediction_operation(max_wait_s: float) -> dict[str, Any]:
    waited = {"Preference-Applied": _header_doc("`wait=N` when the request long-polled.")}
    return {
        "summary": "Read an async prediction",
        "operationId": "getPrediction",
        "parameters": [
            _PREDICTION_ID,
            _header(
                "Prefer",
                f"`wait=N`: hold the request until the prediction is done or N seconds pass "
                f"(at most {max_wait_s:g}).",
            ),
        ],
        "responses": {
            "200": _body("Done.", PredictionResponse, headers=waited),
            "400": _error("Still being processed.", headers=waited),
            "404": _error("No such prediction (or it expired).", headers=waited),
            "410": _error("The prediction was canceled.", headers=waited),
            "500": _error("The model failed for good.", headers=waited),
            "503": _unavailable(),
        },
    }


def _status_of_operation() -> dict[str, Any]:
    return {
        "summary": "A prediction's whole story: status, times, attempts, place in line",
        "operationId": "getPredictionStatus",
        "parameters": [_PREDICTION_ID],
        "responses": {
            "200": _body(
                "`status` is queued, processing, succeeded, failed or canceled; times are"
                " RFC 3339 UTC with milliseconds; `queued_ahead` (queued only) counts the"
                " queued predictions accepted before this one.",
                PredictionStatus,
            ),
            "404": _error("No such prediction (or it expired)."),
            "503": _unavailable(),
        },
    }


def _cancel_operation() -> dict[str, Any]:
    return {
        "summary": "Cancel a prediction, queued or running, on whichever replica",
        "operationId": "cancelPrediction",
        "parameters": [_PREDICTION_ID],
        "responses": {
            "200": _body(
                'The status afterwards: "canceled", or unchanged if it had finished'
                " (a cancel is idempotent; the first outcome on the log wins).",
                PredictionStatus,
            ),
            "404": _error("No such prediction (or it expired)."),
            "503": _unavailable(),
        },
    }


def _webhook_operation() -> dict[str, Any]:
    signed = "Standard Webhooks: HMAC-SHA256 keyed by WEBHOOK_SECRET."
    return {
        "summary": "What the service POSTs to a request's `webhook`",
        "description": "On `start` and `completed` (as `webhook_events_filter` asks), the"
        " status body. Retried with backoff until a 2xx, a 410 or WEBHOOK_RETRY_FOR_S.",
        "parameters": [
            _header("webhook-id", "The same on every try of one event: dedupe on it."),
            _header("webhook-timestamp", "Unix seconds of this try."),
            _header("webhook-signature", f"`v1,<base64>`; {signed}"),
        ],
        "requestBody": {"required": True, "content": {JSON: {"schema": _ref(PredictionStatus)}}},
        "responses": {"200": {"description": "Any 2xx: delivered. 410: no more tries."}},
    }


def _unavailable() -> dict[str, Any]:
    return _error(
        "The event log cannot be read or written right now; retry.",
        headers={"Retry-After": _header_doc("Seconds to wait before retrying.")},
    )


def _readyz_operation() -> dict[str, Any]:
    operation = _status_operation("Readiness: broker, event stream and worker are up.", "ready")
    operation["responses"]["503"] = _error("Not ready; the error says why.")
    return operation


def _status_operation(summary: str, status: str) -> dict[str, Any]:
    return {
        "summary": summary,
        "responses": {"200": _body(f'`{{"status": "{status}"}}`', StatusResponse)},
    }


def _text_operation(summary: str, media_type: str) -> dict[str, Any]:
    return {
        "summary": summary,
        "responses": {"200": {"description": summary, "content": {media_type: {}}}},
    }


def _body(
    description: str, struct: type[msgspec.Struct], headers: dict[str, Any] | None = None
) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": description,
        "content": {JSON: {"schema": _ref(struct)}},
    }
    if headers:
        response["headers"] = headers
    return response


def _error(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    return _body(description, ErrorResponse, headers)


def _ref(struct: type[msgspec.Struct]) -> dict[str, str]:
    return {"$ref": REF.format(name=struct.__name__)}


def _header(name: str, description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "header",
        "required": False,
        "description": description,
        "schema": {"type": "string"},
    }


def _header_doc(description: str) -> dict[str, Any]:
    return {"description": description, "schema": {"type": "string"}}
