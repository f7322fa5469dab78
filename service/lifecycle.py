"""The broker side of one replica, owned by the lifespan: `start()`, then `stop(grace)`.

`start()` returns at once; in the background it opens the local state,
connects, catches up with the event stream, and starts the worker (the
worker waits for the replay: a redelivered task must see any outcome
already recorded for it, or it would run twice). Any failure on the way
is fatal for the process: a replica that serves HTTP without its worker
would only look alive; `on_fatal` says why and the orchestrator restarts it.

`begin_stop(grace)`, from the signal handler, stops taking tasks at once
and answers long polls, while uvicorn still serves the requests in
progress; `stop(grace)`, from the lifespan, begins the stop if nobody did,
waits up to `grace` for running tasks, then stops following the stream
and closes the state and the connection. Both may be called more than once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import anyio

from service.broker import BrokerUnavailable
from service.disk import Identity
from service.services import Services

log = logging.getLogger(__name__)

OnFatal = Callable[[str], None]


def log_fatal(message: str) -> None:
    log.critical("%s", message)


class BrokerSide:
    """One per app, and one start: the lifespan of `python -m service` runs once."""

    def __init__(self, services: Services, on_fatal: OnFatal = log_fatal) -> None:
        self._services = services
        self.on_fatal = on_fatal  # `python -m service` points it at its server
        self._running: asyncio.Task[None] | None = None
        self._draining: asyncio.Future[None] | None = None
        self._stopped: asyncio.Future[None] | None = None

    def start(self) -> None:
        self._running = asyncio.create_task(self._run())

    def begin_stop(self, grace_s: float) -> None:
        """Stop taking tasks and answer long polls now; runs get `grace_s` to end.

        For the signal handler: HTTP keeps being served meanwhile.
        """
        if self._draining is None:
            self._services.store.release_waiters()
            self._draining = asyncio.ensure_future(self._services.worker.stop(grace_s))

    async def stop(self, grace_s: float) -> None:
        """begin_stop, wait for the drain, then close the stream, the state and the link."""
        self.begin_stop(grace_s)
        if self._stopped is None:
            self._stopped = asyncio.ensure_future(self._close())
        await asyncio.shield(self._stopped)

    async def _run(self) -> None:
        services = self._services
        try:
            settings = services.settings
            identity = Identity(settings.broker_namespace, services.broker.address.vhost)
            checkpoint = await services.store.open(services.state_dir.database, identity)
            services.follower.resume_after(checkpoint)
            await services.broker.connect()
            async with anyio.create_task_group() as following:
                await following.start(services.follower.run)
                if self._draining is None:
                    await services.worker.start()
                if self._draining is None and services.webhooks is not None:
                    await services.webhooks.start()
        except BrokerUnavailable as exc:
            self.on_fatal(str(exc))
        except Exception as exc:
            log.exception("the broker side stopped unexpectedly")
            self.on_fatal(f"the broker side stopped unexpectedly: {exc!r}")

    async def _close(self) -> None:
        assert self._draining is not None
        services = self._services
        try:
            await self._draining
        finally:
            if self._running is not None:
                self._running.cancel()
                await asyncio.gather(self._running, return_exceptions=True)
            try:
                if services.webhooks is not None:
                    await services.webhooks.stop()
                await services.store.close()
            finally:
                await services.broker.close()
                services.state_dir.release()
