"""Models for PREDICTOR tests: `tests.predictors:<name>`."""

from __future__ import annotations

import asyncio
import os
import threading
import time
import uuid

import anyio


def blocking_upper(text: str) -> str:
    """A plain function that blocks, as many real models do."""
    time.sleep(0.2)
    return f"{text.upper()}@{threading.current_thread().name}"


async def async_reverse(text: str) -> str:
    await anyio.sleep(0.01)
    return text[::-1]


def always_fails(text: str) -> str:
    raise ValueError(f"cannot predict {text!r}")


def fails_on_boom(text: str) -> str:
    if "boom" in text:
        raise RuntimeError("boom in input")
    return "42"


def returns_number(text: str) -> int:
    return len(text)


NOT_CALLABLE = 3


_attempts: dict[str, int] = {}


def reset_attempts() -> None:
    _attempts.clear()
    call_times.clear()


# When each call of `fails_first_time` began (time.monotonic()), by input.
call_times: dict[str, list[float]] = {}


def fails_first_time(text: str) -> str:
    """Fails on the first call for an input, answers the attempt number after."""
    call_times.setdefault(text, []).append(time.monotonic())
    _attempts[text] = _attempts.get(text, 0) + 1
    if _attempts[text] == 1:
        raise ConnectionError("model server hiccup")
    return str(_attempts[text])


def counts_then_fails(text: str) -> str:
    """Counts its calls per input in `calls`, and fails every one."""
    calls[text] = calls.get(text, 0) + 1
    raise ConnectionError(f"no model for {text!r}")


def crashes_the_process(text: str) -> str:
    """Kills its own process on "crash", as a segfaulting model would."""
    if text == "crash":
        os._exit(3)
    return "1"


async def sleeps_as_told(text: str) -> str:
    """Sleeps the number of seconds its input says: "1.5" sleeps 1.5 s."""
    await anyio.sleep(float(text))
    return text


def crashes_the_process_after_a_moment(text: str) -> str:
    """As crashes_the_process, but only 0.3 s in: other tasks finish first."""
    if text == "crash":
        time.sleep(0.3)
        os._exit(3)
    return "1"


calls: dict[str, int] = {}


async def counts_calls(text: str) -> str:
    """Sleeps the seconds its input says ("0.5", or "0.5-tag"), counting calls per input."""
    calls[text] = calls.get(text, 0) + 1
    await anyio.sleep(float(text.partition("-")[0]))
    return text


async def sleeps_then_names_its_process(text: str) -> str:
    """Sleeps the seconds its input says, then answers its process id: replicas differ.

    Each call leaves a file in $PREDICTOR_CALLS_DIR (when set), so a test
    can count the runs of every replica.
    """
    calls_dir = os.environ.get("PREDICTOR_CALLS_DIR")
    if calls_dir:
        await anyio.Path(calls_dir, f"{os.getpid()}-{uuid.uuid4().hex}").touch()
    await anyio.sleep(float(text))
    return str(os.getpid())


# When each call of `notes_cancellation` began (time.monotonic()), by input,
# and the inputs whose call saw a cancellation. Cleared by the tests that use them.
started_at: dict[str, float] = {}
cancelled: list[str] = []


async def notes_cancellation(text: str) -> str:
    """Sleeps the seconds its input says ("30", or "0.3-tag"), noting its start and a cancel.

    A cancellation of the call (CancelledError) is noted in `cancelled`, then re-raised.
    """
    started_at[text] = time.monotonic()
    try:
        await anyio.sleep(float(text.partition("-")[0]))
    except asyncio.CancelledError:
        cancelled.append(text)
        raise
    return text


# The inputs `blocks_as_told` has finished with (its thread returned), and
# the most of its calls that ever ran at once.
blocking_done: list[str] = []
blocking_most_at_once = 0
_blocking_now = 0
_blocking_lock = threading.Lock()


def blocks_as_told(text: str) -> str:
    """Blocks its thread the seconds its input says ("1.0", or "1.0-tag"): no cancel reaches it."""
    global _blocking_now, blocking_most_at_once  # noqa: PLW0603 - a test model's counters
    with _blocking_lock:
        _blocking_now += 1
        blocking_most_at_once = max(blocking_most_at_once, _blocking_now)
    try:
        time.sleep(float(text.partition("-")[0]))
    finally:
        with _blocking_lock:
            _blocking_now -= 1
    blocking_done.append(text)
    return text
