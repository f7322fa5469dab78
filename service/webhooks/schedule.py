"""What becomes of a webhook try: pure functions, the clock and jitter passed in.

A 2xx is delivered; a 410 means the receiver wants no more (gone);
anything else, an error or a timeout included, is tried again after an
exponential backoff with jitter (the first retry within 1-2 s, then
doubling), or after the receiver's Retry-After if that is longer, until
WEBHOOK_RETRY_FOR_S after the delivery was first owed (a last try at that
moment, if a wait would pass it): then it is dead.
"""

from __future__ import annotations

import email.utils
import math
from dataclasses import dataclass

from service.broker import WEBHOOK_DELAY_LEVELS

GONE = 410


@dataclass(frozen=True)
class Delivered:
    pass


@dataclass(frozen=True)
class Gone:
    pass


@dataclass(frozen=True)
class RetryLater:
    delay_s: float
    level: int  # the delay queue that holds it meanwhile
    reason: str


@dataclass(frozen=True)
class Dead:
    reason: str


Verdict = Delivered | Gone | RetryLater | Dead


def judge(
    status: int | None,
    retry_after: str | None,
    error: str,
    *,
    tries: int,
    owed_for_s: float,
    retry_for_s: float,
    jitter: float,
    now_s: float,
) -> Verdict:
    """The fate of try number `tries` (1 for the first), which got `status` or `error`."""
    if status is not None and 200 <= status < 300:
        return Delivered()
    if status == GONE:
        return Gone()
    reason = f"answered {status}" if status is not None else error
    delay_s = backoff_s(tries, jitter)
    waited_s = retry_after_s(retry_after, now_s)
    if waited_s is not None:
        delay_s = max(delay_s, waited_s)
    left_s = retry_for_s - owed_for_s
    if left_s <= 0:
        return Dead(f"{reason}; still failing after {tries} tries")
    # A wait that would end past the window is cut to its end: one last try then.
    delay_s = min(delay_s, left_s)
    return RetryLater(delay_s, level_of(delay_s), reason)


def backoff_s(tries: int, jitter: float) -> float:
    """After the n-th failed try: 2**(n-1) s, up to twice that (jitter in [0, 1))."""
    nominal = 2.0 ** min(tries - 1, WEBHOOK_DELAY_LEVELS)
    return nominal * (1 + jitter)


def level_of(delay_s: float) -> int:
    """The delay queue whose waits are about this long (the next power of two)."""
    return min(max(math.ceil(math.log2(max(delay_s, 1.0))), 0), WEBHOOK_DELAY_LEVELS - 1)


def retry_after_s(value: str | None, now_s: float) -> float | None:
    """Retry-After as seconds from now: delta-seconds or an HTTP-date (RFC 9110)."""
    if not value:
        return None
    text = value.strip()
    if text.isdigit():
        return float(text)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - now_s, 0.0)
