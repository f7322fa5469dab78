"""/openapi.json describes what the service really answers.

Three parts: plain assertions that the document covers the contract (API.md)
and that its schemas are the code's msgspec types; schemathesis generating
requests from the document against a live `python -m service` and checking
every answer against it; and every documented status produced on purpose
(pending, failed, too large, broker down...) and checked the same way,
since random requests against an instant mock never reach those.
"""

from __future__ import annotations

import asyncio
import inspect
import uuid
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
import hypothesis
import msgspec
import pytest
import schemathesis
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import CheckContext, CheckFunction
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from service import schemas
from tests.support import (
    ServiceProcess,
    delete_namespace,
    free_port,
    live_app,
    settings_for_test,
    submit_async,
    wait_finished,
)

REF = "#/components/schemas/{name}"
JSON = "application/json"

# Every route, its method, and the statuses API.md (and the README, for the
# sync 500) promise, with the component each answer's body has. The 503 of
# the routes that read a prediction: the event log cannot be read right now.
ERROR = "ErrorResponse"
CONTRACT: dict[tuple[str, str], dict[str, str | None]] = {
    ("post", "/predict"): {
        "200": "PredictResponse",
        "202": "AcceptedResponse",
        "400": ERROR,  # not JSON, or a malformed Idempotency-Key
        "410": ERROR,  # sync, keyed, and its prediction was canceled
        "413": ERROR,
        "422": ERROR,  # not {"input": "<string>"}, or a key reused with another body
        "500": ERROR,
        "503": ERROR,
    },
    ("get", "/predict/{prediction_id}"): {
        "200": "PredictionResponse",
        "400": ERROR,
        "404": ERROR,
        "410": ERROR,
        "500": ERROR,
        "503": ERROR,
    },
    ("get", "/predict/{prediction_id}/status"): {
        "200": "PredictionStatus",
        "404": ERROR,
        "503": ERROR,
    },
    ("post", "/predict/{prediction_id}/cancel"): {
        "200": "PredictionStatus",
        "404": ERROR,
        "503": ERROR,
    },
    ("get", "/healthz"): {"200": "StatusResponse"},
    ("get", "/readyz"): {"200": "StatusResponse", "503": ERROR},
    ("get", "/metrics"): {"200": None},
    ("get", "/openapi.json"): {"200": None},
    ("get", "/docs"): {"200": None},
}
MEDIA_TYPES = {"/metrics": "text/plain", "/docs": "text/html"}
STATUS_KEYS = [
    "prediction_id",
    "status",
    "input",
    "result",
    "error",
    "created_at",
    "started_at",
    "completed_at",
    "attempts",
    "queued_ahead",
]


def http_types() -> list[type[msgspec.Struct]]:
    """Every HTTP body type of service/schemas.py (broker events are tagged)."""
    return [
        value
        for value in vars(schemas).values()
        if inspect.isclass(value)
        and issubclass(value, msgspec.Struct)
        and value.__module__ == schemas.__name__
        and value.__struct_config__.tag is None
    ]


# -- The live service -------------------------------------------------------


@pytest.fixture(scope="module")
async def service(rabbitmq_url: str) -> AsyncIterator[ServiceProcess]:
    """`python -m service` with a model that answers at once."""
    settings = settings_for_test(
        rabbitmq_url, model_delay_min_s=0, model_delay_max_s=0, max_wait_s=1
    )
    process = ServiceProcess(settings)
    try:
        await process.start()
        yield process
    finally:
        await process.stop()
        await delete_namespace(settings)


@pytest.fixture(scope="module")
async def document(service: ServiceProcess) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=service.base_url, timeout=10) as client:
        response = await client.get("/openapi.json")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith(JSON)
    body: dict[str, Any] = response.json()
    return body


# -- (a) The document covers the contract -----------------------------------


def test_document_is_openapi_3_1(document: dict[str, Any]) -> None:
    assert document["openapi"].startswith("3.1.")
    assert document["info"]["title"]
    assert document["info"]["version"]


def test_document_has_every_route(document: dict[str, Any]) -> None:
    documented = {(method, path) for path, item in document["paths"].items() for method in item}
    assert documented == set(CONTRACT)


@pytest.mark.parametrize(
    ("method", "path"), list(CONTRACT), ids=[f"{m.upper()} {p}" for m, p in CONTRACT]
)
def test_every_contract_status_is_documented_with_its_body(
    document: dict[str, Any], method: str, path: str
) -> None:
    responses = document["paths"][path][method]["responses"]
    assert set(CONTRACT[method, path]) <= set(responses)
    for status, component in CONTRACT[method, path].items():
        content = responses[status]["content"]
        if component is None:
            assert list(content) == [MEDIA_TYPES.get(path, JSON)]
        else:
            assert content == {JSON: {"schema": {"$ref": REF.format(name=component)}}}


def _headers(operation: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {p["name"]: p for p in operation.get("parameters", []) if p["in"] == "header"}


def test_request_headers_are_documented(document: dict[str, Any]) -> None:
    predict = _headers(document["paths"]["/predict"]["post"])
    assert set(predict) == {"Async-Mode", "Prefer", "Idempotency-Key"}
    for parameter in predict.values():
        assert parameter["required"] is False
        assert parameter["schema"] == {"type": "string"}
    assert "respond-async" in predict["Prefer"]["description"]
    assert "255" in predict["Idempotency-Key"]["description"]

    get_prediction = document["paths"]["/predict/{prediction_id}"]["get"]
    assert set(_headers(get_prediction)) == {"Prefer"}
    assert "wait=N" in _headers(get_prediction)["Prefer"]["description"]


@pytest.mark.parametrize("operation", [op for op in CONTRACT if "{prediction_id}" in op[1]])
def test_prediction_id_is_a_required_path_parameter(
    document: dict[str, Any], operation: tuple[str, str]
) -> None:
    method, path = operation
    parameters = document["paths"][path][method]["parameters"]
    (path_parameter,) = [p for p in parameters if p["in"] == "path"]
    assert path_parameter["name"] == "prediction_id"
    assert path_parameter["required"] is True
    assert path_parameter["schema"] == {"type": "string"}
    if path != "/predict/{prediction_id}":
        assert _headers(document["paths"][path][method]) == {}


def test_response_headers_are_documented(document: dict[str, Any]) -> None:
    predict = document["paths"]["/predict"]["post"]["responses"]
    assert "Location" in predict["202"]["headers"]
    assert "Retry-After" in predict["503"]["headers"]
    polled = document["paths"]["/predict/{prediction_id}"]["get"]["responses"]
    # A long poll may end in any of its answers, a cancel's 410 among them.
    for status in ("200", "400", "404", "410", "500"):
        assert "Preference-Applied" in polled[status]["headers"], status
    for path, method in [
        ("/predict/{prediction_id}", "get"),
        ("/predict/{prediction_id}/status", "get"),
        ("/predict/{prediction_id}/cancel", "post"),
    ]:
        assert "Retry-After" in document["paths"][path][method]["responses"]["503"]["headers"]


def test_component_schemas_are_the_msgspec_types(document: dict[str, Any]) -> None:
    types = http_types()
    assert {t.__name__ for t in types} >= {
        "PredictRequest",
        "PredictResponse",
        "AcceptedResponse",
        "PredictionResponse",
        "ErrorResponse",
        "StatusResponse",
        "PredictionStatus",
    }
    _, components = msgspec.json.schema_components(types, ref_template=REF)
    assert document["components"]["schemas"] == msgspec.json.decode(msgspec.json.encode(components))
    # API.md's status body: these keys, in this order, every one always there.
    status = document["components"]["schemas"]["PredictionStatus"]
    assert list(status["properties"]) == STATUS_KEYS
    assert status["required"] == STATUS_KEYS
    body = document["paths"]["/predict"]["post"]["requestBody"]
    assert body["required"] is True
    schema = {"$ref": REF.format(name="PredictRequest")}
    assert body["content"] == {JSON: {"schema": schema, "example": {"input": "string"}}}


# -- (b) schemathesis against the live service ------------------------------

# The contract's only server errors: anything else (or a 500 that is not a
# model failure, e.g. the catch-all "Internal server error.") is a bug. The
# routes that read a prediction answer 503 while the event log cannot be read.
ALLOWED_5XX = {
    ("POST", "/predict"): {500, 503},
    ("GET", "/predict/{prediction_id}"): {500, 503},
    ("GET", "/predict/{prediction_id}/status"): {503},
    ("POST", "/predict/{prediction_id}/cancel"): {503},
    ("GET", "/readyz"): {503},
}


def no_undocumented_server_error(
    ctx: CheckContext, response: schemathesis.Response, case: schemathesis.Case[Any]
) -> bool | None:
    status = response.status_code
    if status < 500:
        return None
    operation = (case.method.upper(), case.operation.path)
    assert status in ALLOWED_5XX.get(operation, set()), (
        f"{status} from {operation}: {response.text[:300]}"
    )
    if status == 500:
        assert msgspec.json.decode(response.content)["error"].startswith("Prediction failed: "), (
            f"500 that is not a model failure: {response.text[:300]}"
        )
    if status == 503 and operation != ("GET", "/readyz"):
        assert "retry-after" in {name.lower() for name in response.headers}
    return None


CHECKS: list[CheckFunction] = [
    no_undocumented_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


@pytest.fixture(scope="module")
async def known_ids(service: ServiceProcess) -> list[str]:
    """Predictions that exist, so GET /predict/{id} is fuzzed past its 404."""
    ids: list[str] = []
    async with httpx.AsyncClient(base_url=service.base_url, timeout=10) as client:
        for text in ("done", "\u00fcn\u00efcode", ""):
            response = await client.post(
                "/predict", json={"input": text}, headers={"Async-Mode": "true"}
            )
            assert response.status_code == 202, response.text
            ids.append(response.json()["prediction_id"])
        for prediction_id in ids:
            assert (await wait_finished(client, prediction_id)).status_code == 200
    return ids


@pytest.fixture(scope="module")
def api_schema(service: ServiceProcess) -> schemathesis.BaseSchema:
    """The document as the live service serves it; requests go to that service."""
    return schemathesis.openapi.from_url(f"{service.base_url}/openapi.json", timeout=10)


def interesting_parameters(path: str, known_ids: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    """Fixed parameters that reach other answers.

    202, a keyed submit (its first answer, a repeat, a reuse with another
    body, a malformed key), a done prediction, a long poll, and the status
    and cancel of a done prediction (which a cancel leaves as it is).
    """
    if path == "/predict":
        headers = [
            {"Async-Mode": "true"},
            {"Async-Mode": "TRUE"},
            {"Prefer": "respond-async"},
            {"Idempotency-Key": '"k-1"'},
            {"Idempotency-Key": "k-2", "Async-Mode": "true"},
            {"Idempotency-Key": '""'},
        ]
        return st.fixed_dictionaries({"headers": st.sampled_from(headers)})
    known: st.SearchStrategy[dict[str, str]] = st.builds(
        dict, prediction_id=st.sampled_from(known_ids)
    )
    if path == "/predict/{prediction_id}":
        return st.fixed_dictionaries(
            {
                "path_parameters": known,
                "headers": st.sampled_from([{}, {"Prefer": "wait=0.5"}]),
            }
        )
    if path in ("/predict/{prediction_id}/status", "/predict/{prediction_id}/cancel"):
        return st.fixed_dictionaries({"path_parameters": known})
    return st.just({})


# Negative cases only exist where a client sends something that can be
# wrong: a body (headers and the path parameter are any string).
FUZZED = [
    *[(method.upper(), path, GenerationMode.POSITIVE) for method, path in CONTRACT],
    ("POST", "/predict", GenerationMode.NEGATIVE),
]
# Statuses each fuzzed operation must have reached, so the run is known to
# have gone past the easy answer.
REACHED = {
    ("POST", "/predict", GenerationMode.POSITIVE): {200, 202},
    ("GET", "/predict/{prediction_id}", GenerationMode.POSITIVE): {200, 404},
    ("GET", "/predict/{prediction_id}/status", GenerationMode.POSITIVE): {200, 404},
    ("POST", "/predict/{prediction_id}/cancel", GenerationMode.POSITIVE): {200, 404},
    ("POST", "/predict", GenerationMode.NEGATIVE): {400, 422},
}


@pytest.mark.parametrize(
    ("method", "path", "mode"), FUZZED, ids=[f"{m} {p} {mode}" for m, p, mode in FUZZED]
)
def test_live_service_conforms_to_its_document(
    api_schema: schemathesis.BaseSchema,
    known_ids: list[str],
    method: str,
    path: str,
    mode: GenerationMode,
) -> None:
    operation = api_schema[path][method]
    cases = operation.as_strategy(generation_mode=mode)
    if mode is GenerationMode.POSITIVE:
        # Random strings almost never hit the values that change the answer.
        fixed = interesting_parameters(path, known_ids)
        cases |= fixed.flatmap(lambda given: operation.as_strategy(mode, **given))
    sent: list[int] = []

    @hypothesis.settings(
        max_examples=50,
        deadline=None,
        database=None,
        suppress_health_check=[hypothesis.HealthCheck.too_slow],
    )
    @hypothesis.given(case=cases)
    def conforms(case: schemathesis.Case[Any]) -> None:
        response = case.call_and_validate(checks=CHECKS, timeout=10)
        sent.append(response.status_code)

    conforms()
    assert set(sent) >= REACHED.get((method, path, mode), {200}), sent


# -- Every documented answer, produced for real and checked against the document


class Conformance:
    """Sends requests with httpx and checks each answer with schemathesis."""

    def __init__(self, document: dict[str, Any], client: httpx.AsyncClient) -> None:
        self.schema = schemathesis.openapi.from_dict(document)
        self.client = client

    async def request(
        self, expected: int, method: str, path: str, prediction_id: str = "", **kwargs: Any
    ) -> httpx.Response:
        url = path.format(prediction_id=prediction_id)
        response = await self.client.request(method, url, **kwargs)
        self.check(expected, method, path, response, prediction_id)
        return response

    def check(
        self,
        expected: int,
        method: str,
        path: str,
        response: httpx.Response,
        prediction_id: str = "",
    ) -> None:
        assert response.status_code == expected, (method, path, response.text)
        parameters = {"prediction_id": prediction_id} if prediction_id else None
        case = self.schema[path][method].Case(path_parameters=parameters)
        case.validate_response(response, checks=CHECKS)


async def test_every_documented_answer_matches_the_document(rabbitmq_url: str) -> None:
    settings = settings_for_test(
        rabbitmq_url,
        predictor="tests.predictors:sleeps_as_told",  # "1" sleeps 1 s, "x" fails
        max_attempts=1,
        max_body_bytes=100,
    )
    async with live_app(settings) as live:
        document = (await live.client.get("/openapi.json")).json()
        api = Conformance(document, live.client)
        post = "/predict"
        await api.request(200, "POST", post, json={"input": "0"})
        await api.request(500, "POST", post, json={"input": "x"})
        await api.request(400, "POST", post, content=b"{not json")
        await api.request(422, "POST", post, json={"input": 42})
        await api.request(413, "POST", post, json={"input": "x" * 200})
        slow = await api.request(
            202, "POST", post, json={"input": "1"}, headers={"Prefer": "respond-async"}
        )
        doomed = await api.request(
            202, "POST", post, json={"input": "x"}, headers={"Async-Mode": "true"}
        )

        poll = "/predict/{prediction_id}"
        slow_id = slow.json()["prediction_id"]
        await api.request(400, "GET", poll, slow_id)
        waited = await api.request(200, "GET", poll, slow_id, headers={"Prefer": "wait=5"})
        assert waited.headers["preference-applied"] == "wait=5"
        doomed_id = doomed.json()["prediction_id"]
        api.check(500, "GET", poll, await wait_finished(live.client, doomed_id), doomed_id)
        await api.request(404, "GET", poll, "no-such-prediction")
        for route in ("/healthz", "/readyz", "/metrics", "/openapi.json", "/docs"):
            await api.request(200, "GET", route)


async def test_every_lifecycle_answer_matches_the_document(rabbitmq_url: str) -> None:
    """Status in every state, cancels, a canceled prediction's 410s, and keyed submits."""
    settings = settings_for_test(
        rabbitmq_url,
        predictor="tests.predictors:sleeps_as_told",  # "60" sleeps 60 s, "x" fails
        max_attempts=1,
        model_concurrency=1,  # one runs, the next waits in line
    )
    async with live_app(settings) as live:
        document = (await live.client.get("/openapi.json")).json()
        api = Conformance(document, live.client)
        post, poll = "/predict", "/predict/{prediction_id}"
        status, cancel = "/predict/{prediction_id}/status", "/predict/{prediction_id}/cancel"

        async def status_is(prediction_id: str, expected: str) -> dict[str, Any]:
            body: dict[str, Any] = (await api.request(200, "GET", status, prediction_id)).json()
            assert body["status"] == expected, body
            return body

        # Finished, either way: a cancel leaves it as it is.
        for text, outcome in (("0", "succeeded"), ("x", "failed")):
            prediction_id = await submit_async(live.client, text)
            await wait_finished(live.client, prediction_id)
            finished = await status_is(prediction_id, outcome)
            unchanged = await api.request(200, "POST", cancel, prediction_id)
            assert unchanged.json() == finished

        # Canceled while queued, and while processing.
        running = await submit_async(live.client, "60")
        waiting = await submit_async(live.client, "60")
        with anyio.fail_after(10):
            while (await api.request(200, "GET", status, running)).json()["status"] == "queued":
                await anyio.sleep(0.02)
        await status_is(running, "processing")
        assert (await status_is(waiting, "queued"))["queued_ahead"] is not None
        # A long poll of the waiting one wakes with the cancel's 410.
        long_poll = asyncio.create_task(
            live.client.get(f"/predict/{waiting}", headers={"Prefer": "wait=10"})
        )
        with anyio.fail_after(5):
            while live.services.store.waiting == 0:
                await anyio.sleep(0.01)
        for prediction_id in (waiting, running):
            canceled = await api.request(200, "POST", cancel, prediction_id)
            assert canceled.json()["status"] == "canceled"
            assert await status_is(prediction_id, "canceled") == canceled.json()
            await api.request(410, "GET", poll, prediction_id)
            await api.request(200, "POST", cancel, prediction_id)  # again: idempotent
        woken = await long_poll
        api.check(410, "GET", poll, woken, waiting)
        assert woken.headers["preference-applied"] == "wait=10"

        await api.request(404, "GET", status, "no-such-prediction")
        await api.request(404, "POST", cancel, "no-such-prediction")

        # Idempotency-Key: malformed; a repeat; a reuse with another body.
        await api.request(400, "POST", post, json={"input": "0"}, headers={"Idempotency-Key": '""'})
        keyed = {"Idempotency-Key": '"k-1"', "Async-Mode": "true"}
        first = await api.request(202, "POST", post, json={"input": "0"}, headers=keyed)
        repeat = await api.request(202, "POST", post, json={"input": "0"}, headers=keyed)
        assert repeat.json() == first.json()
        await api.request(422, "POST", post, json={"input": "0.0"}, headers=keyed)
        await api.request(
            422, "POST", post, json={"input": "0.0"}, headers={"Idempotency-Key": "k-1"}
        )
        # Sync and keyed: the model's answer, its failure, or its cancel.
        sync = await api.request(
            200, "POST", post, json={"input": "0"}, headers={"Idempotency-Key": "k-2"}
        )
        assert sync.json() == {"input": "0", "result": "0"}
        await api.request(
            500, "POST", post, json={"input": "x"}, headers={"Idempotency-Key": "k-3"}
        )
        doomed = await api.request(
            202,
            "POST",
            post,
            json={"input": "60"},
            headers={"Idempotency-Key": "k-4", "Async-Mode": "true"},
        )
        await api.request(200, "POST", cancel, doomed.json()["prediction_id"])
        await api.request(
            410, "POST", post, json={"input": "60"}, headers={"Idempotency-Key": "k-4"}
        )


async def test_broker_outage_answers_match_the_document(rabbitmq_url: str) -> None:
    nowhere = f"amqp://guest:guest@127.0.0.1:{free_port()}/"
    settings = settings_for_test(nowhere, broker_connect_timeout_s=60)
    async with live_app(settings, wait_ready=False) as live:
        document = (await live.client.get("/openapi.json")).json()
        api = Conformance(document, live.client)
        with anyio.fail_after(5):
            await api.request(
                503, "POST", "/predict", json={"input": "x"}, headers={"Async-Mode": "true"}
            )
        await api.request(503, "GET", "/readyz")
        await api.request(200, "GET", "/healthz")
        # Whether an id the service could have issued exists: the log cannot tell.
        issued = str(uuid.uuid4())
        await api.request(503, "GET", "/predict/{prediction_id}", issued)
        await api.request(503, "GET", "/predict/{prediction_id}/status", issued)
        await api.request(503, "POST", "/predict/{prediction_id}/cancel", issued)
        await api.request(
            503, "POST", "/predict", json={"input": "x"}, headers={"Idempotency-Key": "k-1"}
        )
