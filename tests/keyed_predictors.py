"""Models for tests/test_idempotency.py: `tests.keyed_predictors:<name>`.

Both count their calls per input in `calls`. In-process replicas
(tests.support.live_app) share the count: it says how often the model
ran, whichever replica ran it.
"""

from __future__ import annotations

import anyio

calls: dict[str, int] = {}


async def numbered(text: str) -> str:
    """Sleeps the seconds its input starts with ("0.5" or "0.5 tag"); answers "<input> #<call>"."""
    calls[text] = number = calls.get(text, 0) + 1
    await anyio.sleep(float(text.split(maxsplit=1)[0]))
    return f"{text} #{number}"


def fails(text: str) -> str:
    """Fails every call, counting them."""
    calls[text] = calls.get(text, 0) + 1
    raise ValueError(f"no answer for {text!r}")
