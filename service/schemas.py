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
from typing import Literal, cast

import msgspec

# -- HTTP -------------------------------------------------------------------


WebhookEvent = Literal["start", "completed"]


class PredictRequest(msgspec.Struct):
    input: str
    # Async only: POST the status body to this URL when the prediction starts
    # and/or completes (service/webhooks/), as the filter says.
    webhook: str | None = None
    webhook_events_filter: list[WebhookEvent] | None = None


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


Status = Literal["queued", "processing", "succeeded", "failed", "canceled"]


class PredictionStatus(msgspec.Struct):
    """GET /predict/{id}/status: the whole story of a prediction, as the log tells it."""

    prediction_id: str
    status: Status
    input: str
    result: str | None
    error: str | None
    created_at: str  # RFC 3339 UTC with milliseconds
    started_at: str | None
    completed_at: str | None
    attempts: int
    queued_ahead: int | None


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
    # Set on a submit with an Idempotency-Key (service/http/idempotency.py),
    # whose prediction id comes from the key: several replicas may publish
    # the same id, and the first on the stream wins. `nonce` tells the
    # winner's task from the others; `fingerprint` is the request's, to
    # answer 422 to the same key with another body.
    nonce: str = ""
    fingerprint: str = ""
    # Where to tell the client of its prediction's start and end, and which.
    webhook: str = ""
    webhook_events: tuple[WebhookEvent, ...] = ()


class Started(msgspec.Struct, tag="started", tag_field="kind", gc=False):
    """A worker began a model run of a prediction: its attempt number `attempt`."""

    prediction_id: str
    attempt: int
    at_s: float = 0.0


class Done(msgspec.Struct, tag="done", tag_field="kind", gc=False):
    prediction_id: str
    input: str
    result: str
    at_s: float = 0.0
    # The run that gave it: when it began, and model runs started in all.
    started_at_s: float = 0.0
    attempts: int = 0


class Failed(msgspec.Struct, tag="failed", tag_field="kind", gc=False):
    prediction_id: str
    input: str
    error: str
    at_s: float = 0.0
    started_at_s: float = 0.0  # 0: no run began (the broker gave up on the task)
    attempts: int = 0


class Canceled(msgspec.Struct, tag="canceled", tag_field="kind", gc=False):
    """A client canceled the prediction: an outcome like the others, the first one wins."""

    prediction_id: str
    input: str
    at_s: float = 0.0


class Marker(msgspec.Struct, tag="marker", tag_field="kind", gc=False):
    """Written by a replica to learn when its replay of the stream has caught up."""

    marker_id: str
    at_s: float = 0.0


class WebhookJob(msgspec.Struct, tag="webhook", tag_field="kind", gc=False):
    """A webhook delivery owed: a message of its own queue until delivered or given up.

    `first_at_s` is when it was first owed (retries stop WEBHOOK_RETRY_FOR_S
    after it); `tries` the deliveries tried so far.
    """

    prediction_id: str
    event: WebhookEvent
    url: str
    first_at_s: float
    tries: int = 0

    @property
    def webhook_id(self) -> str:
        """The same on every try of one event (receivers dedupe by it)."""
        return f"msg_{self.prediction_id}_{self.event}"


class TaskBatch(msgspec.Struct, tag="tasks", tag_field="kind", gc=False):
    """Tasks accepted in the same instant, published as one message.

    Batching is what lets the broker keep up: a message costs the same
    whether it carries one task or fifty (see bench/README.md).
    """

    tasks: list[Accepted]


class OutcomeBatch(msgspec.Struct, tag="outcomes", tag_field="kind", gc=False):
    outcomes: list[Done | Failed]


Outcome = Done | Failed | Canceled
Event = Accepted | Started | Done | Failed | Canceled | Marker


class EventBatch(msgspec.Struct, tag="events", tag_field="kind", gc=False):
    """Events of several kinds published together (starts beside outcomes, most often).

    A batch of only tasks or only Done/Failed keeps its older, narrower
    envelope, which replicas of the previous version can still read.
    """

    events: list[Event]


# What one broker message carries: an event, or a batch of events made together.
# ("message" alone means the broker's message, as aio-pika hands it over.)
Envelope = Event | TaskBatch | OutcomeBatch | EventBatch
# Everything the service publishes: envelopes, and webhook deliveries owed.
Publishable = Envelope | WebhookJob

json_encoder = msgspec.json.Encoder()
request_decoder = msgspec.json.Decoder(PredictRequest)
task_decoder = msgspec.json.Decoder(Accepted | TaskBatch)
envelope_decoder = msgspec.json.Decoder(Envelope)
webhook_job_decoder = msgspec.json.Decoder(WebhookJob)


def batched(events: Sequence[Event]) -> Envelope:
    """One message for events published together: the event itself if alone."""
    if len(events) == 1:
        return events[0]
    if all(isinstance(event, Accepted) for event in events):
        return TaskBatch(list(cast(Sequence[Accepted], events)))
    if all(isinstance(event, Done | Failed) for event in events):
        return OutcomeBatch(list(cast(Sequence[Done | Failed], events)))
    if any(isinstance(event, Accepted) for event in events):
        # Tasks go to the work queue as well: never mixed with other events.
        raise ValueError("a batch holds tasks or other events, not both")
    return EventBatch(list(events))


def events_of(envelope: Envelope) -> list[Event]:
    if isinstance(envelope, TaskBatch):
        return list(envelope.tasks)
    if isinstance(envelope, OutcomeBatch):
        return list(envelope.outcomes)
    if isinstance(envelope, EventBatch):
        return envelope.events
    return [envelope]


def event_count(envelope: Publishable) -> int:
    if isinstance(envelope, TaskBatch):
        return len(envelope.tasks)
    if isinstance(envelope, OutcomeBatch):
        return len(envelope.outcomes)
    if isinstance(envelope, EventBatch):
        return len(envelope.events)
    return 1
