"""The throwaway RabbitMQ node: a broker of a test's own, for broker-wide states.

A memory alarm blocks every publisher of the broker it is raised on. On a
throwaway node it blocks that node's publishers only: the shared broker,
which every other test uses, goes on confirming.
"""

from __future__ import annotations

import aio_pika
import anyio
import pytest

from tests.nodes import Node

BLOCKED_FOR_S = 1.0


async def test_a_memory_alarm_on_a_throwaway_node_blocks_its_publishers_only(
    throwaway_broker: Node, rabbitmq_url: str
) -> None:
    node = throwaway_broker
    assert node.url == f"amqp://guest:guest@127.0.0.1:{node.port}/"
    assert node.name.startswith("throwaway-")
    on_node = await aio_pika.connect(node.url, timeout=5)
    on_shared = await aio_pika.connect(rabbitmq_url, timeout=5)
    async with on_node, on_shared:
        node_channel = await on_node.channel(publisher_confirms=True)
        shared_channel = await on_shared.channel(publisher_confirms=True)
        node_queue = await node_channel.declare_queue(exclusive=True)
        shared_queue = await shared_channel.declare_queue(exclusive=True)

        with anyio.fail_after(2):
            await node_channel.default_exchange.publish(
                aio_pika.Message(b"before"), node_queue.name
            )
        with node.memory_alarm():
            # The node no longer reads this connection: no confirm comes.
            with pytest.raises(TimeoutError):
                await node_channel.default_exchange.publish(
                    aio_pika.Message(b"during"), node_queue.name, timeout=BLOCKED_FOR_S
                )
            # The shared broker is not the node: it confirms at once.
            with anyio.fail_after(1):
                await shared_channel.default_exchange.publish(
                    aio_pika.Message(b"shared"), shared_queue.name
                )
        # The alarm is off: the node confirms again, on the same connection.
        with anyio.fail_after(5):
            await node_channel.default_exchange.publish(aio_pika.Message(b"after"), node_queue.name)

        # The blocked publish was held back, not lost; nothing crossed brokers.
        bodies = []
        while (message := await node_queue.get(no_ack=True, fail=False)) is not None:
            bodies.append(message.body)
        assert bodies == [b"before", b"during", b"after"]
        message = await shared_queue.get(no_ack=True, fail=False)
        assert message is not None and message.body == b"shared"
        assert await shared_queue.get(no_ack=True, fail=False) is None
