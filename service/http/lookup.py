"""Finding a prediction as the log tells it, for every route that reads one."""

from __future__ import annotations

import re
from collections.abc import Awaitable
from typing import TypeVar

from service.broker import BrokerUnavailable
from service.http.errors import ApiError
from service.services import Services
from service.store import Found, StateUnavailable

T = TypeVar("T")

# Seconds a client should wait before retrying a 503: about one reconnect.
RETRY_AFTER_S = "5"
# What the service issues (str(uuid.uuid4()), or a key's id shaped alike): any
# other id is unknown to every replica, so its 404 needs no look at the stream.
ISSUED_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")


async def find(services: Services, prediction_id: str) -> Found:
    """Disk, then, before saying "unknown", the stream read up to this request.

    Another replica may have answered 202 for this id a moment ago; once
    this replica has read its own marker back, it has read that task too
    (service/fence.py). A 404 is then true on every replica.
    """
    found = await unavailable_as_503(services.store.lookup(prediction_id))
    if found is not None or ISSUED_ID.fullmatch(prediction_id) is None:
        return found
    return await read_back(services, prediction_id)


async def read_back(services: Services, prediction_id: str) -> Found:
    """The prediction once the stream has been read up to now."""
    await unavailable_as_503(services.follower.fences.wait())
    return await unavailable_as_503(services.store.lookup(prediction_id))


async def unavailable_as_503(lookup: Awaitable[T]) -> T:
    try:
        return await lookup
    except (BrokerUnavailable, StateUnavailable) as exc:
        raise ApiError(
            503,
            f"Cannot tell whether this prediction exists right now ({exc}); retry.",
            {"Retry-After": RETRY_AFTER_S},
        ) from None
