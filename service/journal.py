"""Writing prediction events onto the broker's stream.

Every event is published with a confirm, and counts for every replica,
this one included, once read back from the stream (service/follower.py):
two replicas that both ran a task keep the same outcome, the first on the
stream. The one thing noted locally at once is a task this replica
accepts, so its client's first GET says "still processing". Both kinds go
through an `Outbox`, so events made in the same instant share a message.
"""

from __future__ import annotations

from collections.abc import Sequence

from service.broker import EVENT_KEY, TASK_KEY, Broker
from service.outbox import Outbox
from service.schemas import Accepted, Done, Failed, Outcome
from service.store import Prediction, ResultStore


class Journal:
    def __init__(self, store: ResultStore, broker: Broker) -> None:
        self.store = store
        self.broker = broker
        self._tasks = Outbox(broker, TASK_KEY)
        self._outcomes = Outbox(broker, EVENT_KEY)

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
        await self._outcomes.publish(outcomes)


def outcome_of(prediction_id: str, entry: Prediction) -> Outcome:
    """The event that recorded a finished entry, to publish it again."""
    if entry.result is not None:
        return Done(prediction_id, entry.input, entry.result, entry.updated_at_s)
    return Failed(prediction_id, entry.input, entry.error or "unknown error", entry.updated_at_s)
