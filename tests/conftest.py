"""Fixtures: one RabbitMQ vhost per test run on the live broker, settings per test."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator

import aio_pika
import pytest
from yarl import URL

from service.settings import Settings
from tests import predictors
from tests.support import BROKER_ROOT_URL, LiveApp, live_app, rabbitmqctl, settings_for_test


@pytest.fixture(scope="session")
def rabbitmq_url() -> Iterator[str]:
    """A vhost of this run's own, so nothing collides with other runs or deployments."""
    vhost = f"test-run-{uuid.uuid4().hex[:8]}"
    rabbitmqctl("add_vhost", vhost)
    rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    try:
        yield str(URL(BROKER_ROOT_URL).with_path("/" + vhost))
    finally:
        rabbitmqctl("delete_vhost", vhost)


@pytest.fixture(scope="session", autouse=True)
async def broker_is_up() -> None:
    """Fail fast, with a clear message, if no broker answers a real AMQP handshake."""
    try:
        connection = await aio_pika.connect(BROKER_ROOT_URL, timeout=5)
    except Exception as exc:
        pytest.exit(f"RabbitMQ is not reachable at {BROKER_ROOT_URL}: {exc!r}", returncode=2)
    await connection.close()


@pytest.fixture
def settings(rabbitmq_url: str) -> Settings:
    return settings_for_test(rabbitmq_url)


@pytest.fixture
async def live(settings: Settings) -> AsyncIterator[LiveApp]:
    async with live_app(settings) as app:
        yield app


@pytest.fixture(autouse=True)
def fresh_predictors() -> None:
    """The test models count calls in module globals: each test starts from zero."""
    predictors.calls.clear()
    predictors.reset_attempts()
