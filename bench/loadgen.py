"""Closed-loop HTTP load for a fixed time: wrk, or a Python fallback.

Both keep N keep-alive connections busy, each sending its next request as
soon as the last answer arrived, and both run as a child process so the
orchestrator measures their CPU the same way. wrk (Debian package `wrk`)
is the default; `python -m bench.loadgen` stands in where it is missing.
It is slower per request, which is why its CPU share is reported.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import uvloop

from bench.httpclient import Connection, encode_request
from bench.procs import run_measured


@dataclass(frozen=True)
class Load:
    """What to send: one request, repeated."""

    port: int
    method: str
    path: str
    body: bytes = b""
    headers: Mapping[str, str] = field(default_factory=dict)


class LoadResult(msgspec.Struct):
    tool: str
    requests: int
    elapsed_s: float
    # Answers outside 2xx (wrk can only tell these apart) plus socket errors.
    bad: int
    statuses: dict[int, int] = {}
    loadgen_cpu_s: float = 0.0

    @property
    def rate(self) -> float:
        return self.requests / self.elapsed_s

    @property
    def loadgen_cpu_share(self) -> float:
        """The load generator's CPU as a fraction of one core."""
        return self.loadgen_cpu_s / self.elapsed_s


def wrk_available() -> bool:
    return shutil.which("wrk") is not None


def run_load(load: Load, duration_s: float, connections: int, tool: str) -> LoadResult:
    """Run `tool` ("wrk" or "python") against `load` and measure it."""
    if tool == "wrk":
        return _run_wrk(load, duration_s, connections)
    command = [sys.executable, "-m", "bench.loadgen", "--port", str(load.port)]
    command += ["--method", load.method, "--path", load.path, "--body", load.body.decode()]
    command += [f"--header={name}: {value}" for name, value in load.headers.items()]
    command += ["--duration", str(duration_s), "--connections", str(connections)]
    finished = run_measured(command, timeout_s=duration_s + 60)
    result = msgspec.json.decode(finished.stdout, type=LoadResult)
    return msgspec.structs.replace(result, loadgen_cpu_s=finished.cpu_s)


# -- wrk --------------------------------------------------------------------

WRK_REQUESTS = re.compile(r"(\d+) requests in ([\d.]+)(us|ms|s|m)")
WRK_NON_2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")
WRK_SOCKET_ERRORS = re.compile(
    r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)"
)
TIME_UNITS_S = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}


def _run_wrk(load: Load, duration_s: float, connections: int) -> LoadResult:
    # One thread: wrk then uses at most one of the two cores, and the
    # server (one process, one loop) the other.
    with tempfile.TemporaryDirectory() as folder:
        script = Path(folder) / "request.lua"
        script.write_text(_wrk_script(load))
        seconds = max(1, round(duration_s))  # wrk takes whole seconds only
        url = f"http://127.0.0.1:{load.port}{load.path}"
        command = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "-s", str(script), url]
        finished = run_measured(command, timeout_s=seconds + 60)
    return _parse_wrk(finished.stdout, finished.cpu_s)


def _wrk_script(load: Load) -> str:
    lines = [f'wrk.method = "{load.method}"']
    if load.body:
        lines.append(f"wrk.body = {_lua_string(load.body.decode())}")
    lines += [f"wrk.headers[{_lua_string(k)}] = {_lua_string(v)}" for k, v in load.headers.items()]
    return "\n".join(lines) + "\n"


def _lua_string(text: str) -> str:
    # Decimal escapes for anything but plain printable ASCII: always valid Lua.
    return '"' + "".join(_lua_char(byte) for byte in text.encode()) + '"'


def _lua_char(byte: int) -> str:
    char = chr(byte)
    return char if char.isprintable() and char not in '"\\' and byte < 128 else f"\\{byte:03d}"


def _parse_wrk(output: str, cpu_s: float) -> LoadResult:
    matched = WRK_REQUESTS.search(output)
    if matched is None:
        raise RuntimeError(f"cannot read wrk's output:\n{output}")
    requests = int(matched[1])
    elapsed_s = float(matched[2]) * TIME_UNITS_S[matched[3]]
    non_2xx = WRK_NON_2XX.search(output)
    errors = WRK_SOCKET_ERRORS.search(output)
    bad = int(non_2xx[1]) if non_2xx else 0
    bad += sum(int(count) for count in errors.groups()) if errors else 0
    return LoadResult("wrk", requests, elapsed_s, bad, loadgen_cpu_s=cpu_s)


# -- the Python fallback ------------------------------------------------------


async def generate(load: Load, duration_s: float, connections: int) -> LoadResult:
    request = encode_request(load.method, load.path, load.body, load.headers)
    statuses: collections.Counter[int] = collections.Counter()
    opened = [await Connection.open("127.0.0.1", load.port) for _ in range(connections)]
    started_s = time.perf_counter()
    deadline_s = started_s + duration_s
    failures = await asyncio.gather(
        *(_keep_busy(connection, request, deadline_s, statuses) for connection in opened)
    )
    elapsed_s = time.perf_counter() - started_s
    for connection in opened:
        await connection.close()
    requests = sum(statuses.values())
    bad = sum(count for status, count in statuses.items() if not 200 <= status < 300)
    return LoadResult("python", requests, elapsed_s, bad + sum(failures), dict(statuses))


async def _keep_busy(
    connection: Connection, request: bytes, deadline_s: float, statuses: collections.Counter[int]
) -> int:
    """Send until the deadline; the number of failed connections (0 or 1)."""
    try:
        while time.perf_counter() < deadline_s:
            statuses[(await connection.send(request)).status] += 1
    except (OSError, asyncio.IncompleteReadError):
        return 1
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description="Closed-loop HTTP load (wrk's stand-in).")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--method", default="GET")
    parser.add_argument("--path", required=True)
    parser.add_argument("--body", default="")
    parser.add_argument("--header", action="append", default=[])
    parser.add_argument("--duration", type=float, required=True)
    parser.add_argument("--connections", type=int, default=64)
    args = parser.parse_args()
    headers = dict(_split_header(line) for line in args.header)
    load = Load(args.port, args.method, args.path, args.body.encode(), headers)
    result = uvloop.run(generate(load, args.duration, args.connections))
    print(msgspec.json.encode(result).decode())


def _split_header(line: str) -> tuple[str, str]:
    name, _, value = line.partition(":")
    return name.strip(), value.strip()


if __name__ == "__main__":
    main()
