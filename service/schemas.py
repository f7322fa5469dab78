"""Every shape that crosses an edge: HTTP bodies and broker messages.

HTTP bodies keep the field order of the original brief, because existing
clients compare bytes. Broker messages are prediction events: the task a
worker consumes *is* the `Accepted` event, published once and routed both
to the work queue and to the event stream. Every event field added later
must get a default, and decoders ignore unknown fields, so replicas of
different versions can read each other's events during a rolling deploy.
"""

from __future__ import annotations

import msgspec

# -- HTTP -------------------------------------------------------------------


class PredictRequest(msgspec.Struct):
    input: str


class PredictResponse(msgspec.Struct):
    input: str
    result: str


class AcceptedResponse(msgspec.Struct):
    message: str
    prediction_id: str


class PredictionResponse(msgspec.Struct):
    prediction_id: str
    output: PredictResponse


class ErrorResponse(msgspec.Struct):
    error: str


class StatusResponse(msgspec.Struct):
    status: str


# -- Broker events ----------------------------------------------------------


class Accepted(msgspec.Struct, tag="accepted", tag_field="kind", gc=False):
    """A client's async request; also the work queue's task message."""

    prediction_id: str
    input: str
    at_s: float = 0.0


class Done(msgspec.Struct, tag="done", tag_field="kind", gc=False):
    prediction_id: str
    input: str
    result: str
    at_s: float = 0.0


class Failed(msgspec.Struct, tag="failed", tag_field="kind", gc=False):
    prediction_id: str
    input: str
    error: str
    at_s: float = 0.0


class Marker(msgspec.Struct, tag="marker", tag_field="kind", gc=False):
    """Written by a replica to learn when its replay of the stream has caught up."""

    marker_id: str
    at_s: float = 0.0


Outcome = Done | Failed
Event = Accepted | Done | Failed | Marker

json_encoder = msgspec.json.Encoder()
request_decoder = msgspec.json.Decoder(PredictRequest)
task_decoder = msgspec.json.Decoder(Accepted)
event_decoder = msgspec.json.Decoder(Event)
