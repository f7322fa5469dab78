"""The HTTP baseline: a bare Starlette app under the service's uvicorn options.

`python -m bench.bare_app --port P --get-body B` serves

- `GET /predict/{id}`: the fixed body B, the bytes the service answers for
  a finished prediction, so both sides send the same response size;
- `POST /predict`: decodes `{"input": ...}` with msgspec, as the service
  does, and answers `{"input": ..., "result": "12345"}`, a body as large
  as the service's (its result has 4 or 5 digits).

No middleware, no services, no validation beyond the decode: the gap in
requests/s between this app and the service is what the service's own
code costs per request.
"""

from __future__ import annotations

import argparse

import msgspec
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

JSON = "application/json"
RESULT = "12345"  # the longest result the mock model returns (1000-20000)


class Payload(msgspec.Struct):
    input: str


class Reply(msgspec.Struct):
    input: str
    result: str


def create_app(get_body: bytes) -> Starlette:
    decoder = msgspec.json.Decoder(Payload)
    encoder = msgspec.json.Encoder()

    async def predict(request: Request) -> Response:
        payload = decoder.decode(await request.body())
        return Response(encoder.encode(Reply(payload.input, RESULT)), media_type=JSON)

    async def get_prediction(_: Request) -> Response:
        return Response(get_body, media_type=JSON)

    return Starlette(
        routes=[
            Route("/predict", predict, methods=["POST"]),
            Route("/predict/{prediction_id:path}", get_prediction, methods=["GET"]),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--get-body", default='{"prediction_id":"x"}')
    args = parser.parse_args()
    # The same options as service/__main__.py, so only the app differs.
    uvicorn.run(
        create_app(args.get_body.encode()),
        host="127.0.0.1",
        port=args.port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        access_log=False,
        log_config=None,
        log_level="warning",
        backlog=4096,
    )


if __name__ == "__main__":
    main()
