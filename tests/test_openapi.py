"""/openapi.json describes what the service really answers.

Three parts: plain assertions that the document covers the contract (API.md)
and that its schemas are the code's msgspec types; schemathesis generating
requests from the document against a live `python -m service` and checking
every answer against it; and every documented status produced on purpose
(pending, failed, too large, broker down...) and checked the same way,
since random requests against an instant mock never reach those.
"""

from __future__ import annotations

import inspect
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
    wait_finished,
)

REF = "#/components/schemas/{name}"
JSON = "application/json"

# Every route, its method, and the statuses API.md (and the README, for the
# sync 500) promise, with the component each answer's body has.
ERROR = "ErrorResponse"
CONTRACT: dict[tuple[str, str], dict[str, str | None]] = {
    ("post", "/predict"): {
        "200": "PredictResponse",
        "202": "AcceptedResponse",
        "400": ERROR,
        "413": ERROR,
        "422": ERROR,
        "500": ERROR,
        "503": ERROR,
    },
    ("get", "/predict/{prediction_id}"): {
        "200": "PredictionResponse",
        "400": ERROR,
        "404": ERROR,
        "500": ERROR,
    },
    ("get", "/healthz"): {"200": "StatusResponse"},
    ("get", "/readyz"): {"200": "StatusResponse", "503": ERROR},
    ("get", "/metrics"): {"200": None},
    ("get", "/openapi.json"): {"200": None},
    ("get", "/docs"): {"200": None},
}
MEDIA_TYPES = {"/metrics": "text/plain", "/docs": "text/html"}


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
    assert set(predict) == {"Async-Mode", "Prefer"}
    for parameter in predict.values():
        assert parameter["required"] is False
        assert parameter["schema"] == {"type": "string"}
    assert "respond-async" in predict["Prefer"]["description"]

    get_prediction = document["paths"]["/predict/{prediction_id}"]["get"]
    assert set(_headers(get_prediction)) == {"Prefer"}
    assert "wait=N" in _headers(get_prediction)["Prefer"]["description"]
    (path_parameter,) = [p for p in get_prediction["parameters"] if p["in"] == "path"]
    assert path_parameter["name"] == "prediction_id"
    assert path_parameter["required"] is True


def test_response_headers_are_documented(document: dict[str, Any]) -> None:
    predict = document["paths"]["/predict"]["post"]["responses"]
    assert "Location" in predict["202"]["headers"]
    assert "Retry-After" in predict["503"]["headers"]
    polled = document["paths"]["/predict/{prediction_id}"]["get"]["responses"]
    assert "Preference-Applied" in polled["200"]["headers"]


def test_component_schemas_are_the_msgspec_types(document: dict[str, Any]) -> None:
    types = http_types()
    assert {t.__name__ for t in types} >= {
        "PredictRequest",
        "PredictResponse",
        "AcceptedResponse",
        "PredictionResponse",
        "ErrorResponse",
        "StatusResponse",
    }
    _, components = msgspec.json.schema_components(types, ref_template=REF)
    assert document["components"]["schemas"] == msgspec.json.decode(msgspec.json.encode(components))
    body = document["paths"]["/predict"]["post"]["requestBody"]
    assert body["required"] is True
    assert body["content"] == {JSON: {"schema": {"$ref": REF.format(name="PredictRequest")}}}


# -- (b) schemathesis against the live service ------------------------------

# The contract's only server errors: anything else (or a 500 that is not a
# model failure, e.g. the catch-all "Internal server error.") is a bug.
ALLOWED_5XX = {
    ("POST", "/predict"): {500, 503},
    ("GET", "/predict/{prediction_id}"): {500},
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
    if status == 503 and operation == ("POST", "/predict"):
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
    """Fixed parameters that reach other answers: 202, a done prediction, a long poll."""
    if path == "/predict":
        headers = [{"Async-Mode": "true"}, {"Async-Mode": "TRUE"}, {"Prefer": "respond-async"}]
        return st.fixed_dictionaries({"headers": st.sampled_from(headers)})
    if path == "/predict/{prediction_id}":
        return st.fixed_dictionaries(
            {
                "path_parameters": st.builds(dict, prediction_id=st.sampled_from(known_ids)),
                "headers": st.sampled_from([{}, {"Prefer": "wait=0.5"}]),
            }
        )
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
