"""STATE_DIR: the directory one replica keeps its on-disk state in.

Unset, it is a temporary directory removed when the app stops, so every
start replays the event stream from its beginning. Set to a directory that
survives restarts (a volume), a restart resumes where the last run left
off. Either way the directory is locked while a replica uses it: two live
replicas writing one SQLite file would each resume from the other's
offset, so the second one is refused at start.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
import time
from pathlib import Path

from service.settings import ConfigError

LOCK_FILE = "lock"
DATABASE_FILE = "state.sqlite3"
TEMPORARY_PREFIX = "prediction-service-state-"
# A temporary directory not locked yet may be one another replica is
# creating this instant; past this age, an unlocked one is a leftover.
UNLOCKED_GRACE_S = 60


class StateDir:
    def __init__(self, path: Path, *, temporary: bool, lock_fd: int) -> None:
        self.path = path
        self.temporary = temporary
        self._lock_fd: int | None = lock_fd

    @property
    def database(self) -> Path:
        return self.path / DATABASE_FILE

    @classmethod
    def acquire(cls, setting: str) -> StateDir:
        """Create (if needed) and lock the directory; ConfigError in one line if unusable."""
        if not setting:
            _remove_abandoned_temporaries()
            path = Path(tempfile.mkdtemp(prefix=TEMPORARY_PREFIX))
            return cls(path, temporary=True, lock_fd=_lock(path, setting))
        path = Path(setting)
        if path.exists() and not path.is_dir():
            raise ConfigError(f"STATE_DIR={setting!r} is not a directory")
        try:
            path.mkdir(parents=True, exist_ok=True)
            _check_writable(path)
        except OSError as exc:
            raise ConfigError(f"STATE_DIR={setting!r} is not writable: {_reason(exc)}") from None
        return cls(path, temporary=False, lock_fd=_lock(path, setting))

    def release(self) -> None:
        """Unlock, and remove the directory if it was a temporary one."""
        if self._lock_fd is None:
            return
        with contextlib.suppress(OSError):
            os.close(self._lock_fd)  # closing drops the flock
        self._lock_fd = None
        if self.temporary:
            shutil.rmtree(self.path, ignore_errors=True)


def _remove_abandoned_temporaries() -> None:
    """Remove the temporary directories of replicas that died without removing them.

    A replica killed (kill -9, the OOM killer) leaves its directory behind,
    a copy of the whole stream; restarted in the same container, again and
    again, those would fill the disk. A directory whose lock nobody holds
    is nobody's.
    """
    for path in Path(tempfile.gettempdir()).glob(f"{TEMPORARY_PREFIX}*"):
        with contextlib.suppress(OSError):
            if path.is_dir() and _abandoned(path):
                shutil.rmtree(path, ignore_errors=True)


def _abandoned(path: Path) -> bool:
    if time.time() - path.stat().st_mtime < UNLOCKED_GRACE_S:
        return False  # maybe being created, not locked yet
    try:
        fd = os.open(path / LOCK_FILE, os.O_RDWR)
    except FileNotFoundError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False  # a live replica's
    finally:
        os.close(fd)  # and with it the lock just taken, if taken
    return True


def _check_writable(path: Path) -> None:
    # A probe file, not os.access: root passes access() on a read-only mount,
    # and SQLite needs to create its -wal and -shm files beside the database.
    probe = path / f".probe-{os.getpid()}"
    probe.write_bytes(b"")
    probe.unlink()
    database = path / DATABASE_FILE
    if database.exists():
        with database.open("r+b"):
            pass


def _lock(path: Path, setting: str) -> int:
    try:
        fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise ConfigError(f"STATE_DIR={setting!r} is not writable: {_reason(exc)}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise ConfigError(
            f"STATE_DIR={setting!r} is in use by another running replica (pid {holder}); "
            "give each replica a directory of its own"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)
