"""STATE_DIR: created, locked against a second replica, refused with one line if unusable."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from service.settings import ConfigError
from service.statedir import StateDir


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


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only directories")
def test_a_read_only_directory_is_refused(tmp_path: Path) -> None:
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(ConfigError, match="is not writable: Permission denied"):
            StateDir.acquire(str(tmp_path))
    finally:
        tmp_path.chmod(0o700)
