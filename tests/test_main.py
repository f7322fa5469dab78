"""`python -m service` as an operator starts it."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import re
import signal
import socket
import subprocess
import sys

import anyio
import httpx

from service.settings import Settings
from tests.support import (
    REPO,
    ServiceProcess,
    delete_namespace,
    free_port,
    settings_for_test,
    submit_async,
    wait_finished,
)


async def test_bad_predictor_exits_at_start_with_one_line(rabbitmq_url: str) -> None:
    service = ServiceProcess(settings_for_test(rabbitmq_url, predictor="nowhere.at.all:predict"))
    await service.start(wait_ready=False)
    assert await service.wait_exit(timeout_s=15) != 0
    lines = service.log().strip().splitlines()
    assert lines == [
        "error: PREDICTOR='nowhere.at.all:predict': cannot import 'nowhere.at.all': "
        "No module named 'nowhere'"
    ]


async def test_unreachable_broker_exits_after_the_connect_timeout(rabbitmq_url: str) -> None:
    nowhere = f"amqp://guest:secret@127.0.0.1:{free_port()}/"
    service = ServiceProcess(settings_for_test(nowhere, broker_connect_timeout_s=1))
    await service.start(wait_ready=False)
    assert await service.wait_exit(timeout_s=20) == 1
    last_line = service.log().strip().splitlines()[-1]
    assert last_line.startswith("error: cannot reach RabbitMQ at amqp://guest:***@127.0.0.1")
    assert "secret" not in service.log()


async def test_serves_predictions_and_stops_cleanly_on_sigterm(rabbitmq_url: str) -> None:
    service = ServiceProcess(settings_for_test(rabbitmq_url))
    await service.start()
    try:
        async with httpx.AsyncClient(base_url=service.base_url) as client:
            sync = await client.post("/predict", json={"input": "hi"})
            assert sync.status_code == 200
            prediction_id = await submit_async(client, "hello")
            assert (await wait_finished(client, prediction_id)).status_code == 200
    finally:
        service.signal(signal.SIGTERM)
    # uvicorn re-raises SIGTERM after a graceful shutdown.
    assert await service.wait_exit() == -signal.SIGTERM


async def test_ctrl_c_stops_cleanly_without_a_traceback(rabbitmq_url: str) -> None:
    settings = settings_for_test(rabbitmq_url)
    service = ServiceProcess(settings)
    await service.start()
    service.signal(signal.SIGINT)
    assert await service.wait_exit() == 128 + signal.SIGINT
    assert "Application shutdown complete" in service.log()
    assert "Traceback" not in service.log()
    await delete_namespace(settings)


async def test_a_host_that_names_no_address_exits_at_start_with_one_line(
    rabbitmq_url: str,
) -> None:
    service = ServiceProcess(settings_for_test(rabbitmq_url, host="999.1.1.1"))
    await service.start(wait_ready=False)
    assert await service.wait_exit(timeout_s=15) == 1
    [line] = service.log().strip().splitlines()
    # The reason is the resolver's ("Name or service not known" here).
    assert line.startswith("error: HOST='999.1.1.1' is not an address to listen on: ")


async def test_a_port_in_use_ends_with_an_error_line(rabbitmq_url: str) -> None:
    settings = settings_for_test(rabbitmq_url)
    with socket.create_server(("127.0.0.1", settings.port)):
        service = ServiceProcess(settings)
        await service.start(wait_ready=False)
        assert await service.wait_exit(timeout_s=15) == 1
    lines = service.log().strip().splitlines()
    assert "address already in use" in service.log()
    # The reason on the last line itself, not lines above it.
    assert lines[-1] == (
        f"error: could not serve on 127.0.0.1:{settings.port}: "
        f"[Errno {errno.EADDRINUSE}] {os.strerror(errno.EADDRINUSE).lower()}"
    )
    await delete_namespace(settings)


async def _raw_request(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    answer = await reader.read()  # the server closes the connection
    writer.close()
    return answer


async def test_requests_the_http_parser_rejects_get_a_json_400(rabbitmq_url: str) -> None:
    service = ServiceProcess(settings_for_test(rabbitmq_url))
    await service.start()
    try:
        port = service.settings.port
        bad_length = b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n"
        bad_header = b"GET /healthz HTTP/1.1\r\nHost: x\r\nNo Colon\r\n\r\n"
        for request in (bad_length, bad_header):
            with anyio.fail_after(5):
                answer = await _raw_request(port, request)
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 400 "), answer
            assert b"\r\ncontent-type: application/json\r\n" in head
            assert json.loads(body) == {"error": "Invalid HTTP request received."}
    finally:
        await service.stop()


async def test_changed_queue_arguments_stop_the_start_with_one_line(rabbitmq_url: str) -> None:
    settings = settings_for_test(rabbitmq_url, max_attempts=3)
    first = ServiceProcess(settings)
    await first.start()
    await first.stop()
    changed = ServiceProcess(settings.with_changes(max_attempts=5))
    await changed.start(wait_ready=False)
    assert await changed.wait_exit() == 1
    last_line = changed.log().strip().splitlines()[-1]
    assert "was RESULT_TTL_S or MAX_ATTEMPTS changed" in last_line
    assert "a version before replication" in last_line
    await delete_namespace(settings)


def _run_service(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service", *arguments],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
        check=False,
    )


def test_help_lists_every_setting_and_starts_nothing() -> None:
    for flag in ("--help", "-h"):
        done = _run_service(flag)
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("usage: ")
        listed = set(re.findall(r"^  ([A-Z_]+)[= ]", done.stdout, re.MULTILINE))
        assert listed == {name.upper() for name in Settings.__struct_fields__}
        assert "  PORT=8080\n" in done.stdout
        assert "  WEBHOOK_SECRET (unset)\n" in done.stdout
        assert "starting on" not in done.stdout + done.stderr


def test_an_argument_is_refused_with_one_line_not_ignored() -> None:
    done = _run_service("--port", "9000")
    assert done.returncode == 2
    assert done.stdout == ""
    [line] = done.stderr.splitlines()
    assert line.startswith("error: python -m service takes no arguments (got '--port')")
