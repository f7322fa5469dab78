"""Helpers shared by the tests: a live broker vhost, servers and clients."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aio_pika
import anyio
import httpx
import uvicorn
from starlette.applications import Starlette
from yarl import URL

from service.app import create_app
from service.broker import EVENT_KEY, TASK_KEY, Names, connection_prefix
from service.http.protocol import UVICORN_OPTIONS
from service.schemas import Accepted, TaskBatch, json_encoder
from service.services import Services
from service.settings import Settings

REPO = Path(__file__).resolve().parent.parent
BROKER_ROOT_URL = os.environ.get("TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")


def rabbitmqctl(*args: str) -> str:
    done = subprocess.run(
        ["rabbitmqctl", "-q", *args], check=True, capture_output=True, text=True, timeout=60
    )
    return done.stdout


def _ephemeral_ports() -> range:
    """The ports the kernel hands to outgoing connections (Linux's default if unknown)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
    except (OSError, ValueError):
        return range(32768, 61000)
    return range(int(low), int(high) + 1)


def _listening_ports() -> range:
    """Ports for test servers, clear of the ephemeral range.

    A port picked with bind(0) is ephemeral: between the pick and the server's
    own bind, an outgoing connection (to the broker, an HTTP client) can take
    it, and the server fails with "address already in use". No outgoing
    connection takes a port outside the ephemeral range.
    """
    ephemeral = _ephemeral_ports()
    if ephemeral.start - 10_000 >= 1_000:
        return range(10_000, ephemeral.start)
    if 65_536 - ephemeral.stop >= 1_000:
        return range(ephemeral.stop, 65_536)
    return range(1_024, 65_536)


_LISTENING_PORTS = _listening_ports()
_handed_out: set[int] = set()


def free_port() -> int:
    """A port nothing listens on, never handed out twice in this test run."""
    while True:
        port = random.choice(_LISTENING_PORTS)
        if port in _handed_out:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port


def settings_for_test(rabbitmq_url: str, **changes: object) -> Settings:
    """Settings for one test: its own namespace, a model that answers in ms, short retry waits."""
    base = Settings(
        rabbitmq_url=rabbitmq_url,
        host="127.0.0.1",
        port=free_port(),
        model_delay_min_s=0.05,
        model_delay_max_s=0.2,
        broker_namespace=f"test-{uuid.uuid4().hex[:10]}",
        broker_connect_timeout_s=10,
        broker_reconnect_interval_s=0.5,
        publish_timeout_s=2,
        shutdown_grace_s=5,
        max_wait_s=10,
        retry_backoff_s=0.05,
    )
    return base.with_changes(**changes)


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that makes `python -m service` use these settings."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTEST")}
    for name in settings.__struct_fields__:
        env[name.upper()] = str(getattr(settings, name))
    return env


@dataclass
class LiveApp:
    app: Starlette
    client: httpx.AsyncClient
    settings: Settings
    server: uvicorn.Server

    @property
    def services(self) -> Services:
        return self.server.lifespan.state["services"]  # type: ignore[no-any-return]


@contextlib.asynccontextmanager
async def live_app(
    settings: Settings, *, wait_ready: bool = True, keep_namespace: bool = False
) -> AsyncIterator[LiveApp]:
    """The real app under a real uvicorn server, in the test's own event loop.

    Its namespace's queues are deleted at the end, unless `keep_namespace`
    (for a later replica, which deletes them).
    """
    app = create_app(settings, on_fatal=lambda message: None)
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=settings.port,
        lifespan="on",
        **UVICORN_OPTIONS,  # as `python -m service` runs it
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=5,
    )
    server = uvicorn.Server(config)
    # The test process keeps its own signal handlers.
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]
    task = asyncio.create_task(server.serve())
    try:
        with anyio.fail_after(10):
            while not server.started:
                await asyncio.sleep(0.01)
        base_url = f"http://127.0.0.1:{settings.port}"
        async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
            live = LiveApp(app, client, settings, server)
            if wait_ready:
                await wait_ready_at(client)
            yield live
    finally:
        server.should_exit = True
        with anyio.fail_after(30):
            await task
        if not keep_namespace:
            await delete_namespace(settings)


async def wait_ready_at(client: httpx.AsyncClient, timeout_s: float = 20) -> None:
    with anyio.fail_after(timeout_s):
        while True:
            try:
                if (await client.get("/readyz")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.05)


async def wait_finished(
    client: httpx.AsyncClient, prediction_id: str, timeout_s: float = 20
) -> httpx.Response:
    """Poll until the prediction is no longer pending (400)."""
    with anyio.fail_after(timeout_s):
        while True:
            try:
                response = await client.get(f"/predict/{prediction_id}")
                if response.status_code != 400:
                    return response
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.05)


async def metric(client: httpx.AsyncClient, series: str) -> float:
    """One series of /metrics, e.g. `predictions_completed_total{mode="async"}` (0 if absent)."""
    text = (await client.get("/metrics")).text
    match = re.search(rf"^{re.escape(series)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


async def connect_to_broker(settings: Settings) -> aio_pika.abc.AbstractConnection:
    """A plain connection to the first of the settings' broker nodes that answers.

    Closed when it fails: aio-pika closes a connection it finds unclosed
    when collected, in a task that never runs once the test's loop is gone
    (an unraisable warning, an error here).
    """
    failure: Exception | None = None
    for url in settings.rabbitmq_urls:
        connection = aio_pika.Connection(URL(url))
        try:
            await connection.connect(timeout=5)
        except Exception as exc:
            await connection.close()
            failure = exc
            continue
        return connection
    assert failure is not None
    raise failure


async def publish_tasks(settings: Settings, envelope: Accepted | TaskBatch) -> None:
    """Publish a task (or a batch) as a replica's outbox does: to the stream and the work queue."""
    connection = await connect_to_broker(settings)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        names = Names.for_namespace(settings.broker_namespace)
        exchange = await channel.get_exchange(names.exchange)
        message = aio_pika.Message(
            json_encoder.encode(envelope), delivery_mode=aio_pika.DeliveryMode.PERSISTENT
        )
        await exchange.publish(message, TASK_KEY)


async def metric_total(client: httpx.AsyncClient, name: str) -> float:
    """The sum of every series of one metric, whatever its labels."""
    text = (await client.get("/metrics")).text
    pattern = rf"^{re.escape(name)}(?:\{{[^}}]*\}})? (\S+)$"
    return sum(float(value) for value in re.findall(pattern, text, re.MULTILINE))


async def submit_async(client: httpx.AsyncClient, text: str) -> str:
    response = await client.post("/predict", json={"input": text}, headers={"Async-Mode": "true"})
    assert response.status_code == 202, response.text
    prediction_id: str = response.json()["prediction_id"]
    return prediction_id


async def delete_namespace(settings: Settings) -> None:
    """Remove what the service declared for this test (queues, stream, exchanges)."""
    names = Names.for_namespace(settings.broker_namespace)
    with contextlib.suppress(Exception):
        connection = await connect_to_broker(settings)
        async with connection:
            await names.delete(await connection.channel())


async def publish_padding(settings: Settings, megabytes: int) -> None:
    """Markers of 1 MB each (a field nobody reads) on the event stream.

    Every replica reads them and changes nothing: they make a follower
    lag, or the stream roll segments (8 MB each) for retention.
    """
    names = Names.for_namespace(settings.broker_namespace)
    connection = await connect_to_broker(settings)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(names.exchange)
        pad = "x" * 2**20
        for i in range(megabytes):
            body = json_encoder.encode({"kind": "marker", "marker_id": f"pad-{i}", "pad": pad})
            await exchange.publish(aio_pika.Message(body), EVENT_KEY)


async def dead_letters(settings: Settings, expected: int, timeout_s: float = 20) -> list[bytes]:
    """Take `expected` messages from the dead-letter queue, waiting for them."""
    names = Names.for_namespace(settings.broker_namespace)
    bodies: list[bytes] = []
    connection = await connect_to_broker(settings)
    async with connection:
        channel = await connection.channel()
        queue = await channel.get_queue(names.dead, ensure=True)
        with anyio.fail_after(timeout_s):
            while len(bodies) < expected:
                message = await queue.get(fail=False)
                if message is None:
                    await asyncio.sleep(0.05)
                    continue
                bodies.append(message.body)
                await message.ack()
    return bodies


# In a test service's environment: the process id of the test run that started it.
OWNER_ENV = "TESTS_OWNER_PID"


class ServiceProcess:
    """`python -m service` as a real process, as an operator runs it."""

    def __init__(self, settings: Settings, **env: str) -> None:
        self.settings = settings
        # OWNER_ENV lets the next run stop it if this one is killed (tests/leftovers.py).
        self.env = settings_env(settings) | env | {OWNER_ENV: str(os.getpid())}
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = Path(f"/tmp/service-{settings.broker_namespace}-{settings.port}.log")

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.settings.port}"

    async def start(self, *, wait_ready: bool = True) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "service"], env=self.env, cwd=REPO, stdout=log, stderr=log
            )
        if wait_ready:
            async with httpx.AsyncClient(base_url=self.base_url) as client:
                await wait_ready_at(client, timeout_s=30)

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    async def wait_exit(self, timeout_s: float = 30) -> int:
        assert self.process is not None
        with anyio.fail_after(timeout_s):
            while (code := self.process.poll()) is None:
                await asyncio.sleep(0.05)
        return code

    async def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                await self.wait_exit()
            except TimeoutError:
                self.process.kill()
                self.process.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def close_service_connections(settings: Settings, pid: int | None = None) -> int:
    """Make the broker drop this namespace's connections (of process `pid` only, if given)."""
    listing = rabbitmqctl("list_connections", "pid", "client_properties", "--no-table-headers")
    name = connection_prefix(settings) + (f"{socket.gethostname()}/{pid}" if pid else "")
    connections = [
        line.split("\t", 1)[0]
        for line in listing.splitlines()
        if f'"{name}' in line and (pid is None or f'{name}"' in line)
    ]
    for connection in connections:
        rabbitmqctl("close_connection", connection, "test: broker drops the connection")
    return len(connections)
