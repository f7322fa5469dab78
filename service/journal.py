"""Writing prediction events onto the broker's stream.

Every event is published with a confirm, and counts for every replica,
this one included, once read back from the stream (service/follower.py):
two replicas that both ran a task keep the same outcome, the first on the
stream. The one thing noted locally at once is a task this replica
accepts, so its client's first GET says "still processing". Both kinds go
through an `Outbox`, so events made in the same instant share a message.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence

from service.broker import EVENT_KEY, TASK_KEY, Broker, BrokerUnavailable
from service.outbox import Outbox
from service.schemas import Accepted, Canceled, Done, Failed, Outcome, Started
from service.store import Prediction, ResultStore

# A run's start is told once the run has lasted this long. One that ends
# sooner is told by its outcome alone (which carries its start and
# attempts): a fast model then adds no event per task to the stream, and
# nobody could have seen it processing anyway.
START_TELL_AFTER_S = 0.05


class Journal:
    def __init__(self, store: ResultStore, broker: Broker) -> None:
        self.store = store
        self.broker = broker
        self._tasks = Outbox(broker, TASK_KEY)
        self._events = Outbox(broker, EVENT_KEY)
        # Starts batch apart from outcomes: an outcome batch stays the
        # envelope the previous version reads, during a rolling deploy.
        self._starts = Outbox(broker, EVENT_KEY)
        self._untold: dict[str, asyncio.TimerHandle] = {}  # starts not told yet, by id

    async def accept(self, task: Accepted) -> None:
        """Note a new task and hand it to the broker (BrokerUnavailable if it won't)."""
        await self.store.note_accepted(task)
        try:
            await self._tasks.publish((task,))
        except BaseException:
            # No 202 will be sent, so nobody knows this id: drop it.
            await self.store.forget_pending(task.prediction_id)
            raise

    async def record(self, outcomes: Sequence[Outcome]) -> None:
        """Publish outcomes; the follower applies them when it reads them back."""
        for outcome in outcomes:
            untold = self._untold.pop(outcome.prediction_id, None)
            if untold is not None:
                untold.cancel()  # the outcome tells the start
        await self._events.publish(outcomes)

    async def record_started(self, event: Started) -> None:
        """Tell the stream a run began, and wait for the confirm (a start webhook is owed)."""
        # Unconfirmed, the outcome still tells the start; the webhook waits for either.
        with contextlib.suppress(BrokerUnavailable):
            await self._starts.publish((event,))

    def started(self, event: Started) -> None:
        """Tell the stream a run began, START_TELL_AFTER_S from now, without waiting.

        Not waited for: the run's outcome carries the same facts, and the
        model should not wait a broker round trip to begin. Starts told in
        the same loop turn share a message.
        """
        loop = asyncio.get_running_loop()
        self._untold[event.prediction_id] = loop.call_later(START_TELL_AFTER_S, self._tell, event)

    def _tell(self, event: Started) -> None:
        if self._untold.pop(event.prediction_id, None) is not None:
            self._starts.post((event,))


def outcome_of(prediction_id: str, entry: Prediction) -> Outcome:
    """The event that recorded a finished entry, to publish it again."""
    at_s, started_at_s, attempts = entry.updated_at_s, entry.started_at_s, entry.attempts
    if entry.canceled:
        return Canceled(prediction_id, entry.input, at_s)
    if entry.result is not None:
        return Done(prediction_id, entry.input, entry.result, at_s, started_at_s, attempts)
    error = entry.error or "unknown error"
    return Failed(prediction_id, entry.input, error, at_s, started_at_s, attempts)
