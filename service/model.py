"""The model: the brief's mock, or a user's function named by `PREDICTOR`.

Whatever the model is, it is called through `ModelRunner`, which holds the
one concurrency limit shared by sync requests and queued tasks.
"""

from __future__ import annotations

import asyncio
import collections
import importlib
import inspect
import random
import time
from collections.abc import Awaitable, Callable
from typing import Protocol, cast

import anyio
import anyio.to_thread

from service.settings import ConfigError, Settings


class Predictor(Protocol):
    """What the service needs of a model: one awaitable call per input."""

    def __call__(self, input: str, /) -> Awaitable[str]: ...


class ModelError(Exception):
    """The model raised or returned something that is not a result."""


class MockModel:
    """The brief's mock: wait 10-17 s (by default), answer a random integer 1000-20000.

    Whole bounds keep the brief's whole seconds; fractional ones let tests
    and benchmarks shrink the wait to milliseconds.
    """

    def __init__(self, delay_min_s: float, delay_max_s: float) -> None:
        self._min_s = delay_min_s
        self._span_s = delay_max_s - delay_min_s
        self._whole = float(delay_min_s).is_integer() and float(delay_max_s).is_integer()

    def delay_s(self) -> float:
        # random() and int() rather than randint(): the same distribution at
        # a fifth of the cost, which shows in the zero-delay benchmark.
        if self._whole:
            return self._min_s + int(random.random() * (self._span_s + 1))
        return self._min_s + random.random() * self._span_s

    async def __call__(self, input: str, /) -> str:
        delay_s = self.delay_s()
        if delay_s > 0:  # a zero delay needs no trip through the event loop
            await anyio.sleep(delay_s)
        return str(1000 + int(random.random() * 19001))


def load_predictor(settings: Settings) -> Predictor:
    """The configured model, made awaitable; raises ConfigError if it cannot load."""
    if not settings.predictor:
        return MockModel(settings.model_delay_min_s, settings.model_delay_max_s)
    function = import_callable(settings.predictor)
    if _is_async(function):
        return cast(Predictor, function)
    return _in_worker_thread(function, settings.model_concurrency)


def import_callable(spec: str) -> Callable[..., object]:
    """Resolve `package.module:function`, with a one-line error if it cannot."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ConfigError(f"PREDICTOR={spec!r} must look like 'package.module:function'")
    try:
        target: object = importlib.import_module(module_name)
    except Exception as exc:
        raise ConfigError(f"PREDICTOR={spec!r}: cannot import {module_name!r}: {exc}") from None
    for name in attribute.split("."):
        target = getattr(target, name, None)
        if target is None:
            raise ConfigError(f"PREDICTOR={spec!r}: {module_name!r} has no attribute {attribute!r}")
    if not callable(target):
        raise ConfigError(f"PREDICTOR={spec!r} is not callable")
    return target


def _is_async(function: Callable[..., object]) -> bool:
    call = getattr(function, "__call__", None)  # noqa: B004 - async callable objects count too
    return inspect.iscoroutinefunction(function) or inspect.iscoroutinefunction(call)


def _in_worker_thread(function: Callable[[str], object], threads: int) -> Predictor:
    # A blocking model must not stall the event loop. Its own thread limiter
    # is as large as MODEL_CONCURRENCY, which the runner already enforces, so
    # the shared limit is the only one that ever binds.
    limiter = anyio.CapacityLimiter(threads)

    async def predict(input: str, /) -> object:
        call = asyncio.ensure_future(anyio.to_thread.run_sync(function, input, limiter=limiter))
        try:
            return await asyncio.shield(call)
        except asyncio.CancelledError:
            # A thread cannot be stopped. Keep the model's slot until it
            # returns, so MODEL_CONCURRENCY holds; its answer is discarded.
            await _until_done(call)
            raise

    return cast(Predictor, predict)


async def _until_done(call: asyncio.Future[object]) -> None:
    while not call.done():
        try:
            await asyncio.wait([call])
        except asyncio.CancelledError:
            continue  # cancelled again: still nothing to do but wait
    if not call.cancelled():
        call.exception()  # retrieved: nobody reads an abandoned call's error


class Slots:
    """A counting limit whose free path takes no await at all.

    asyncio.Semaphore costs two coroutine calls to take a free slot; on a
    zero-delay sync prediction that was the largest item left in the
    profile. Waiters are served first come, first served; a freed slot is
    handed straight to the oldest waiter, so no newcomer can overtake it.
    """

    def __init__(self, count: int) -> None:
        self._free = count
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    async def take(self) -> None:
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.give_back()  # handed a slot, then cancelled: pass it on
            raise

    def give_back(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():  # skips waiters cancelled while waiting
                waiter.set_result(None)
                return
        self._free += 1


class ModelRunner:
    """Runs predictions under the process-wide MODEL_CONCURRENCY limit."""

    def __init__(
        self,
        predictor: Predictor,
        concurrency: int,
        observe_latency_s: Callable[[float], object] = lambda _: None,
    ) -> None:
        self._predictor = predictor
        # One loop, one limit: not anyio's CapacityLimiter, which yields to
        # the loop even when a slot is free (a quarter of a fast sync
        # prediction), nor asyncio.Semaphore (see Slots).
        self._slots = Slots(concurrency)
        self._observe_latency_s = observe_latency_s
        self.running = 0

    async def predict(self, input: str) -> str:
        """The model's answer as a string; raises ModelError if the model fails."""
        await self._slots.take()
        self.running += 1
        started_s = time.perf_counter()
        try:
            result: object = await self._predictor(input)
        except Exception as exc:
            raise ModelError(_describe(exc)) from exc
        finally:
            self._observe_latency_s(time.perf_counter() - started_s)
            self.running -= 1
            self._slots.give_back()
        return _as_result(result)


def _as_result(result: object) -> str:
    if isinstance(result, str):
        return result
    if isinstance(result, int | float) and not isinstance(result, bool):
        return str(result)
    raise ModelError(f"model returned {type(result).__name__}, expected str")


def _describe(exc: Exception) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
