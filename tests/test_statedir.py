"""STATE_DIR: created, locked against a second replica, refused with one line if unusable."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from service.settings import ConfigError
from service.statedir import (
    DATABASE_FILE,
    LOCK_FILE,
    TEMPORARY_PREFIX,
    UNLOCKED_GRACE_S,
    StateDir,
)


def test_unset_is_a_temporary_directory_removed_on_release() -> None:
    state = StateDir.acquire("")
    assert state.temporary and state.path.is_dir()
    state.release()
    assert not state.path.exists()


def test_a_given_directory_is_created_and_kept(tmp_path: Path) -> None:
    state = StateDir.acquire(str(tmp_path / "a" / "b"))
    state.release()
    assert (tmp_path / "a" / "b").is_dir()


def test_a_second_replica_on_the_same_directory_is_refused(tmp_path: Path) -> None:
    first = StateDir.acquire(str(tmp_path))
    try:
        with pytest.raises(ConfigError, match=r"in use by another running replica \(pid \d+\)"):
            StateDir.acquire(str(tmp_path))
    finally:
        first.release()
    StateDir.acquire(str(tmp_path)).release()  # free again once released


def test_a_path_under_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match=r"^STATE_DIR='.*/file/state' is not writable: "):
        StateDir.acquire(str(tmp_path / "file" / "state"))


def test_a_file_is_refused_as_not_a_directory(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match=r"^STATE_DIR='.*/file' is not a directory$"):
        StateDir.acquire(str(tmp_path / "file"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only directories")
def test_a_read_only_directory_is_refused(tmp_path: Path) -> None:
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(ConfigError, match="is not writable: Permission denied"):
            StateDir.acquire(str(tmp_path))
    finally:
        tmp_path.chmod(0o700)


def test_temporary_directories_of_dead_replicas_are_removed_at_start() -> None:
    old_s = time.time() - 2 * UNLOCKED_GRACE_S
    dead = Path(tempfile.mkdtemp(prefix=TEMPORARY_PREFIX))
    (dead / LOCK_FILE).write_text("12345\n")  # its replica was killed: nobody holds it
    (dead / DATABASE_FILE).write_bytes(b"x" * 1000)
    live = StateDir.acquire("")  # a replica still running
    fresh = Path(tempfile.mkdtemp(prefix=TEMPORARY_PREFIX))  # being created: no lock yet
    for path in (dead, live.path):
        os.utime(path, (old_s, old_s))
    try:
        started = StateDir.acquire("")
        try:
            assert not dead.exists()
            assert live.path.exists() and fresh.exists()
        finally:
            started.release()
    finally:
        live.release()
        shutil.rmtree(fresh, ignore_errors=True)
        shutil.rmtree(dead, ignore_errors=True)
