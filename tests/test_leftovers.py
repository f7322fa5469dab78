"""A killed run's vhost and throwaway node are removed by the next run; a live run's stay."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from yarl import URL

from tests.leftovers import (
    NODE_FOLDER_PREFIX,
    OWNER_FILE,
    VHOST_PREFIX,
    remove_dead_nodes,
    remove_dead_services,
    remove_dead_vhosts,
)
from tests.support import OWNER_ENV, rabbitmqctl


@pytest.fixture
def dead_pid() -> int:
    """The id of a process that has exited (and been reaped)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    """A process standing in for a leftover node's Erlang VM."""
    process = subprocess.Popen(["sleep", "300"])
    try:
        yield process
    finally:
        process.kill()
        process.wait()


def _vhosts() -> set[str]:
    return set(rabbitmqctl("list_vhosts", "name").split())


def test_a_dead_runs_vhost_goes_and_this_runs_stays(rabbitmq_url: str, dead_pid: int) -> None:
    ours = URL(rabbitmq_url).path.lstrip("/")
    theirs = f"{VHOST_PREFIX}{dead_pid}-0badc0de"
    rabbitmqctl("add_vhost", theirs)
    try:
        removed = remove_dead_vhosts()
        assert f"vhost {theirs}" in removed
        assert theirs not in _vhosts()
        assert ours in _vhosts()
    finally:
        if theirs in _vhosts():
            rabbitmqctl("delete_vhost", theirs)


def test_a_dead_runs_node_is_killed_and_its_folder_removed(
    dead_pid: int, sleeper: subprocess.Popen[bytes]
) -> None:
    dead = Path(tempfile.mkdtemp(prefix=f"{NODE_FOLDER_PREFIX}test-dead-"))
    (dead / OWNER_FILE).write_text(str(dead_pid))
    (dead / "node.pid").write_text(str(sleeper.pid))
    alive = Path(tempfile.mkdtemp(prefix=f"{NODE_FOLDER_PREFIX}test-alive-"))
    (alive / OWNER_FILE).write_text(str(sleeper.pid))  # its owner still runs
    try:
        removed = remove_dead_nodes()
        assert f"node folder {dead.name}" in removed
        assert not dead.exists()
        assert sleeper.wait(timeout=5) == -9
        assert alive.exists()
    finally:
        for folder in (dead, alive):
            subprocess.run(["rm", "-rf", str(folder)], check=True)


def test_a_dead_runs_service_process_is_killed_and_a_live_runs_is_not(dead_pid: int) -> None:
    def start(owner: int) -> subprocess.Popen[bytes]:
        return subprocess.Popen(["sleep", "300"], env=os.environ | {OWNER_ENV: str(owner)})

    orphan, ours = start(dead_pid), start(os.getpid())
    try:
        removed = remove_dead_services()
        assert f"service process {orphan.pid}" in removed
        assert orphan.wait(timeout=5) == -9
        assert ours.poll() is None
    finally:
        for process in (orphan, ours):
            process.kill()
            process.wait()
