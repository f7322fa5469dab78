"""The objects one running app shares between its handlers and its workers."""

from __future__ import annotations

from dataclasses import dataclass

from service.broker import Broker
from service.consumer import TaskWorker
from service.follower import EventFollower
from service.journal import Journal
from service.metrics import Metrics
from service.model import ModelRunner
from service.settings import Settings
from service.statedir import StateDir
from service.store import ResultStore
from service.webhooks.sender import WebhookSender


@dataclass(frozen=True)
class Services:
    settings: Settings
    store: ResultStore
    runner: ModelRunner
    broker: Broker
    journal: Journal
    follower: EventFollower
    worker: TaskWorker
    metrics: Metrics
    state_dir: StateDir
    webhooks: WebhookSender | None = None  # with WEBHOOK_SECRET only

    def not_ready_reason(self) -> str | None:
        """Why this replica should not get traffic yet, or None if it should."""
        if not self.store.is_open:
            return "Opening the local state."
        if self.store.write_error is not None:
            return f"The local state cannot be written: {self.store.write_error}."
        if not self.broker.is_up:
            return "The broker connection is down."
        if not self.follower.caught_up.is_set():
            return "Replaying the prediction event stream."
        if not self.worker.consuming:
            return "The task consumer is not running."
        return None
