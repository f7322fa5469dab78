"""Model runs whose outcome is not on the stream yet: a redelivery joins them."""

from __future__ import annotations

import asyncio

from service.model import ModelRunner


class RunCanceled(Exception):
    """The prediction was canceled while its model ran here: the run was stopped."""


class InFlight:
    """The model runs here whose outcome is not on the stream yet, by prediction id.

    After a dropped connection the broker delivers a task again while the
    first delivery's handling still runs its model (TaskWorker._on_message
    keeps it going), or still waits for the broker to confirm its outcome.
    The redelivery takes that run's answer instead of starting the model a
    second time. A run is kept until `forget`, once its outcome is
    published; outcomes are applied only when read back from the stream,
    so until then this is the only place that knows it. A plain future per
    run: a task per run cost a fifth of the async pipeline's throughput.
    """

    def __init__(self, runner: ModelRunner) -> None:
        self._runner = runner
        self._runs: dict[str, asyncio.Future[str]] = {}
        # The task awaiting each model call, to stop it on a cancel; only
        # while inside the call, so a cancel never lands in the bookkeeping.
        self._callers: dict[str, asyncio.Task[object]] = {}
        self._canceling: set[str] = set()

    def __contains__(self, prediction_id: str) -> bool:
        return prediction_id in self._runs

    def running(self, prediction_id: str) -> asyncio.Future[str] | None:
        """The run kept for this id, to join without starting another."""
        return self._runs.get(prediction_id)

    async def predict(self, prediction_id: str, input: str) -> tuple[str, bool]:
        """The model's answer, and whether it came from a run already kept here."""
        running = self._runs.get(prediction_id)
        if running is not None:
            # Shielded: a waiter cancelled with its connection leaves the run be.
            return await asyncio.shield(running), True
        run: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._runs[prediction_id] = run
        try:
            result = await self._call(prediction_id, input)
        except (asyncio.CancelledError, RunCanceled):
            run.cancel()
            del self._runs[prediction_id]
            raise
        except BaseException as exc:
            # A failed run is not kept: the next delivery tries again.
            run.set_exception(exc)
            run.exception()  # retrieved, so asyncio does not log it if nobody waits
            del self._runs[prediction_id]
            raise
        run.set_result(result)
        return result, False

    async def _call(self, prediction_id: str, input: str) -> str:
        caller = asyncio.current_task()
        assert caller is not None
        self._callers[prediction_id] = caller
        try:
            return await self._runner.predict(input)
        except asyncio.CancelledError:
            if prediction_id not in self._canceling:
                raise  # the worker stops, or its connection dropped
            caller.uncancel()
            raise RunCanceled(prediction_id) from None
        finally:
            del self._callers[prediction_id]
            self._canceling.discard(prediction_id)

    def cancel(self, prediction_id: str) -> bool:
        """Stop the model call of a canceled prediction, if one runs here.

        An async predictor sees CancelledError and its slot is freed; a
        blocking one in a thread runs on, and its answer is discarded.
        """
        caller = self._callers.get(prediction_id)
        if caller is None or prediction_id in self._canceling:
            return False
        self._canceling.add(prediction_id)
        caller.cancel("the prediction was canceled")
        return True

    def forget(self, prediction_id: str) -> None:
        """The run's outcome is on the stream: a later delivery finds it there.

        (One between the broker's confirm and the follower reading it back,
        a few ms, would run the model again: wasted, not wrong.)
        """
        run = self._runs.get(prediction_id)
        if run is not None and run.done():
            del self._runs[prediction_id]
