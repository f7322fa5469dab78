"""The webhook fields of POST /predict: checked before anything is accepted."""

from __future__ import annotations

from service.http.errors import ApiError
from service.schemas import PredictRequest, WebhookEvent
from service.settings import Settings
from service.webhooks.addresses import WebhookRefused, check_public

NOT_ENABLED = "Webhooks are not enabled on this server."
DEFAULT_EVENTS: tuple[WebhookEvent, ...] = ("completed",)

Requested = tuple[str, tuple[WebhookEvent, ...]]


async def requested_webhook(
    settings: Settings, request: PredictRequest, async_mode: bool
) -> Requested:
    """The URL and events to call back, ("", ()) for none; 422 if it cannot be done."""
    if request.webhook is None:
        if request.webhook_events_filter is not None:
            raise ApiError(422, "Invalid request: webhook_events_filter needs a webhook URL.")
        return "", ()
    if not settings.webhook_secret:
        raise ApiError(422, NOT_ENABLED)
    if not async_mode:
        raise ApiError(
            422,
            "Invalid request: a webhook needs an async request (Async-Mode: true or "
            "Prefer: respond-async); a sync request answers with the result itself.",
        )
    events = request.webhook_events_filter
    if events is not None and not events:
        raise ApiError(
            422, 'Invalid request: webhook_events_filter names none of "start", "completed".'
        )
    try:
        await check_public(request.webhook, settings.webhook_allow_private_networks)
    except WebhookRefused as exc:
        raise ApiError(422, f"Invalid webhook: {exc}.") from None
    return request.webhook, tuple(dict.fromkeys(events)) if events else DEFAULT_EVENTS
