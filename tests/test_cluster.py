"""A three-node RabbitMQ cluster: a node dies under load, and nothing accepted is lost.

The cluster is this module's own (tests/nodes.py): three `rabbitmq-server`
nodes on their own ports, joined, stopped and removed afterwards; never the
broker on 5672. Two replicas name the nodes in different orders, so they
sit on different nodes; async predictions flow through both while a node
is killed with -9. Every 202 must end with the same answer on both.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import anyio
import httpx
import pytest

from service.broker import Names
from tests.nodes import Node, throwaway_cluster
from tests.support import LiveApp, free_port, live_app, settings_for_test, wait_finished

ASYNC = {"Async-Mode": "true"}
LOAD_BEFORE_S = 2.0
LOAD_AFTER_S = 8.0


@pytest.fixture(scope="module")
def cluster() -> Iterator[list[Node]]:
    with throwaway_cluster(3) as nodes:
        yield nodes


@dataclass
class Load:
    """Async submits to each replica in turn until stopped: what was accepted, what refused."""

    replicas: list[LiveApp]
    interval_s: float = 0.02
    accepted: list[str] = field(default_factory=list)
    refused_at: list[float] = field(default_factory=list)  # 503s, time.monotonic()
    other: list[str] = field(default_factory=list)
    running: bool = True

    async def run(self) -> None:
        number = 0
        while self.running:
            replica = self.replicas[number % len(self.replicas)]
            number += 1
            try:
                response = await replica.client.post(
                    "/predict", json={"input": f"load {number}"}, headers=ASYNC, timeout=15
                )
            except httpx.HTTPError as exc:
                self.other.append(repr(exc))
                continue
            if response.status_code == 202:
                self.accepted.append(response.json()["prediction_id"])
            elif response.status_code == 503:
                self.refused_at.append(time.monotonic())
            else:
                self.other.append(f"{response.status_code} {response.text}")
            await asyncio.sleep(self.interval_s)

    def refused_for_s(self) -> float:
        return self.refused_at[-1] - self.refused_at[0] if self.refused_at else 0.0


@contextlib.asynccontextmanager
async def two_replicas(nodes: list[Node]) -> AsyncIterator[list[LiveApp]]:
    """Two replicas of one namespace, each naming the nodes from another one first."""
    first = settings_for_test(",".join(n.url for n in nodes), publish_timeout_s=5)
    second = first.with_changes(
        port=free_port(), rabbitmq_url=",".join(n.url for n in [*nodes[1:], nodes[0]])
    )
    async with live_app(first) as a, live_app(second) as b:
        yield [a, b]


def node_of(replica: LiveApp, nodes: list[Node]) -> Node:
    port = replica.services.broker.address.port
    [node] = [n for n in nodes if n.port == port]
    return node


def leader_of_work_queue(replica: LiveApp, nodes: list[Node]) -> Node:
    queue = Names.for_namespace(replica.settings.broker_namespace).tasks
    alive = next(n for n in nodes if n.process is not None and n.process.poll() is None)
    for line in alive.rabbitmqctl(
        "list_queues", "name", "leader", "--no-table-headers"
    ).splitlines():
        name, _, leader = line.partition("\t")
        if name == queue:
            return next(n for n in nodes if n.name == leader.strip())
    raise AssertionError(f"no leader found for {queue}")


async def kill_under_load(replicas: list[LiveApp], victim: Node) -> Load:
    load = Load(replicas)
    async with anyio.create_task_group() as group:
        group.start_soon(load.run)
        await anyio.sleep(LOAD_BEFORE_S)
        await anyio.to_thread.run_sync(victim.kill)
        await anyio.sleep(LOAD_AFTER_S)
        load.running = False
    return load


async def every_accepted_ends_the_same_everywhere(replicas: list[LiveApp], load: Load) -> None:
    assert load.accepted, "nothing was accepted"
    for prediction_id in load.accepted:
        answers = [
            await wait_finished(replica.client, prediction_id, timeout_s=60) for replica in replicas
        ]
        assert [a.status_code for a in answers] == [200, 200], [a.text for a in answers]
        assert answers[0].json() == answers[1].json()


async def test_queues_and_the_stream_span_the_three_nodes(cluster: list[Node]) -> None:
    async with two_replicas(cluster) as replicas:
        names = Names.for_namespace(replicas[0].settings.broker_namespace)
        listing = cluster[0].rabbitmqctl(
            "list_queues", "name", "type", "members", "--no-table-headers"
        )
        spans = {
            line.split("\t")[0]: line.count("@")
            for line in listing.splitlines()
            if line.startswith(names.exchange + ".")
        }
        for queue in (names.tasks, names.dead, names.events):
            assert spans[queue] == 3, listing


async def test_the_node_a_replica_is_connected_to_dies_and_nothing_is_lost(
    cluster: list[Node],
) -> None:
    async with two_replicas(cluster) as replicas:
        victim = node_of(replicas[0], cluster)
        try:
            load = await kill_under_load(replicas, victim)
            print(f"\nconnected node killed: 503s for {load.refused_for_s():.2f} s, "
                  f"{len(load.refused_at)} refused, {len(load.accepted)} accepted")  # fmt: skip
            assert not load.other, load.other[:5]
            await every_accepted_ends_the_same_everywhere(replicas, load)
            assert load.refused_for_s() < 10
        finally:
            await anyio.to_thread.run_sync(victim.restart)


async def test_the_work_queue_leader_dies_then_comes_back_and_nothing_is_lost(
    cluster: list[Node],
) -> None:
    async with two_replicas(cluster) as replicas:
        victim = leader_of_work_queue(replicas[0], cluster)
        try:
            load = await kill_under_load(replicas, victim)
            print(f"\nwork-queue leader killed: 503s for {load.refused_for_s():.2f} s, "
                  f"{len(load.refused_at)} refused, {len(load.accepted)} accepted")  # fmt: skip
            assert not load.other, load.other[:5]
        finally:
            await anyio.to_thread.run_sync(victim.restart)
        await every_accepted_ends_the_same_everywhere(replicas, load)
        assert load.refused_for_s() < 10
