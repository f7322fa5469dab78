"""A start the broker refuses ends at once, saying why; a lost connection is one line.

Every case runs `python -m service` against the live broker, with users
and vhosts made for the test (and removed after it).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest
from yarl import URL

from service.app import startup_line
from service.broker import BrokerAddress
from tests.support import (
    ServiceProcess,
    close_service_connections,
    delete_namespace,
    rabbitmqctl,
    settings_for_test,
    submit_async,
    wait_finished,
    wait_ready_at,
)

# Far longer than any refusal may take: a refusal must not wait for it.
CONNECT_TIMEOUT_S = 60
FAIL_FAST_S = 10
PASSWORD = f"pw-{uuid.uuid4().hex}"  # unique, so the logs can be searched for it


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@contextlib.contextmanager
def broker_user(
    *, vhost: str | None = None, permissions: tuple[str, str, str] | None = None
) -> Iterator[str]:
    """A user of the broker for one test (with these permissions on `vhost`, if given)."""
    name = _unique("test-user")
    rabbitmqctl("add_user", name, PASSWORD)
    try:
        if vhost is not None and permissions is not None:
            rabbitmqctl("set_permissions", "-p", vhost, name, *permissions)
        yield name
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):  # the test may have deleted it
            rabbitmqctl("delete_user", name)


@contextlib.contextmanager
def broker_vhost() -> Iterator[str]:
    """A vhost for one test, guest allowed everything in it."""
    name = _unique("test-vhost")
    rabbitmqctl("add_vhost", name)
    try:
        rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
        yield name
    finally:
        rabbitmqctl("delete_vhost", name)


def _url(
    base: str, *, user: str | None = None, password: str | None = None, vhost: str | None = None
) -> str:
    url = URL(base)
    if user is not None:
        url = url.with_user(user)
    if password is not None:
        url = url.with_password(password)
    if vhost is not None:
        url = url.with_path("/" + vhost)
    return str(url)


def _vhost_of(url: str) -> str:
    return BrokerAddress.parse(url).vhost


async def _failed_start(url: str, **changes: object) -> tuple[float, list[str]]:
    """Start the service against `url`; how long it took to exit 1, and its log lines."""
    changes.setdefault("broker_connect_timeout_s", CONNECT_TIMEOUT_S)
    service = ServiceProcess(settings_for_test(url, **changes))
    started_s = time.monotonic()
    await service.start(wait_ready=False)
    assert await service.wait_exit(timeout_s=CONNECT_TIMEOUT_S) == 1
    elapsed_s = time.monotonic() - started_s
    log = service.log()
    assert PASSWORD not in log
    return elapsed_s, log.strip().splitlines()


def _assert_ends_with_one_error(lines: list[str], expected: str) -> None:
    assert lines[-1] == f"error: {expected}"
    assert [line for line in lines if line.startswith("error:")] == [lines[-1]]


@pytest.mark.parametrize("who", ["wrong password", "unknown user"])
async def test_a_refused_login_stops_the_start_at_once(rabbitmq_url: str, who: str) -> None:
    user = "guest" if who == "wrong password" else _unique("nobody")
    url = _url(rabbitmq_url, user=user, password=PASSWORD)
    elapsed_s, lines = await _failed_start(url)
    address = BrokerAddress.parse(url)
    _assert_ends_with_one_error(
        lines,
        f"RabbitMQ refused login for user {user!r} at {address}: "
        "wrong password or unknown user (the broker's log says which)",
    )
    assert elapsed_s < FAIL_FAST_S


async def test_a_vhost_that_does_not_exist_stops_the_start_at_once(rabbitmq_url: str) -> None:
    url = _url(rabbitmq_url, vhost=_unique("no-such-vhost"))
    elapsed_s, lines = await _failed_start(url)
    address = BrokerAddress.parse(url)
    _assert_ends_with_one_error(
        lines, f"RabbitMQ vhost {address.vhost!r} does not exist at {address}"
    )
    assert elapsed_s < FAIL_FAST_S


async def test_a_user_without_permission_on_the_vhost_stops_the_start_at_once(
    rabbitmq_url: str,
) -> None:
    with broker_user() as user:
        url = _url(rabbitmq_url, user=user, password=PASSWORD)
        elapsed_s, lines = await _failed_start(url)
    address = BrokerAddress.parse(url)
    _assert_ends_with_one_error(
        lines, f"user {user!r} has no permission on vhost {address.vhost!r} at {address}"
    )
    assert elapsed_s < FAIL_FAST_S


async def test_a_user_who_may_not_declare_stops_the_start_at_once(rabbitmq_url: str) -> None:
    # Permissions on the vhost, but none that match a name: it opens the
    # vhost, and the broker refuses the first exchange it declares.
    with broker_user(vhost=_vhost_of(rabbitmq_url), permissions=("", "", "")) as user:
        url = _url(rabbitmq_url, user=user, password=PASSWORD)
        elapsed_s, lines = await _failed_start(url)
    address = BrokerAddress.parse(url)
    assert lines[-1].startswith(
        f"error: user {user!r} lacks a permission on vhost {address.vhost!r} at {address}: "
        "ACCESS_REFUSED - access to exchange "
    )
    _assert_ends_with_one_error(lines, lines[-1].removeprefix("error: "))
    assert elapsed_s < FAIL_FAST_S


async def test_a_vhost_at_its_connection_limit_is_waited_for(rabbitmq_url: str) -> None:
    # A limit reached is the broker being busy, not refusing: retried until the timeout.
    with broker_vhost() as vhost:
        rabbitmqctl("set_vhost_limits", "-p", vhost, '{"max-connections": 0}')
        url = _url(rabbitmq_url, vhost=vhost)
        elapsed_s, lines = await _failed_start(url, broker_connect_timeout_s=1.5)
    assert elapsed_s >= 1.5
    assert lines[-1].startswith("error: cannot reach RabbitMQ at ")
    assert lines[-1].endswith("refused for user 'guest': connection limit (0) is reached")


@pytest.mark.parametrize("log_format", ["text", "json"])
async def test_a_port_in_use_ends_with_a_line_that_says_so(
    rabbitmq_url: str, log_format: str
) -> None:
    settings = settings_for_test(rabbitmq_url)
    with socket.create_server(("127.0.0.1", settings.port)):
        service = ServiceProcess(settings, LOG_FORMAT=log_format)
        await service.start(wait_ready=False)
        assert await service.wait_exit(timeout_s=15) == 1
    lines = service.log().strip().splitlines()
    in_use = f"[Errno {errno.EADDRINUSE}] {os.strerror(errno.EADDRINUSE).lower()}"
    _assert_ends_with_one_error(lines, f"could not serve on 127.0.0.1:{settings.port}: {in_use}")
    if log_format == "json":
        assert all(json.loads(line) for line in lines[:-1])
    await delete_namespace(settings)


async def test_a_dropped_connection_logs_one_warning_and_no_traceback(rabbitmq_url: str) -> None:
    settings = settings_for_test(rabbitmq_url)
    service = ServiceProcess(settings, LOG_FORMAT="json")
    await service.start()
    assert service.process is not None
    try:
        async with httpx.AsyncClient(base_url=service.base_url) as client:
            assert close_service_connections(settings, service.process.pid) == 1
            await wait_ready_at(client)
            prediction_id = await submit_async(client, "after the drop")
            assert (await wait_finished(client, prediction_id)).status_code == 200
    finally:
        await service.stop()
    log = service.log()
    records = [json.loads(line) for line in log.splitlines()]
    loud = [(r["logger"], r["message"]) for r in records if r["level"] != "info"]
    assert loud == [
        (
            "service.broker",
            "lost the broker connection (CONNECTION_FORCED - test: broker drops the connection); "
            f"reconnecting every {settings.broker_reconnect_interval_s:g} s",
        )
    ]
    assert "Traceback" not in log
    node = BrokerAddress.parse(settings.rabbitmq_url)
    assert ("service.broker", f"broker connection restored ({node})") in [
        (r["logger"], r["message"]) for r in records
    ]
    await delete_namespace(settings)


async def test_a_refusal_while_reconnecting_is_logged_once(rabbitmq_url: str) -> None:
    vhost = _vhost_of(rabbitmq_url)
    with broker_user(vhost=vhost, permissions=(".*", ".*", ".*")) as user:
        url = _url(rabbitmq_url, user=user, password=PASSWORD)
        settings = settings_for_test(url, broker_reconnect_interval_s=0.2)
        service = ServiceProcess(settings)
        await service.start()
        try:
            rabbitmqctl("delete_user", user)  # the broker closes its connections too
            await _wait_for_line(service, "cannot reconnect: ")
            await asyncio.sleep(1)  # five more attempts, refused alike
            rabbitmqctl("add_user", user, PASSWORD)
            rabbitmqctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*")
            async with httpx.AsyncClient(base_url=service.base_url) as client:
                await wait_ready_at(client)
        finally:
            await service.stop()
    log = service.log()
    refusals = [
        line.partition(" ERROR ")[2] for line in log.splitlines() if "cannot reconnect" in line
    ]
    # Each refusal once (a user added back without permissions yet is refused otherwise).
    assert len(set(refusals)) == len(refusals)
    address = BrokerAddress.parse(url)
    assert refusals[0] == (
        f"service.broker: cannot reconnect: RabbitMQ refused login for user {user!r} "
        f"at {address}: wrong password or unknown user (the broker's log says which); "
        "retrying every 0.2 s"
    )
    assert "Traceback" not in log
    assert PASSWORD not in log
    await delete_namespace(settings.with_changes(rabbitmq_url=rabbitmq_url))


async def _wait_for_line(service: ServiceProcess, text: str, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while text not in service.log():
        assert time.monotonic() < deadline, f"no {text!r} in the log"
        await asyncio.sleep(0.05)


async def test_the_start_is_one_line_of_what_the_replica_runs_with(rabbitmq_url: str) -> None:
    settings = settings_for_test(rabbitmq_url)
    service = ServiceProcess(settings)
    await service.start()
    await service.stop()
    vhost = _vhost_of(rabbitmq_url)
    expected = (
        f"starting on 127.0.0.1:{settings.port}: model mock (0.05-0.2 s), "
        f"broker {BrokerAddress.parse(rabbitmq_url)} vhost {vhost!r} as guest, "
        f"namespace {settings.broker_namespace!r}, model concurrency 100, "
        "max body 1048576 B, results kept 86400 s, memory budget 268435456 B, "
        "state dir (temporary)"
    )
    starts = [line for line in service.log().splitlines() if "INFO service.app: starting" in line]
    assert len(starts) == 1
    assert starts[0].endswith(f"INFO service.app: {expected}")
    await delete_namespace(settings)


def test_the_start_line_names_a_plugged_model_and_hides_the_password() -> None:
    settings = settings_for_test(
        f"amqps://svc:{PASSWORD}@rabbit.example:5671/prod",
        host="::",
        port=8080,
        predictor="mymodels.sentiment:predict",
        model_concurrency=8,
        result_ttl_s=30 * 86_400,
        state_dir="/var/lib/predictions",
    )
    assert startup_line(settings) == (
        "starting on [::]:8080: model mymodels.sentiment:predict, "
        "broker rabbit.example:5671 (TLS) vhost 'prod' as svc, "
        f"namespace {settings.broker_namespace!r}, model concurrency 8, "
        "max body 1048576 B, results kept 2592000 s, memory budget 268435456 B, "
        "state dir '/var/lib/predictions'"
    )
