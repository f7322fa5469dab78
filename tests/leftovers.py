"""What an earlier test run left behind when it was killed, and its removal.

A run stopped by SIGKILL runs no fixture teardown. Its vhost stays on the
shared broker; its throwaway RabbitMQ nodes keep running, since each has a
session of its own; so may the `python -m service` processes it started,
if only the run itself was killed. On a 2-core machine they slow the next
run until its broker calls time out. Each vhost, node folder and service
process therefore names the process of the run that made it; at the start
of a run, those whose run is gone are removed.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

from tests.support import OWNER_ENV, rabbitmqctl

VHOST_PREFIX = "test-run-"
NODE_FOLDER_PREFIX = "rabbitmq-"
OWNER_FILE = "owner.pid"
# test-run-<pid>-<hex>; a name without the pid comes from before this module.
_VHOST = re.compile(rf"{VHOST_PREFIX}(?:(\d+)-)?[0-9a-f]+")


def vhost_name(suffix: str) -> str:
    """A vhost name for this run: its process id, then `suffix`."""
    return f"{VHOST_PREFIX}{os.getpid()}-{suffix}"


def mark_owner(folder: Path) -> None:
    """Record this run as the owner of a throwaway node's folder."""
    (folder / OWNER_FILE).write_text(str(os.getpid()))


def remove_leftovers() -> list[str]:
    """Kill dead runs' services and nodes, delete their vhosts; say what went.

    The vhosts need `rabbitmqctl` and the broker: without them, the rest
    is still removed and the failure is said.
    """
    removed = remove_dead_services() + remove_dead_nodes()
    try:
        return removed + remove_dead_vhosts()
    except (OSError, subprocess.SubprocessError) as exc:
        return [*removed, f"(vhosts not looked at: {exc})"]


def remove_dead_services() -> list[str]:
    removed = []
    mark = f"{OWNER_ENV}=".encode()
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            variables = environ.read_bytes().split(b"\0")
        except OSError:  # gone, or not ours to read
            continue
        owner = next((v[len(mark) :] for v in variables if v.startswith(mark)), None)
        if owner is not None and owner.isdigit() and not _alive(int(owner)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(environ.parent.name), signal.SIGKILL)
                removed.append(f"service process {environ.parent.name}")
    return removed


def remove_dead_vhosts() -> list[str]:
    removed = []
    for vhost in rabbitmqctl("list_vhosts", "name").split():
        found = _VHOST.fullmatch(vhost)
        if found and not (found[1] and _alive(int(found[1]))):
            with contextlib.suppress(Exception):  # another run may be removing it too
                rabbitmqctl("delete_vhost", vhost)
                removed.append(f"vhost {vhost}")
    return removed


def remove_dead_nodes() -> list[str]:
    removed = []
    for folder in Path(tempfile.gettempdir()).glob(f"{NODE_FOLDER_PREFIX}*"):
        owner = _read_pid(folder / OWNER_FILE)
        if owner is None or _alive(owner):
            continue
        node_pid = _read_pid(folder / "node.pid")
        if node_pid is not None and _alive(node_pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(node_pid, signal.SIGKILL)
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(f"node folder {folder.name}")
    return removed


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    return True
