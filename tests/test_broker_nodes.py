"""RABBITMQ_URL with several nodes: the first that answers, the next at each reconnection."""

from __future__ import annotations

import asyncio

import anyio
from yarl import URL

from service.settings import Settings
from tests.support import (
    LiveApp,
    close_service_connections,
    free_port,
    live_app,
    settings_for_test,
    submit_async,
    wait_finished,
)


def _dead_node(rabbitmq_url: str) -> str:
    """A URL like the broker's, on a port nothing listens on: a node that is down."""
    return str(URL(rabbitmq_url).with_port(free_port()))


def test_a_list_of_nodes_is_read_in_order() -> None:
    settings = Settings(rabbitmq_url=" amqp://a:5672/v ,amqps://b:5671/v")
    assert settings.rabbitmq_urls == ("amqp://a:5672/v", "amqps://b:5671/v")


async def test_the_first_node_that_answers_is_taken(rabbitmq_url: str) -> None:
    settings = settings_for_test(f"{_dead_node(rabbitmq_url)},{rabbitmq_url}")
    async with live_app(settings) as live:
        assert live.services.broker.address.port == URL(rabbitmq_url).port
        prediction_id = await submit_async(live.client, "through the second node")
        assert (await wait_finished(live.client, prediction_id)).status_code == 200


async def test_each_reconnection_tries_the_next_node(rabbitmq_url: str) -> None:
    # Nodes: the broker, a node that is down, the broker again. Each drop
    # moves on: to the dead one (which fails), then to the third.
    urls = [rabbitmq_url, _dead_node(rabbitmq_url), rabbitmq_url]
    settings = settings_for_test(",".join(urls))
    async with live_app(settings) as live:
        broker = live.services.broker
        assert broker.address.port == URL(rabbitmq_url).port
        assert close_service_connections(live.settings) == 1
        await _until_ready_again(live)
        # Through the dead node to the third entry, the live one.
        assert broker.address.port == URL(rabbitmq_url).port
        assert broker._node == 2
        prediction_id = await submit_async(live.client, "after the failover")
        assert (await wait_finished(live.client, prediction_id)).status_code == 200
        assert close_service_connections(live.settings) == 1
        await _until_ready_again(live)
        assert broker._node == 0  # round again


async def _until_ready_again(live: LiveApp) -> None:
    with anyio.fail_after(5):
        while live.services.broker.is_up:  # the drop takes a moment to be seen
            await asyncio.sleep(0.01)
    with anyio.fail_after(20):
        while (await live.client.get("/readyz")).status_code != 200:
            await asyncio.sleep(0.05)
