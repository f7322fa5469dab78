"""The request log: one line per request, complete, in order, never in the way.

Each test runs `python -m service` as an operator does, with the default
LOG_LEVEL (INFO: the request log is on), and reads what it wrote to stderr.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import anyio
import httpx
import pytest

from bench.httpclient import Connection, encode_request
from service import logs
from service.settings import Settings
from tests.support import (
    REPO,
    ServiceProcess,
    metric,
    settings_env,
    settings_for_test,
    submit_async,
    wait_ready_at,
)

TEXT_LINE = re.compile(
    r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO service\.access: "
    r"GET (?P<path>\S+) (?P<status>\d{3}) \d+\.\d ms( prediction_id=\S+)?"
)


async def _get_many(port: int, paths_per_connection: list[list[str]]) -> list[int]:
    """Each connection sends its paths one after another; all connections at once."""

    async def one_connection(paths: list[str]) -> list[int]:
        connection = await Connection.open("127.0.0.1", port)
        try:
            return [(await connection.send(encode_request("GET", path))).status for path in paths]
        finally:
            await connection.close()

    results = await asyncio.gather(*(one_connection(paths) for paths in paths_per_connection))
    return [status for statuses in results for status in statuses]


def _paths(connections: int, per_connection: int) -> list[list[str]]:
    # Not ids the service issues: 404 at once, no broker round trip.
    return [[f"/predict/c{c}-r{r}" for r in range(per_connection)] for c in range(connections)]


async def test_lines_are_complete_and_in_order_under_concurrent_load(rabbitmq_url: str) -> None:
    service = ServiceProcess(settings_for_test(rabbitmq_url))
    await service.start()
    try:
        paths = _paths(connections=32, per_connection=100)
        statuses = await _get_many(service.settings.port, paths)
        assert statuses == [404] * 3200
    finally:
        await service.stop()
    logged = [m for line in service.log().splitlines() if (m := TEXT_LINE.fullmatch(line))]
    assert len(logged) == 3200
    assert {m["status"] for m in logged} == {"404"}
    _assert_each_connection_in_order([m["path"] for m in logged], paths)


def _assert_each_connection_in_order(logged: list[str], paths: list[list[str]]) -> None:
    # A connection's requests are answered, so logged, one after another.
    assert sorted(logged) == sorted(path for sent in paths for path in sent)
    for sent in paths:
        prefix = sent[0].rsplit("-", 1)[0] + "-"
        assert [path for path in logged if path.startswith(prefix)] == sent


async def test_sigterm_writes_every_line_still_in_the_buffer(rabbitmq_url: str) -> None:
    service = ServiceProcess(settings_for_test(rabbitmq_url))
    await service.start()
    paths = _paths(connections=4, per_connection=50)
    statuses = await _get_many(service.settings.port, paths)
    # At once: well within the writer's 100 ms flush interval.
    service.signal(signal.SIGTERM)
    assert await service.wait_exit() == -signal.SIGTERM  # ended by the signal, as uvicorn does
    assert statuses == [404] * 200
    logged = {m["path"] for line in service.log().splitlines() if (m := TEXT_LINE.fullmatch(line))}
    assert logged == {path for sent in paths for path in sent}


async def test_sigterm_keeps_the_lines_of_predictions_finished_during_the_grace(
    rabbitmq_url: str,
) -> None:
    # uvicorn ends the process by re-raising SIGTERM after its shutdown:
    # lines logged in its last moments must still be written.
    settings = settings_for_test(rabbitmq_url, model_delay_min_s=1, model_delay_max_s=1)
    service = ServiceProcess(settings)
    await service.start()
    async with httpx.AsyncClient(base_url=service.base_url) as client:
        ids = [await submit_async(client, f"graced {n}") for n in range(5)]
        with anyio.fail_after(10):
            while await metric(client, "predictions_in_flight") < 5:
                await asyncio.sleep(0.05)
    service.signal(signal.SIGTERM)
    assert await service.wait_exit() == -signal.SIGTERM
    log = service.log()
    done = {
        line.rsplit("prediction_id=", 1)[-1]
        for line in log.splitlines()
        if "prediction done" in line
    }
    assert done == set(ids)
    assert service.process is not None
    assert log.rstrip().endswith(f"Finished server process [{service.process.pid}]")


async def test_json_request_lines_parse_with_their_fields(rabbitmq_url: str) -> None:
    service = ServiceProcess(settings_for_test(rabbitmq_url), LOG_FORMAT="json")
    await service.start()
    try:
        async with httpx.AsyncClient(base_url=service.base_url) as client:
            response = await client.get("/predict/abc%0a%1b[31m%00\u00e9%E2%80%A8%C2%85")
            assert response.status_code == 404
            await _get_many(service.settings.port, _paths(connections=8, per_connection=20))
    finally:
        await service.stop()
    lines = [json.loads(line) for line in service.log().splitlines()]
    requests = [line for line in lines if line["logger"] == "service.access"]
    assert len(requests) == 161
    for line in requests:
        fields = {"ts", "level", "logger", "message", "http_status", "duration_ms"}
        assert set(line) - {"prediction_id"} == fields
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["ts"])
        assert line["level"] == "info" and line["http_status"] == 404
        assert isinstance(line["duration_ms"], float)
    # JSON escapes what the path decodes to; the line stays one line.
    assert requests[0]["message"].startswith("GET /predict/abc\n\x1b[31m\x00\u00e9\u2028\x85 404 ")
    # Not even the line breaks JSON may leave raw: every line is one line, for any reader.
    assert all(line.isprintable() for line in service.log().splitlines())


async def test_a_forged_line_in_the_path_stays_inside_its_own_line(rabbitmq_url: str) -> None:
    service = ServiceProcess(settings_for_test(rabbitmq_url))
    await service.start()
    forged = "2026-12-01%2000:00:00,000%20INFO%20service.access:%20FORGED"
    try:
        async with httpx.AsyncClient(base_url=service.base_url) as client:
            response = await client.get(f"/predict/abc%0a{forged}%1b[2J%00")
            assert response.status_code == 404
    finally:
        await service.stop()
    log = service.log()
    [line] = [line for line in log.splitlines() if "FORGED" in line]
    assert line.startswith(tuple("0123456789")) and " INFO service.access: GET " in line
    assert "/predict/abc\\n2026-12-01 00:00:00,000 INFO service.access: FORGED\\x1b[2J\\x00" in line
    assert "\x1b" not in log and "\x00" not in log


def _start_with_stderr_pipe(
    settings: Settings, stderr: int = subprocess.PIPE, close_stderr: bool = False
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "service"],
        env=settings_env(settings),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=stderr,
        # As `2>&-`: no stderr at all.
        preexec_fn=(lambda: os.close(2)) if close_stderr else None,  # noqa: PLW1509
    )


async def _stop(process: subprocess.Popen[bytes]) -> int:
    process.send_signal(signal.SIGTERM)
    with anyio.fail_after(30):
        while (code := process.poll()) is None:
            await asyncio.sleep(0.05)
    return code


async def test_a_stderr_nobody_reads_never_slows_a_request(rabbitmq_url: str) -> None:
    settings = settings_for_test(rabbitmq_url)
    process = _start_with_stderr_pipe(settings)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{settings.port}") as client:
            await wait_ready_at(client, timeout_s=30)
            # ~100 B a line: 6,000 lines are ten times what the pipe holds
            # (64 KiB), so the writer blocks on a full pipe long before the end.
            paths = _paths(connections=20, per_connection=300)
            started_s = time.perf_counter()
            with anyio.fail_after(60):  # a loop blocked on the pipe would hang here
                statuses = await _get_many(settings.port, paths)
            took_s = time.perf_counter() - started_s
            assert statuses == [404] * 6000
            health = await client.get("/healthz", timeout=2)
            assert health.status_code == 200
        # Seconds to spare: a loop blocked on the pipe would never finish.
        assert took_s < 30
        assert process.stderr is not None
        os.set_blocking(process.stderr.fileno(), False)
        # Now read: everything queued meanwhile arrives, in order.
        text = await _read_until(process, lambda t: t.count(" service.access: ") >= 6000)
    finally:
        code = await _stop(process)
        if process.stderr is not None:
            process.stderr.close()
    assert code == -signal.SIGTERM
    logged = [m["path"] for line in text.splitlines() if (m := TEXT_LINE.fullmatch(line))]
    _assert_each_connection_in_order(logged, paths)


async def _read_until(process: subprocess.Popen[bytes], done: Callable[[str], bool]) -> str:
    assert process.stderr is not None
    chunks: list[bytes] = []
    with anyio.fail_after(30):
        while not done(b"".join(chunks).decode(errors="replace")):
            try:
                chunk = os.read(process.stderr.fileno(), 1 << 16)
            except BlockingIOError:
                await asyncio.sleep(0.02)
                continue
            chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")


async def test_a_service_started_with_stderr_closed_serves(rabbitmq_url: str) -> None:
    settings = settings_for_test(rabbitmq_url)
    process = _start_with_stderr_pipe(settings, subprocess.DEVNULL, close_stderr=True)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{settings.port}") as client:
            await wait_ready_at(client, timeout_s=30)
            assert (await client.post("/predict", json={"input": "x"})).status_code == 200
    finally:
        code = await _stop(process)
    assert code == -signal.SIGTERM


async def test_a_closed_stderr_never_fails_a_request(rabbitmq_url: str) -> None:
    settings = settings_for_test(rabbitmq_url)
    process = _start_with_stderr_pipe(settings)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{settings.port}") as client:
            await wait_ready_at(client, timeout_s=30)
            assert process.stderr is not None
            process.stderr.close()  # every later write to stderr fails (EPIPE)
            statuses = await _get_many(settings.port, _paths(connections=8, per_connection=200))
            assert statuses == [404] * 1600
            response = await client.post("/predict", json={"input": "still served"})
            assert response.status_code == 200
            assert (await client.get("/healthz")).status_code == 200
    finally:
        code = await _stop(process)
        if process.stderr is not None:
            process.stderr.close()
    assert code == -signal.SIGTERM


def test_a_direct_write_to_stderr_keeps_its_place_among_the_lines(tmp_path: Path) -> None:
    # The writer writes through the fd it was given, sharing its offset with
    # anything else writing to it (the last `error:` line, written after
    # close_logging).
    script = (
        "import logging, sys, os\n"
        "from service.logs import configure_logging, close_logging\n"
        "configure_logging('INFO', 'text')\n"
        "logging.getLogger('t').info('first')\n"
        "close_logging()\n"
        "os.write(2, b'between\\n')\n"
        "configure_logging('INFO', 'text')\n"
        "logging.getLogger('t').info('last')\n"
        "close_logging()\n"
    )
    log_path = tmp_path / "err.log"
    with log_path.open("wb") as log:
        subprocess.run([sys.executable, "-c", script], cwd=REPO, stderr=log, check=True)
    lines = log_path.read_text().splitlines()
    assert [line.rsplit(" ", 1)[-1] for line in lines] == ["first", "between", "last"]


def test_lines_past_the_waiting_limit_are_dropped_and_counted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A stderr that does not drain must not hold lines without bound.
    monkeypatch.setattr(logs, "MAX_WAITING_LINES", 10)
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    writer = logs.LineWriter(write_end)
    try:
        for n in range(1000):  # in microseconds: the writer wakes every 100 ms
            writer.write(f"line {n}")
    finally:
        writer.close()
    text = os.read(read_end, 1 << 16).decode()
    os.close(read_end)
    os.close(write_end)
    lines = text.splitlines()
    dropped = int(lines[-1].split()[1]) if lines[-1].startswith("[log:") else 0
    assert lines[-1] == f"[log: {dropped} lines dropped: the output did not keep up]"
    assert len(lines) - 1 + dropped == 1000  # every line written or counted
    assert dropped >= 1000 - 10 * 10  # far more than a few drains could have kept
