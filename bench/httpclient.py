"""A minimal HTTP/1.1 keep-alive client over asyncio streams.

Only what the benchmarks need: one request at a time per connection, and
responses that carry Content-Length (every Starlette response does). It
has no pool and no header objects, so a single process drives thousands
of requests per second without becoming the bottleneck (httpx does, see
NOTES.md), and it needs no package beyond the standard library.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from dataclasses import dataclass

HEADER_END = b"\r\n\r\n"


@dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes


def encode_request(
    method: str,
    path: str,
    body: bytes = b"",
    headers: Mapping[str, str] | None = None,
    host: str = "127.0.0.1",
) -> bytes:
    """The request's bytes, built once so a load loop only writes them."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    if body or method in ("POST", "PUT"):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    @classmethod
    async def open(cls, host: str, port: int) -> Connection:
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer)

    async def send(self, request: bytes) -> Reply:
        """Send one encoded request and read its whole response."""
        self._writer.write(request)
        head = await self._reader.readuntil(HEADER_END)
        status, headers = _parse_head(head)
        body = await self._reader.readexactly(int(headers.get("content-length", "0")))
        return Reply(status, headers, body)

    async def close(self) -> None:
        self._writer.close()
        # The server may have closed first; nothing is lost.
        with contextlib.suppress(ConnectionError):
            await self._writer.wait_closed()


def _parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    status_line, *header_lines = head[: -len(HEADER_END)].decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split(" ", 2)[1]), headers
