"""Fixtures: one RabbitMQ vhost per test run on the live broker, settings per test.

A test that needs a broker is marked `broker` on its own (see
pytest_collection_modifyitems): `python -m pytest -m "not broker"` runs the
others without any broker.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator

import aio_pika
import pytest
from yarl import URL

from service.settings import Settings
from tests import predictors
from tests.leftovers import remove_leftovers, vhost_name
from tests.nodes import Node, throwaway_node
from tests.support import BROKER_ROOT_URL, LiveApp, live_app, rabbitmqctl, settings_for_test

# A test that requests one of these, directly or through another fixture, needs a broker.
BROKER_FIXTURES = frozenset({"rabbitmq_url", "throwaway_broker"})


_removed: list[str] = []


@pytest.hookimpl(tryfirst=True)  # before the terminal reporter asks for the header
def pytest_sessionstart(session: pytest.Session) -> None:
    """Remove what killed runs left: their nodes and vhosts slow this run down."""
    _removed.extend(remove_leftovers())


def pytest_report_header() -> list[str]:
    return [f"removed, left by a killed run: {', '.join(_removed)}"] if _removed else []


@pytest.hookimpl(tryfirst=True)  # before `-m` selects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark `broker` every test that needs one, so nobody has to remember the marker."""
    for item in items:
        if BROKER_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.broker)


@pytest.fixture(scope="session")
def rabbitmq_url(broker_is_up: None) -> Iterator[str]:
    """A vhost of this run's own, so nothing collides with other runs or deployments."""
    vhost = vhost_name(uuid.uuid4().hex[:8])
    rabbitmqctl("add_vhost", vhost)
    rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    try:
        yield str(URL(BROKER_ROOT_URL).with_path("/" + vhost))
    finally:
        rabbitmqctl("delete_vhost", vhost)


@pytest.fixture(scope="session")
async def broker_is_up() -> None:
    """Fail fast, with a clear message, if no broker answers a real AMQP handshake.

    Checked once, by the first test that needs the broker (through rabbitmq_url).
    """
    try:
        connection = await aio_pika.connect(BROKER_ROOT_URL, timeout=5)
    except Exception as exc:
        pytest.exit(f"RabbitMQ is not reachable at {BROKER_ROOT_URL}: {exc!r}", returncode=2)
    await connection.close()


@pytest.fixture(scope="module")
def throwaway_broker() -> Iterator[Node]:
    """A RabbitMQ node of this module's own, for broker-wide states (memory alarm).

    Not the shared broker on 5672: its own node, port and data, stopped and
    removed after the module's last test (~7.5 s to start, ~2 s to stop).
    """
    with throwaway_node() as node:
        yield node


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
