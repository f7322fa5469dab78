"""Throwaway RabbitMQ nodes on this machine, apart from the shared broker on 5672.

A test that changes broker-wide state (the memory watermark blocks every
client of a broker) runs against a node of its own: its own node name,
AMQP and distribution ports, data, log and plugin files, and a config file
that names its port (the machine's /etc/rabbitmq config pins 5672). The
node drops to the `rabbitmq` user, so its folders belong to that user.

`launch()` starts a node without waiting for it, `Node.wait_accepting()`
waits until it answers AMQP, `Node.stop()` stops it and removes its
folders: a cluster fixture can launch several nodes, wait for them all,
then join them (`rabbitmqctl stop_app; join_cluster ...; start_app`).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.leftovers import NODE_FOLDER_PREFIX, mark_owner
from tests.support import free_port

RABBITMQ_USER = "rabbitmq"
START_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 30.0
CTL_TIMEOUT_S = 60.0
ALARM_TIMEOUT_S = 15.0
# What a broker sends first on a new connection: a Connection.Start method
# frame (type 1) on channel 0.
_AMQP_HEADER = b"AMQP\x00\x00\x09\x01"
_METHOD_FRAME_ON_CHANNEL_0 = b"\x01\x00\x00"


class NodeError(RuntimeError):
    """A throwaway node did not start or did not answer as expected."""


@dataclass
class Node:
    """One RabbitMQ node of its own: `.url` for clients, `.rabbitmqctl()` to operate it."""

    name: str
    port: int
    dist_port: int
    base: Path
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    @property
    def log_dir(self) -> Path:
        return self.base / "log"

    @property
    def pid_file(self) -> Path:
        return self.base / "node.pid"

    @property
    def output_path(self) -> Path:
        return self.base / "server.out"

    def rabbitmqctl(self, *args: str, timeout_s: float = CTL_TIMEOUT_S) -> str:
        """`rabbitmqctl -n NAME ARGS`: its standard output, or NodeError with what it said."""
        command = ["rabbitmqctl", "-q", "-n", self.name, *args]
        try:
            done = subprocess.run(
                command, check=False, capture_output=True, text=True, timeout=timeout_s
            )
        except subprocess.TimeoutExpired as exc:
            raise NodeError(f"{' '.join(command)} took over {timeout_s} s") from exc
        if done.returncode != 0:
            raise NodeError(
                f"{' '.join(command)} exited with {done.returncode}: "
                f"{(done.stderr or done.stdout).strip()}"
            )
        return done.stdout

    # -- life cycle --------------------------------------------------------------

    def env(self) -> dict[str, str]:
        """The environment `rabbitmq-server` and `rabbitmqctl` read for this node."""
        return os.environ | {
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.log_dir),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.base / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(self.base / "rabbitmq.conf"),
            # Not created: the machine's advanced.config stays out of it.
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.base / "advanced.config"),
            "RABBITMQ_PID_FILE": str(self.pid_file),
        }

    def start(self) -> None:
        """Start `rabbitmq-server` in the foreground of a process group of its own."""
        with self.output_path.open("ab") as output:
            self.process = subprocess.Popen(
                ["rabbitmq-server"],
                env=self.env(),
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait_accepting(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Return once the node answers an AMQP handshake and has booted, else NodeError."""
        deadline = time.monotonic() + timeout_s
        while not self._answers_amqp():
            if self.process is not None and (code := self.process.poll()) is not None:
                raise NodeError(
                    f"node {self.name} exited with {code} while starting\n{self.tail()}"
                )
            if time.monotonic() > deadline:
                raise NodeError(
                    f"node {self.name} did not accept AMQP on 127.0.0.1:{self.port} "
                    f"within {timeout_s} s\n{self.tail()}"
                )
            time.sleep(0.1)
        # The listener opens during the boot: wait for the boot to end too.
        remaining_s = max(1, int(deadline - time.monotonic()))
        try:
            self.rabbitmqctl("await_startup", "--timeout", str(remaining_s))
        except NodeError as exc:
            raise NodeError(f"{exc}\n{self.tail()}") from exc

    def _answers_amqp(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(_AMQP_HEADER)
                return sock.recv(3) == _METHOD_FRAME_ON_CHANNEL_0
        except OSError:
            return False

    def stop(self) -> None:
        """Stop the node (`rabbitmqctl stop`, then SIGKILL if need be); remove its folders."""
        try:
            if self.process is not None and self.process.poll() is None:
                with contextlib.suppress(NodeError):
                    self.rabbitmqctl("stop", timeout_s=STOP_TIMEOUT_S)
                try:
                    self.process.wait(timeout=STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    self._kill()
        finally:
            shutil.rmtree(self.base, ignore_errors=True)

    def _kill(self) -> None:
        assert self.process is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        with contextlib.suppress(OSError, ValueError):
            os.kill(int(self.pid_file.read_text().strip()), signal.SIGKILL)
        self.process.wait(timeout=STOP_TIMEOUT_S)

    def kill(self) -> None:
        """kill -9 the node, as a crash would; its data stays for `restart()`."""
        self._kill()

    def restart(self) -> None:
        """Start the node again on its data (after `kill()`), and wait until it has booted."""
        self.start()
        self.wait_accepting()

    def join(self, other: Node) -> None:
        """Make this (fresh) node a member of `other`'s cluster."""
        self.rabbitmqctl("stop_app")
        self.rabbitmqctl("join_cluster", other.name)
        self.rabbitmqctl("start_app")
        self.rabbitmqctl("await_startup")

    def tail(self, lines: int = 40) -> str:
        """The last lines of the node's output and log files, for a failure message."""
        paths = [self.output_path, *sorted(self.log_dir.glob("*.log"))]
        parts = []
        for path in paths:
            if path.exists():
                text = path.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- {path.name}\n" + "\n".join(text))
        return "\n".join(parts) or f"(no output or log in {self.base})"

    # -- broker-wide states --------------------------------------------------------

    @contextlib.contextmanager
    def memory_alarm(self) -> Iterator[None]:
        """The memory alarm on (it blocks every publisher of this node), then its old watermark.

        Returns once the node reports the alarm, and leaves once it reports
        it cleared.
        """
        found = self.rabbitmqctl(
            "eval", "vm_memory_monitor:get_vm_memory_high_watermark()."
        ).strip()
        # `0.4` (relative) or `{absolute,1073741824}`.
        absolute = re.fullmatch(r"\{absolute,(\d+)\}", found)
        restore = ["absolute", absolute[1]] if absolute else [found]
        self.rabbitmqctl("set_vm_memory_high_watermark", "absolute", "1")
        try:
            self._wait_memory_alarm(on=True)
            yield
        finally:
            self.rabbitmqctl("set_vm_memory_high_watermark", *restore)
            self._wait_memory_alarm(on=False)

    def _wait_memory_alarm(self, *, on: bool) -> None:
        deadline = time.monotonic() + ALARM_TIMEOUT_S
        while True:
            alarms = self.rabbitmqctl("eval", "rabbit_alarm:get_alarms().")
            if ("memory" in alarms) == on:
                return
            if time.monotonic() > deadline:
                raise NodeError(f"node {self.name}: memory alarm not {'on' if on else 'off'}")
            time.sleep(0.1)


def launch(prefix: str = "throwaway") -> Node:
    """A node started in the background, not yet waited for (see Node.wait_accepting)."""
    suffix = uuid.uuid4().hex[:8]
    base = Path(tempfile.mkdtemp(prefix=f"{NODE_FOLDER_PREFIX}{prefix}-{suffix}-"))
    node = Node(
        name=f"{prefix}-{suffix}@localhost", port=free_port(), dist_port=free_port(), base=base
    )
    try:
        mark_owner(base)  # a run killed before stop() leaves it running (tests/leftovers.py)
        _prepare(node)
        node.start()
    except BaseException:
        shutil.rmtree(base, ignore_errors=True)
        raise
    return node


def _prepare(node: Node) -> None:
    (node.base / "mnesia").mkdir()
    node.log_dir.mkdir()
    (node.base / "enabled_plugins").write_text("[].\n")
    (node.base / "rabbitmq.conf").write_text(f"listeners.tcp.local = 127.0.0.1:{node.port}\n")
    # The node drops to the rabbitmq user: it writes its data, logs and pid file here.
    for path in [node.base, *node.base.rglob("*")]:
        shutil.chown(path, RABBITMQ_USER, RABBITMQ_USER)


@contextlib.contextmanager
def throwaway_cluster(size: int = 3, prefix: str = "cluster") -> Iterator[list[Node]]:
    """`size` fresh nodes joined in one cluster, stopped and removed on exit.

    They share the Erlang cookie of the `rabbitmq` user they run as. Started
    together, then joined to the first one by one (~20-30 s for three).
    """
    nodes: list[Node] = []
    try:
        for _ in range(size):
            nodes.append(launch(prefix))
        for node in nodes:
            node.wait_accepting()
        for node in nodes[1:]:
            node.join(nodes[0])
        _wait_all_running(nodes)
        yield nodes
    finally:
        for node in reversed(nodes):
            node.stop()


def _wait_all_running(nodes: list[Node]) -> None:
    """Until every node sees them all running: a queue declared sooner gets fewer members."""
    deadline = time.monotonic() + START_TIMEOUT_S
    for node in nodes:
        while node.rabbitmqctl("eval", "length(rabbit_nodes:all_running()).").strip() != str(
            len(nodes)
        ):
            if time.monotonic() > deadline:
                raise NodeError(f"node {node.name} does not see {len(nodes)} nodes running")
            time.sleep(0.2)


@contextlib.contextmanager
def throwaway_node(prefix: str = "throwaway") -> Iterator[Node]:
    """A fresh node that accepts AMQP connections, stopped and removed on exit."""
    node = launch(prefix)
    try:
        node.wait_accepting()
        yield node
    finally:
        node.stop()
