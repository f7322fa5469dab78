"""The processes under test and the load generators, as real OS processes.

Servers are started the way an operator starts them (`python -m service`
with settings in the environment) and observed from outside through
/proc: CPU seconds and resident memory. Load generators are run to
completion as children, so their CPU is exactly what `getrusage` reports
for reaped children.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import aio_pika

from service.broker import Names
from service.settings import Settings

REPO = Path(__file__).resolve().parent.parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # utime and stime are fields 14 and 15 of stat(5); the split drops the first two.
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


@contextlib.contextmanager
def cpu_shares(pids: Mapping[str, int]) -> Iterator[dict[str, float]]:
    """Each process's CPU over the `with` block, as a share of one core (filled on exit)."""
    shares: dict[str, float] = {}
    before = {name: process_cpu_s(pid) for name, pid in pids.items()}
    started_s = time.perf_counter()
    yield shares
    elapsed_s = time.perf_counter() - started_s
    for name, pid in pids.items():
        shares[name] = (process_cpu_s(pid) - before[name]) / elapsed_s


def broker_pid() -> int | None:
    """The local RabbitMQ's Erlang VM, whose CPU the async benchmarks also report."""
    for comm in Path("/proc").glob("[0-9]*/comm"):
        with contextlib.suppress(OSError):
            if comm.read_text().strip() == "beam.smp":
                return int(comm.parent.name)
    return None


@dataclass
class Server:
    name: str
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    def cpu_s(self) -> float:
        return process_cpu_s(self.process.pid)

    def rss_bytes(self) -> int:
        resident_pages = Path(f"/proc/{self.process.pid}/statm").read_text().split()[1]
        return int(resident_pages) * PAGE_BYTES

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def service_env(
    rabbitmq_url: str, namespace: str, port: int, settings: Mapping[str, object]
) -> dict[str, str]:
    """The environment of `python -m service` for one benchmark."""
    # The service as users run it: its defaults (the request log on), the
    # settings of the user's environment ignored, and only what a figure
    # needs changed, said on stderr.
    env = {key: value for key, value in os.environ.items() if key not in _SETTING_NAMES}
    env.update(
        RABBITMQ_URL=rabbitmq_url,
        BROKER_NAMESPACE=namespace,
        HOST="127.0.0.1",
        PORT=str(port),
    )
    overrides = {key.upper(): str(value) for key, value in settings.items()}
    print(f"    service settings changed from the defaults: {_said(overrides)}", file=sys.stderr)
    env.update(overrides)
    return env


_SETTING_NAMES = frozenset(name.upper() for name in Settings.__struct_fields__)


def _said(overrides: Mapping[str, str]) -> str:
    return " ".join(f"{key}={value}" for key, value in sorted(overrides.items())) or "none"


@contextlib.contextmanager
def running_service(
    rabbitmq_url: str, namespace: str, log_dir: Path, **settings: object
) -> Iterator[Server]:
    """`python -m service`, ready (GET /readyz is 200), stopped on exit."""
    with launched_service(rabbitmq_url, namespace, log_dir, **settings) as server:
        wait_http_ok(server, "/readyz")
        yield server


@contextlib.contextmanager
def launched_service(
    rabbitmq_url: str, namespace: str, log_dir: Path, **settings: object
) -> Iterator[Server]:
    """`python -m service`, just started (not ready yet), stopped on exit."""
    port = free_port()
    env = service_env(rabbitmq_url, namespace, port, settings)
    with _running("service", [sys.executable, "-m", "service"], port, log_dir, env) as server:
        yield server


@contextlib.contextmanager
def running_bare_app(get_body: bytes, log_dir: Path) -> Iterator[Server]:
    """The bare Starlette baseline, answering before it is yielded."""
    port = free_port()
    command = [sys.executable, "-m", "bench.bare_app", "--port", str(port)]
    command += ["--get-body", get_body.decode()]
    with _running("bare", command, port, log_dir, dict(os.environ)) as server:
        wait_http_ok(server, "/predict/ready")
        yield server


@contextlib.contextmanager
def _running(
    name: str, command: list[str], port: int, log_dir: Path, env: dict[str, str]
) -> Iterator[Server]:
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}-{port}.log"
    with log_path.open("ab") as log:
        process = subprocess.Popen(command, env=env, cwd=REPO, stdout=log, stderr=log)
    server = Server(name, process, port, log_path)
    try:
        yield server
    finally:
        server.stop()


def wait_http_ok(server: Server, path: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"{server.name} exited early:\n{server.log()}")
        with contextlib.suppress(OSError):
            if http_request(server.port, "GET", path)[0] == 200:
                return
        time.sleep(0.05)
    raise TimeoutError(f"{server.name} did not answer {path} in {timeout_s:g} s")


def http_request(
    port: int, method: str, path: str, body: bytes = b"", headers: Mapping[str, str] | None = None
) -> tuple[int, bytes]:
    """One request from the orchestrator (setup and checks, never load)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request(method, path, body=body, headers=dict(headers or {}))
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


@dataclass(frozen=True)
class Finished:
    stdout: str
    wall_s: float
    cpu_s: float


def run_measured(command: Sequence[str], timeout_s: float) -> Finished:
    """Run a load generator to completion and measure its CPU.

    Reaped children's rusage grows only when a child is waited for; the
    servers are reaped only when stopped, so between these two readings
    the one child reaped is this command.
    """
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started_s = time.perf_counter()
    done = subprocess.run(
        list(command), cwd=REPO, capture_output=True, text=True, timeout=timeout_s, check=False
    )
    wall_s = time.perf_counter() - started_s
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"{command[0]} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return Finished(done.stdout, wall_s, cpu_s)


def delete_namespace(rabbitmq_url: str, namespace: str, extra_queues: Sequence[str] = ()) -> None:
    """Remove the queues, stream and exchanges one benchmark declared."""
    asyncio.run(_delete_namespace(rabbitmq_url, Names.for_namespace(namespace), extra_queues))


async def _delete_namespace(rabbitmq_url: str, names: Names, extra_queues: Sequence[str]) -> None:
    connection = await aio_pika.connect(rabbitmq_url, timeout=5)
    async with connection:
        channel = await connection.channel()
        await names.delete(channel)
        for queue in extra_queues:
            await channel.queue_delete(queue)
