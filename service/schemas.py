"""Every shape that crosses an edge: HTTP bodies and broker messages.

HTTP bodies keep the field order of the original brief, because existing
clients compare bytes. Broker messages are prediction events: the task a
worker consumes *is* the `Accepted` event, published once and routed both
to the work queue and to the event stream. Every event field added later
must get a default, and decoders ignore unknown fields, so replicas of
different versions can read each other's events during a rolling deploy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

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


class Accepted(msgspec.Struct, tag="accepted", tag_field="kind", gc=False, omit_defaults=True):
    """A client's async request; also the work queue's task message.

    `attempts` and `last_error` are only set on a task a worker put back
    on the work queue by itself (see service/consumer.py): attempts that
    the broker's own delivery count cannot see any more.
    """

    prediction_id: str
    input: str
    at_s: float = 0.0
    attempts: int = 0
    last_error: str = ""
    # Put back once already for want of a free model slot: next time it
    # waits in line for one, so that no task circulates more than once.
    bounced: bool = False


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


class TaskBatch(msgspec.Struct, tag="tasks", tag_field="kind", gc=False):
    """Tasks accepted in the same instant, published as one message.

    Batching is what lets the broker keep up: a message costs the same
    whether it carries one task or fifty (see bench/README.md).
    """

    tasks: list[Accepted]


class OutcomeBatch(msgspec.Struct, tag="outcomes", tag_field="kind", gc=False):
    outcomes: list[Done | Failed]


Outcome = Done | Failed
Event = Accepted | Done | Failed | Marker
# What one broker message carries: an event, or a batch of events made together.
# ("message" alone means the broker's message, as aio-pika hands it over.)
Envelope = Event | TaskBatch | OutcomeBatch

json_encoder = msgspec.json.Encoder()
request_decoder = msgspec.json.Decoder(PredictRequest)
task_decoder = msgspec.json.Decoder(Accepted | TaskBatch)
envelope_decoder = msgspec.json.Decoder(Envelope)


def batched(events: Sequence[Event]) -> Envelope:
    """One message for events published together: the event itself if alone."""
    if len(events) == 1:
        return events[0]
    if all(isinstance(event, Accepted) for event in events):
        return TaskBatch(list(cast(Sequence[Accepted], events)))
    if all(isinstance(event, Done | Failed) for event in events):
        return OutcomeBatch(list(cast(Sequence[Outcome], events)))
    raise ValueError("a batch holds tasks or outcomes, not both")


def events_of(envelope: Envelope) -> list[Event]:
    if isinstance(envelope, TaskBatch):
        return list(envelope.tasks)
    if isinstance(envelope, OutcomeBatch):
        return list(envelope.outcomes)
    return [envelope]


def event_count(envelope: Envelope) -> int:
    if isinstance(envelope, TaskBatch):
        return len(envelope.tasks)
    if isinstance(envelope, OutcomeBatch):
        return len(envelope.outcomes)
    return 1
