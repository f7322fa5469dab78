"""The HTTP edges (service/http/protocol.py): head limits and slow clients, over raw sockets."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import anyio
import pytest

from tests.support import LiveApp, live_app, metric, settings_for_test

# The tight app's limits: small, so that the tests reach them in a moment.
HEAD_LIMIT = 1024
HEADER_COUNT_LIMIT = 10
TIMEOUT_S = 0.5
DEFAULT_HEAD_LIMIT = 65_536
HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n"


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def response(self, timeout_s: float = 5) -> RawResponse:
        with anyio.fail_after(timeout_s):
            return await read_response(self.reader)

    async def is_closed_by_server(self, timeout_s: float = 3) -> bool:
        """True once the server ends the connection, having sent nothing more."""
        with anyio.fail_after(timeout_s):
            try:
                return await self.reader.read() == b""
            except ConnectionResetError:
                return True


async def read_response(reader: asyncio.StreamReader) -> RawResponse:
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").rstrip("\r\n").split("\r\n")
    fields = (line.split(":", 1) for line in lines)
    headers = {name.strip().lower(): value.strip() for name, value in fields}
    body = await reader.readexactly(int(headers["content-length"]))
    return RawResponse(int(status_line.split()[1]), headers, body)


@contextlib.asynccontextmanager
async def connect(live: LiveApp) -> AsyncIterator[Connection]:
    reader, writer = await asyncio.open_connection("127.0.0.1", live.settings.port)
    try:
        yield Connection(reader, writer)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def head_of(size: int, path: bytes = b"/healthz") -> bytes:
    """A GET head of exactly `size` bytes, padded with one header."""
    start = b"GET " + path + b" HTTP/1.1\r\nHost: test\r\nX-Pad: "
    end = b"\r\n\r\n"
    return start + b"a" * (size - len(start) - len(end)) + end


def post_head(content_length: int) -> bytes:
    return (
        b"POST /predict HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % content_length
    )


def predict_body(text: str) -> bytes:
    return json.dumps({"input": text}).encode()


def assert_refused(response: RawResponse, status: int, error: str) -> None:
    assert response.status == status
    assert response.json() == {"error": error}
    assert response.headers["content-type"] == "application/json"
    assert response.headers["connection"] == "close"
    assert "date" in response.headers  # uvicorn's defaults, as on every response


@pytest.fixture(scope="module")
async def tight(rabbitmq_url: str) -> AsyncIterator[LiveApp]:
    """One app with small head limits and short timeouts, shared by the module."""
    settings = settings_for_test(
        rabbitmq_url,
        max_header_bytes=HEAD_LIMIT,
        max_headers=HEADER_COUNT_LIMIT,
        header_timeout_s=TIMEOUT_S,
        body_idle_timeout_s=TIMEOUT_S,
    )
    async with live_app(settings) as live:
        yield live


# Head limits


async def test_a_head_of_exactly_the_limit_is_served(tight: LiveApp) -> None:
    async with connect(tight) as conn:
        await conn.send(head_of(HEAD_LIMIT))
        response = await conn.response()
    assert response.status == 200


async def test_a_head_one_byte_over_the_limit_gets_431_and_the_connection_closes(
    tight: LiveApp,
) -> None:
    async with connect(tight) as conn:
        await conn.send(head_of(HEAD_LIMIT + 1))
        response = await conn.response()
        assert await conn.is_closed_by_server()
    assert_refused(response, 431, f"Request headers exceed {HEAD_LIMIT} bytes.")


async def test_a_head_sent_in_small_pieces_is_counted_across_reads(tight: LiveApp) -> None:
    head = head_of(HEAD_LIMIT * 3)
    async with connect(tight) as conn:
        answer = asyncio.create_task(conn.response())
        sent = 0
        while sent < len(head) and not answer.done():
            await conn.send(head[sent : sent + 100])
            sent += 100
            await asyncio.sleep(0.005)  # one read each
        response = await answer
    assert_refused(response, 431, f"Request headers exceed {HEAD_LIMIT} bytes.")
    assert sent < len(head)  # refused before the head was over


async def test_more_headers_than_the_limit_get_431(tight: LiveApp) -> None:
    extra = b"".join(b"X-%d: v\r\n" % i for i in range(HEADER_COUNT_LIMIT))  # and Host
    async with connect(tight) as conn:
        await conn.send(b"GET /healthz HTTP/1.1\r\nHost: test\r\n" + extra + b"\r\n")
        response = await conn.response()
        assert await conn.is_closed_by_server()
    assert_refused(response, 431, f"More than {HEADER_COUNT_LIMIT} request headers.")


async def test_as_many_headers_as_the_limit_are_served(tight: LiveApp) -> None:
    extra = b"".join(b"X-%d: v\r\n" % i for i in range(HEADER_COUNT_LIMIT - 1))
    async with connect(tight) as conn:
        await conn.send(b"GET /healthz HTTP/1.1\r\nHost: test\r\n" + extra + b"\r\n")
        assert (await conn.response()).status == 200


async def test_a_body_larger_than_the_head_limit_is_not_counted_as_head(tight: LiveApp) -> None:
    body = predict_body("x" * 200_000)
    async with connect(tight) as conn:
        await conn.send(post_head(len(body)) + body)
        response = await conn.response()
    assert response.status == 200
    assert response.json()["input"] == "x" * 200_000


async def test_an_oversized_pipelined_head_is_answered_after_the_request_before_it(
    tight: LiveApp,
) -> None:
    body = predict_body("first")
    async with connect(tight) as conn:
        await conn.send(post_head(len(body)) + body + head_of(HEAD_LIMIT * 2))
        first = await conn.response()
        second = await conn.response()
        assert await conn.is_closed_by_server()
    assert first.status == 200
    assert first.json()["input"] == "first"
    assert_refused(second, 431, f"Request headers exceed {HEAD_LIMIT} bytes.")


async def test_a_refused_connection_gets_one_answer_however_long_it_stays(
    tight: LiveApp, caplog: pytest.LogCaptureFixture
) -> None:
    async with connect(tight) as conn:
        await conn.send(head_of(HEAD_LIMIT * 2)[:-10])  # unfinished: its clock runs
        assert (await conn.response()).status == 431
        assert await conn.is_closed_by_server()
        await asyncio.sleep(TIMEOUT_S * 3)  # past the header timeout and the linger
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR]


def send_whole_then_read(port: int, request: bytes) -> bytes:
    """What a blocking client does: write the whole request, then read."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        return sock.recv(65_536)


async def test_a_client_that_writes_a_huge_head_before_reading_still_reads_the_431(
    tight: LiveApp,
) -> None:
    # Had the server closed at once, the kernel would answer the input it
    # never read with a reset, and such a client's write would fail instead.
    request = head_of(8 * 2**20)
    answer = await asyncio.to_thread(send_whole_then_read, tight.settings.port, request)
    assert answer.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")


@dataclass
class Streamed:
    response: RawResponse
    sent_bytes: int
    refused_after_crossing_s: float


async def stream_header(
    live: LiveApp, total_bytes: int, limit: int, *, deaf: bool = False
) -> Streamed:
    """Send a header value of `total_bytes` in 64 KiB writes, stopping once answered.

    A `deaf` client goes on until it has sent everything or the server closes.
    """
    chunk = b"a" * 65_536
    async with connect(live) as conn:
        answered_s = 0.0

        async def answer() -> RawResponse:
            nonlocal answered_s
            response = await conn.response(timeout_s=30)
            answered_s = time.monotonic()
            return response

        answering = asyncio.create_task(answer())
        await conn.send(b"GET /healthz HTTP/1.1\r\nHost: test\r\nX-Huge: ")
        sent, crossed_s = 0, 0.0
        with contextlib.suppress(ConnectionError):
            while sent < total_bytes and (deaf or not answering.done()):
                await conn.send(chunk)
                sent += len(chunk)
                if not crossed_s and sent > limit:
                    crossed_s = time.monotonic()
        response = await answering
    return Streamed(response, sent, answered_s - crossed_s)


async def healthz_latencies(live: LiveApp, until: asyncio.Task[Streamed]) -> list[float]:
    """GET /healthz on a connection of its own, again and again until `until` is done."""
    latencies: list[float] = []
    async with connect(live) as conn:
        while True:
            started_s = time.monotonic()
            await conn.send(HEALTHZ)
            assert (await conn.response()).status == 200
            latencies.append(time.monotonic() - started_s)
            if until.done():
                return latencies
            await asyncio.sleep(0.01)


async def test_a_huge_header_is_refused_as_it_crosses_the_limit_while_others_are_served(
    rabbitmq_url: str,
) -> None:
    async with live_app(settings_for_test(rabbitmq_url)) as live:
        huge = stream_header(live, 128 * 2**20, DEFAULT_HEAD_LIMIT, deaf=True)
        streaming = asyncio.create_task(huge)
        latencies = await healthz_latencies(live, streaming)
        streamed = await streaming
    assert_refused(streamed.response, 431, f"Request headers exceed {DEFAULT_HEAD_LIMIT} bytes.")
    assert streamed.refused_after_crossing_s < 1
    assert max(latencies) < 0.5


@pytest.mark.parametrize("total_mib", [1, 64])
async def test_the_refusal_does_not_depend_on_what_the_client_would_still_send(
    tight: LiveApp, total_mib: int
) -> None:
    streamed = await stream_header(tight, total_mib * 2**20, HEAD_LIMIT)
    assert streamed.response.status == 431
    assert streamed.refused_after_crossing_s < 1


# Slow clients


async def test_a_head_never_completed_gets_408_after_the_header_timeout(tight: LiveApp) -> None:
    async with connect(tight) as conn:
        started_s = time.monotonic()
        await conn.send(b"GET /healthz HTTP/1.1\r\nHost: te")
        response = await conn.response()
        elapsed_s = time.monotonic() - started_s
        assert await conn.is_closed_by_server()
    assert_refused(response, 408, f"Request headers not received within {TIMEOUT_S:g} s.")
    assert TIMEOUT_S * 0.8 < elapsed_s < TIMEOUT_S + 1


async def test_a_head_trickled_byte_by_byte_still_times_out(tight: LiveApp) -> None:
    async with connect(tight) as conn:
        started_s = time.monotonic()
        answer = asyncio.create_task(conn.response())
        for byte in b"GET /healthz HTTP/1.1\r\nHost: test\r\nX-Slow: " + b"a" * 100:
            if answer.done():
                break
            await conn.send(bytes([byte]))
            await asyncio.sleep(0.05)
        response = await answer
        elapsed_s = time.monotonic() - started_s
    assert response.status == 408
    assert elapsed_s < TIMEOUT_S + 1


async def test_a_connection_that_sends_nothing_gets_408(tight: LiveApp) -> None:
    async with connect(tight) as conn:
        response = await conn.response()
        assert await conn.is_closed_by_server()
    assert response.status == 408


async def test_a_keep_alive_requests_stalled_head_gets_408(tight: LiveApp) -> None:
    async with connect(tight) as conn:
        await conn.send(HEALTHZ)
        assert (await conn.response()).status == 200
        await conn.send(b"GET /healthz HTTP/1.1\r\n")
        response = await conn.response()
        assert await conn.is_closed_by_server()
    assert_refused(response, 408, f"Request headers not received within {TIMEOUT_S:g} s.")


async def test_an_idle_keep_alive_connection_is_not_timed_out_by_the_header_timeout(
    tight: LiveApp,
) -> None:
    async with connect(tight) as conn:
        await conn.send(HEALTHZ)
        assert (await conn.response()).status == 200
        await asyncio.sleep(TIMEOUT_S * 2)  # within uvicorn's keep-alive timeout (5 s)
        await conn.send(HEALTHZ)
        assert (await conn.response()).status == 200


async def test_a_stalled_body_gets_408_and_the_request_ends_without_an_error(
    tight: LiveApp, caplog: pytest.LogCaptureFixture
) -> None:
    body = predict_body("stalled")
    async with connect(tight) as conn:
        started_s = time.monotonic()
        await conn.send(post_head(len(body)) + body[:5])
        response = await conn.response()
        elapsed_s = time.monotonic() - started_s
        assert await conn.is_closed_by_server()
    error = f"Request body not received: nothing arrived for {TIMEOUT_S:g} s."
    assert_refused(response, 408, error)
    assert TIMEOUT_S * 0.8 < elapsed_s < TIMEOUT_S + 1
    with anyio.fail_after(2):  # the request's task ends: receive() said the client is gone
        while tight.server.server_state.tasks:
            await asyncio.sleep(0.01)
    assert 'status="500"' not in (await tight.client.get("/metrics")).text
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR]
    # Logged and counted as what the client got.
    assert await metric(tight.client, _POST_STATUS.format(status=408)) >= 1


_POST_STATUS = 'http_requests_total{{method="POST",route="/predict",status="{status}"}}'


async def test_a_body_its_client_abandons_is_counted_as_499(tight: LiveApp) -> None:
    before = await metric(tight.client, _POST_STATUS.format(status=499))
    before_400 = await metric(tight.client, _POST_STATUS.format(status=400))
    body = predict_body("abandoned")
    async with connect(tight) as conn:
        await conn.send(post_head(len(body)) + body[:5])
        await asyncio.sleep(0.1)
    with anyio.fail_after(2):
        while await metric(tight.client, _POST_STATUS.format(status=499)) < before + 1:
            await asyncio.sleep(0.02)
    assert await metric(tight.client, _POST_STATUS.format(status=400)) == before_400


async def test_a_slow_but_steady_body_is_served(tight: LiveApp) -> None:
    body = predict_body("steady " * 20)
    pieces = [body[i : i + 20] for i in range(0, len(body), 20)]
    assert len(pieces) * 0.2 > TIMEOUT_S * 2  # the whole takes longer than the timeout
    async with connect(tight) as conn:
        await conn.send(post_head(len(body)))
        for piece in pieces:
            await asyncio.sleep(0.2)
            await conn.send(piece)
        response = await conn.response()
    assert response.status == 200
    assert response.json()["input"] == "steady " * 20


async def test_a_body_sent_after_a_pause_within_the_timeout_is_served(tight: LiveApp) -> None:
    body = predict_body("paused")
    async with connect(tight) as conn:
        await conn.send(post_head(len(body)))
        await asyncio.sleep(TIMEOUT_S * 0.6)
        await conn.send(body)
        assert (await conn.response()).status == 200


# What worked keeps working


async def test_keep_alive_requests_are_served_in_turn(tight: LiveApp) -> None:
    body = predict_body("kept alive")
    async with connect(tight) as conn:
        for _ in range(3):
            await conn.send(HEALTHZ)
            assert (await conn.response()).status == 200
            await conn.send(post_head(len(body)) + body)
            assert (await conn.response()).status == 200


async def test_pipelined_requests_are_all_served(tight: LiveApp) -> None:
    body = predict_body("pipelined")
    requests = HEALTHZ + post_head(len(body)) + body + head_of(HEAD_LIMIT) + HEALTHZ
    async with connect(tight) as conn:
        await conn.send(requests)
        statuses = [(await conn.response()).status for _ in range(4)]
    assert statuses == [200, 200, 200, 200]


async def test_many_pipelined_heads_in_one_read_each_get_their_own_budget(tight: LiveApp) -> None:
    count = 12  # together far over the limit, each well within it
    async with connect(tight) as conn:
        await conn.send(head_of(HEAD_LIMIT // 2) * count)
        statuses = [(await conn.response()).status for _ in range(count)]
    assert statuses == [200] * count


async def test_a_malformed_request_still_gets_a_json_400(tight: LiveApp) -> None:
    async with connect(tight) as conn:
        await conn.send(b"GET /healthz HTTP/1.1\r\nBad Header\r\n\r\n")
        response = await conn.response()
    assert response.status == 400
    assert response.json() == {"error": "Invalid HTTP request received."}


async def test_refusals_the_app_never_sees_are_counted(tight: LiveApp) -> None:
    series = 'http_requests_total{{method="{method}",route="unmatched",status="{status}"}}'
    too_large = series.format(method="GET", status=431)
    too_slow = series.format(method="-", status=408)
    before = (await metric(tight.client, too_large), await metric(tight.client, too_slow))
    async with connect(tight) as conn:
        await conn.send(head_of(HEAD_LIMIT + 1))
        assert (await conn.response()).status == 431
    async with connect(tight) as conn:  # sends nothing
        assert (await conn.response()).status == 408
    after = (await metric(tight.client, too_large), await metric(tight.client, too_slow))
    assert after == (before[0] + 1, before[1] + 1)
