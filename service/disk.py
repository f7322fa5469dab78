"""The on-disk tier: a checkpointed SQLite cache of the event stream.

The broker's stream stays the source of truth; this file is what a
replica has made of it, with the stream position it reflects written in
the same transaction (the state-store pattern of Kafka Streams), so a
restart resumes from that position instead of replaying everything.

Why SQLite and not lmdb (measured here, 100k small rows and 600 x 1 MB):
lmdb's reads are ~10x faster (1.3 us against ~10 us a small row), but
they go through an mmap, and reading 600 MB through it raised the
process's RSS by 581 MiB; SQLite reads into a bounded page cache (+4 MiB),
and a bounded RSS is the point of this tier.

Threads: the event loop reads small rows itself (one indexed lookup, about
10-20 us; the small columns come first in a row, so reading them never
walks a large input's overflow pages).

Writes are what a fresh replica's replay waits on, so they are shaped
for it (measured at 1M rows):

- Small rows go in as statements of a thousand over `json_each`, not
  through `executemany`: the latter releases and retakes the GIL around
  every row, and beside a busy event loop each handover costs context
  switches (1,952 us a row against a busy thread, 10.5 us this way).
  Large rows, whose copy dwarfs a handover, and rows holding a NUL
  (SQLite's JSON cuts a string at one) take the per-row path.
- The key is the only index (one on pending rows cost 15 % more per
  write; a restart scans for them instead, reading the rows' leaf pages
  and never their large inputs), and expired rows are found by walking
  rowids, which follow creation time from one commit to the next (within
  one, key order), instead of through an index.

Large inputs, every write and the start-up checks run in threads (see
service/store.py), each connection used by one thread at a time.
"""

from __future__ import annotations

import sqlite3
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import msgspec

SCHEMA_VERSION = 2  # 2: the lifecycle columns (started, attempts, canceled, token)
PAGE_BYTES = 4096  # at 1M rows, 16 KiB pages wrote 20 % slower (each commit rewrites index pages)
CACHE_KIB = 8192  # SQLite's page cache, per connection
WAL_PAGES = 10_000  # fold the WAL into the file every ~40 MB: fewer, larger checkpoints
# Inputs up to this size are read on the event loop; larger ones in a thread.
INLINE_INPUT_MAX_BYTES = 64 * 1024
SWEEP_CHUNK = 5000  # rows deleted per transaction, so no sweep holds the writer long
# Rows of up to BULK_ROW_MAX_BYTES go in as JSON, BULK_ROWS to a statement, so
# one statement's JSON stays a few MB: a commit of large inputs as one JSON
# text held it, and SQLite's parse of it, beside the budget (1 GB seen).
BULK_ROW_MAX_BYTES = 8 * 1024
BULK_ROWS = 1000

_SCHEMA = f"""
PRAGMA page_size={PAGE_BYTES};
PRAGMA journal_mode=WAL;
CREATE TABLE meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE predictions (
    id TEXT PRIMARY KEY,
    updated_at_s REAL NOT NULL,
    created_at_s REAL NOT NULL,  -- rowids follow it (a reused idempotency key aside)
    result TEXT,
    error TEXT,
    started_at_s REAL NOT NULL,  -- 0: no run began
    attempts INTEGER NOT NULL,
    canceled INTEGER NOT NULL,
    token TEXT NOT NULL,  -- a keyed submit's "nonce fingerprint"; an outcome keeps it
    input_bytes INTEGER NOT NULL,
    crc INTEGER NOT NULL,
    input TEXT NOT NULL
);
"""
_SMALL_COLUMNS = (
    "updated_at_s, result, error, created_at_s, started_at_s, attempts, canceled, token"
)
_HEAD = (
    f"SELECT {_SMALL_COLUMNS}, crc, CASE WHEN input_bytes <= ? THEN input END"
    " FROM predictions WHERE id = ?"
)
_FULL = f"SELECT {_SMALL_COLUMNS}, crc, input FROM predictions WHERE id = ?"
_COLUMNS = (
    "id, updated_at_s, created_at_s, result, error, started_at_s, attempts, canceled, token,"
    " input_bytes, crc, input"
)
_ON_CONFLICT = """
ON CONFLICT (id) DO UPDATE SET
    updated_at_s = excluded.updated_at_s, result = excluded.result, error = excluded.error,
    started_at_s = excluded.started_at_s, attempts = excluded.attempts,
    canceled = excluded.canceled, input_bytes = excluded.input_bytes, crc = excluded.crc,
    input = excluded.input, created_at_s = excluded.created_at_s,
    token = CASE WHEN excluded.token = '' THEN token ELSE excluded.token END
"""
_UPSERT = f"INSERT INTO predictions ({_COLUMNS}) VALUES ({', '.join('?' * 12)}) {_ON_CONFLICT}"
# Each row a JSON array of the parameters, in _COLUMNS order; the WHERE
# makes SQLite parse ON CONFLICT as the upsert's, not the join's.
_BULK_UPSERT = (
    f"INSERT INTO predictions ({_COLUMNS}) SELECT "
    + ", ".join(f"value->>{i}" for i in range(12))
    + f" FROM json_each(?) WHERE true {_ON_CONFLICT}"
)
# A run began: only a row still pending takes it (an outcome holds its own).
_PROGRESS = (
    "UPDATE predictions SET started_at_s = ?, attempts = ? WHERE id = ?"
    " AND result IS NULL AND error IS NULL AND NOT canceled"
)
_OLDEST = (
    "SELECT rowid, updated_at_s, created_at_s FROM predictions WHERE rowid > ?"
    f" ORDER BY rowid LIMIT {SWEEP_CHUNK}"
)


class Identity(msgspec.Struct, frozen=True):
    """Whose state a file holds: never answer from another deployment's."""

    namespace: str
    vhost: str
    schema: int = SCHEMA_VERSION


class Position(msgspec.Struct, frozen=True):
    """A message of the stream: its offset, and a fingerprint of its body.

    The fingerprint tells a resumed replica that the message at that
    offset is still the one it applied: not gone with retention, not a
    different message of a stream deleted and declared again.
    """

    offset: int
    crc: int
    length: int

    @classmethod
    def of(cls, offset: int, body: bytes) -> Position:
        return cls(offset, zlib.crc32(body), len(body))


class Row(msgspec.Struct, frozen=True, gc=False):
    """What the disk keeps of one prediction; pending until it has an outcome."""

    prediction_id: str
    updated_at_s: float
    input: str
    result: str | None = None
    error: str | None = None
    created_at_s: float = 0.0  # 0: updated_at_s (written once, by the first write)
    started_at_s: float = 0.0
    attempts: int = 0
    canceled: bool = False
    token: str = ""

    @property
    def finished(self) -> bool:
        return self.result is not None or self.error is not None or self.canceled


class Progress(msgspec.Struct, frozen=True, gc=False):
    """A run began for a pending prediction whose row may be on disk already."""

    prediction_id: str
    started_at_s: float
    attempts: int


class LargeInput(msgspec.Struct, frozen=True):
    """A finished row whose input is too large to read on the event loop."""


class Corrupt(Exception):
    """A row's checksum does not match its contents."""


Head = Row | LargeInput | None

_UTF8 = ("utf-8", "surrogatepass")
_meta_encoder = msgspec.json.Encoder()
_rows_encoder = msgspec.json.Encoder()
_fields_encoder = msgspec.json.Encoder()
_identity_decoder = msgspec.json.Decoder(Identity)
_position_decoder = msgspec.json.Decoder(Position)


class DiskStore:
    """One SQLite file, opened by `open` (in a thread: it may check a large file)."""

    def __init__(self, path: Path, rebuilt_because: str | None) -> None:
        self.path = path
        self.rebuilt_because = rebuilt_because
        self._loop_reader = _connect(path)
        self._thread_reader = _connect(path)
        self._writer = _connect(path)

    @classmethod
    def open(cls, path: Path, identity: Identity) -> DiskStore:
        """The store at `path`: kept if usable, else replaced by an empty one.

        `rebuilt_because` says why an existing file was not usable (corrupt,
        truncated, another namespace, vhost or schema version).
        """
        reason = _unusable(path, identity) if path.exists() else None
        if reason is not None:
            _remove(path)
        if not path.exists():
            _create(path, identity)
        return cls(path, reason)

    # -- reads ----------------------------------------------------------------

    def head(self, prediction_id: str) -> Head:
        """The row, on the event loop; `LargeInput` if its input must be read in a thread."""
        found = self._loop_reader.execute(_HEAD, (INLINE_INPUT_MAX_BYTES, prediction_id))
        row = found.fetchone()
        if row is None:
            return None
        *small, crc, text = row
        pending = _row(prediction_id, small, "")
        if not pending.finished:
            return pending  # its input is read only for a status (`read`)
        if text is None:
            return LargeInput()
        return _checked(_row(prediction_id, small, text), crc)

    def read(self, prediction_id: str) -> Row | None:
        """The whole row (in a thread: its input may be large)."""
        row = self._thread_reader.execute(_FULL, (prediction_id,)).fetchone()
        if row is None:
            return None
        *small, crc, text = row
        return _checked(_row(prediction_id, small, text), crc)

    def checkpoint(self) -> Position | None:
        """The last stream message whose events are all in this file."""
        row = self._writer.execute("SELECT value FROM meta WHERE key = 'position'").fetchone()
        return None if row is None else _position_decoder.decode(row[0])

    def pending(self, since_s: float) -> list[PendingRow]:
        """The predictions with no outcome, oldest first."""
        rows: list[PendingRow] = self._writer.execute(
            "SELECT id, updated_at_s, started_at_s, attempts, token FROM predictions"
            " WHERE result IS NULL AND error IS NULL AND NOT canceled AND updated_at_s >= ?",
            (since_s,),
        ).fetchall()
        rows.sort(key=lambda row: row[1])
        return rows

    def count(self) -> int:
        count: int = self._writer.execute("SELECT count(*) FROM predictions").fetchone()[0]
        return count

    # -- writes (the writer's thread) ----------------------------------------

    def write(
        self,
        rows: Iterable[Row],
        offset: int | None,
        body: bytes,
        progress: Iterable[Progress] = (),
    ) -> None:
        """Rows, runs begun, and the position they bring the file to, in one transaction."""
        bulk: list[Params] = []
        one_by_one: list[Params] = []
        for row in rows:
            params, fits_bulk = _as_params(row)
            (bulk if fits_bulk else one_by_one).append(params)
        # In key order, each page of the key's index is visited once a
        # commit: 42 % faster at 400k rows a commit (a replay's size).
        bulk.sort(key=_key)
        one_by_one.sort(key=_key)
        with self._writer:
            for start in range(0, len(bulk), BULK_ROWS):
                chunk = _rows_encoder.encode(bulk[start : start + BULK_ROWS])
                self._writer.execute(_BULK_UPSERT, (chunk,))
            if one_by_one:
                self._writer.executemany(_UPSERT, one_by_one)
            self._writer.executemany(
                _PROGRESS, ((p.started_at_s, p.attempts, p.prediction_id) for p in progress)
            )
            if offset is not None:
                position = Position.of(offset, body)
                self._writer.execute(
                    "INSERT OR REPLACE INTO meta VALUES ('position', ?)",
                    (_meta_encoder.encode(position),),
                )

    def delete_expired(self, before_s: float) -> int:
        """Delete rows last changed before `before_s`, a chunk per transaction.

        Walks from the oldest rowid and stops at a chunk whose last row was
        created after `before_s`: later commits hold later rows still (give
        or take the clocks of the replicas that wrote the events). Rows of
        that commit are in key order, so some may wait for the next sweep;
        reads check the TTL themselves.
        """
        deleted, after = 0, 0
        while True:
            chunk = self._writer.execute(_OLDEST, (after,)).fetchall()
            expired = [(rowid,) for rowid, updated_at_s, _ in chunk if updated_at_s < before_s]
            with self._writer:
                self._writer.executemany("DELETE FROM predictions WHERE rowid = ?", expired)
            deleted += len(expired)
            if len(chunk) < SWEEP_CHUNK or chunk[-1][2] >= before_s:
                return deleted
            after = chunk[-1][0]

    def wipe(self) -> None:
        """Forget everything: the stream is read again from its start."""
        with self._writer:
            self._writer.execute("DELETE FROM predictions")
            self._writer.execute("DELETE FROM meta WHERE key = 'position'")

    def close(self) -> None:
        for connection in (self._loop_reader, self._thread_reader):
            connection.close()
        # Fold the WAL into the file, so the next start opens one file.
        self._writer.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self._writer.close()


def _connect(path: Path) -> sqlite3.Connection:
    # check_same_thread=False: a connection is handed between the pool's
    # threads, though only ever used by one at a time (service/store.py).
    # The default isolation level: `with connection:` is one transaction, and
    # a SELECT opens none, so a reader never pins an old snapshot.
    connection = sqlite3.connect(path, check_same_thread=False)
    # NORMAL in WAL mode: a commit survives a crash of the process, and a
    # power cut loses at most the last commits, never the file's
    # consistency; the stream has whatever was lost.
    connection.executescript(
        f"PRAGMA synchronous=NORMAL; PRAGMA cache_size=-{CACHE_KIB};"
        f" PRAGMA wal_autocheckpoint={WAL_PAGES};"
    )
    return connection


def _create(path: Path, identity: Identity) -> None:
    connection = sqlite3.connect(path, isolation_level=None)
    try:
        connection.executescript(_SCHEMA)
        connection.execute(
            "INSERT INTO meta VALUES ('identity', ?)", (_meta_encoder.encode(identity),)
        )
    finally:
        connection.close()


def _unusable(path: Path, identity: Identity) -> str | None:
    """Why an existing file cannot be resumed from, or None if it can."""
    try:
        connection = sqlite3.connect(f"file:{path}?mode=rw", uri=True, isolation_level=None)
    except sqlite3.Error as exc:
        return f"it cannot be opened ({exc})"
    try:
        verdict = connection.execute("PRAGMA quick_check").fetchone()[0]
        if verdict != "ok":
            return f"it is damaged ({verdict})"
        row = connection.execute("SELECT value FROM meta WHERE key = 'identity'").fetchone()
    except sqlite3.Error as exc:
        return f"it is not a readable state file ({exc})"
    finally:
        connection.close()
    if row is None:
        return "it has no identity record"
    try:
        found = _identity_decoder.decode(row[0])
    except msgspec.DecodeError:
        return "its identity record is unreadable"
    return _mismatch(found, identity)


def _mismatch(found: Identity, expected: Identity) -> str | None:
    if found.schema != expected.schema:
        return f"it has schema version {found.schema}, this version uses {expected.schema}"
    if (found.namespace, found.vhost) != (expected.namespace, expected.vhost):
        return (
            f"it holds namespace {found.namespace!r} on vhost {found.vhost!r}, "
            f"not {expected.namespace!r} on {expected.vhost!r}"
        )
    return None


def _remove(path: Path) -> None:
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def _fields(row: Row) -> bytes:
    # The fields a client reads that a row keeps from its first write, as
    # JSON, so None and "" differ: a flipped byte anywhere changes the
    # checksum. (Not the times: a float may come back from SQLite's JSON
    # parsing an ulp away. Not attempts: a run beginning updates it alone.)
    return _fields_encoder.encode(
        (row.prediction_id, row.result, row.error, row.canceled, row.input)
    )


def _row(prediction_id: str, small: list[Any], text: str) -> Row:
    updated_at_s, result, error, created_at_s, started_at_s, attempts, canceled, token = small
    return Row(
        prediction_id,
        updated_at_s,
        text,
        result,
        error,
        created_at_s,
        started_at_s,
        attempts,
        bool(canceled),
        token,
    )


# id, accepted at, run started at, attempts, token
PendingRow = tuple[str, float, float, int, str]
Params = tuple[str, float, float, str | None, str | None, float, int, int, str, int, int, str]


def _as_params(row: Row) -> tuple[Params, bool]:
    """The row's parameters, and whether it may go in by the JSON statement.

    One pass of C calls per row: this runs in the writer thread, holding
    the GIL the event loop needs (at 1M rows, per-field Python here took
    4 s of the loop's time).
    """
    fields = _fields(row)
    text = row.input
    input_bytes = len(text) if text.isascii() else len(text.encode(*_UTF8))
    params = (
        row.prediction_id,
        row.updated_at_s,
        row.created_at_s or row.updated_at_s,
        row.result,
        row.error,
        row.started_at_s,
        row.attempts,
        int(row.canceled),
        row.token,
        input_bytes,
        zlib.crc32(fields),
        text,
    )
    # Small, and no NUL (SQLite's JSON functions cut a string at one; JSON
    # spells it \u0000, and a false alarm only takes the per-row path).
    return params, input_bytes <= BULK_ROW_MAX_BYTES and b"\\u0000" not in fields


def _key(params: Params) -> str:
    return params[0]


def _checked(row: Row, crc: int) -> Row:
    if zlib.crc32(_fields(row)) != crc:
        raise Corrupt(f"row {row.prediction_id!r} does not match its checksum")
    return row
