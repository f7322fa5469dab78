"""The on-disk tier: what it keeps, and every kind of bad file it refuses to answer from."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

from service.disk import SCHEMA_VERSION, Corrupt, DiskStore, Identity, Position, Row

IDENTITY = Identity("predictions", "/")


def _filled(path: Path, rows: int = 2000) -> Path:
    database = path / "state.sqlite3"
    disk = DiskStore.open(database, IDENTITY)
    disk.write(
        [Row(f"id-{i:05d}", 1e9 + i, "input " * 20, result=f"r{i:05d}") for i in range(rows)],
        offset=41,
        body=b"last message",
    )
    disk.close()
    return database


def test_a_file_of_this_deployment_is_kept_with_its_checkpoint(tmp_path: Path) -> None:
    disk = DiskStore.open(_filled(tmp_path), IDENTITY)
    try:
        assert disk.rebuilt_because is None
        assert disk.checkpoint() == Position.of(41, b"last message")
        assert disk.count() == 2000
        row = disk.head("id-00007")
        assert isinstance(row, Row) and row.result == "r00007"
    finally:
        disk.close()


@pytest.mark.parametrize(
    ("identity", "why"),
    [
        (Identity("other", "/"), "namespace 'predictions' on vhost '/', not 'other' on '/'"),
        (Identity("predictions", "prod"), "not 'predictions' on 'prod'"),
        (Identity("predictions", "/", SCHEMA_VERSION + 1), f"schema version {SCHEMA_VERSION},"),
    ],
)
def test_another_deployments_file_is_rebuilt_empty(
    tmp_path: Path, identity: Identity, why: str
) -> None:
    disk = DiskStore.open(_filled(tmp_path), identity)
    try:
        assert disk.rebuilt_because is not None and why in disk.rebuilt_because
        assert disk.count() == 0
        assert disk.checkpoint() is None
    finally:
        disk.close()


def _truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def _garble_header(path: Path) -> None:
    with path.open("r+b") as file:
        file.write(b"not a database at all" * 10)


def _empty(path: Path) -> None:
    path.write_bytes(b"")


@pytest.mark.parametrize("damage", [_truncate, _garble_header, _empty])
def test_a_damaged_file_is_rebuilt_empty(tmp_path: Path, damage: object) -> None:
    database = _filled(tmp_path)
    assert callable(damage)
    damage(database)
    disk = DiskStore.open(database, IDENTITY)
    try:
        assert disk.rebuilt_because is not None
        assert disk.count() == 0 and disk.checkpoint() is None
    finally:
        disk.close()


def test_a_changed_value_fails_its_checksum_instead_of_being_served(tmp_path: Path) -> None:
    database = _filled(tmp_path)
    database.write_bytes(database.read_bytes().replace(b"r00007", b"r99999"))
    disk = DiskStore.open(database, IDENTITY)  # structurally sound: kept
    try:
        with pytest.raises(Corrupt):
            disk.head("id-00007")
        assert isinstance(disk.head("id-00008"), Row)
    finally:
        disk.close()


def test_pending_rows_are_listed_oldest_first_and_large_inputs_read_in_full(
    tmp_path: Path,
) -> None:
    disk = DiskStore.open(tmp_path / "state.sqlite3", IDENTITY)
    big = "x" * 200_000
    try:
        disk.write(
            [Row("b", 20.0, "in"), Row("a", 10.0, "in"), Row("big", 30.0, big, result="1")],
            offset=None,
            body=b"",
        )
        assert disk.pending(since_s=0) == [("a", 10.0, 0.0, 0, ""), ("b", 20.0, 0.0, 0, "")]
        assert disk.pending(since_s=15) == [("b", 20.0, 0.0, 0, "")]
        assert disk.head("big") is not None and not isinstance(disk.head("big"), Row)
        assert disk.read("big") == Row("big", 30.0, big, result="1", created_at_s=30.0)
        assert disk.delete_expired(before_s=25) == 2
        assert disk.count() == 1
    finally:
        disk.close()


def test_the_file_is_sqlite_in_wal_mode(tmp_path: Path) -> None:
    database = _filled(tmp_path)
    with sqlite3.connect(database) as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_issued_ids_are_found_by_their_exact_spelling_only(tmp_path: Path) -> None:
    issued = "0b1c2d3e-4f50-4a6b-8c7d-9e0f1a2b3c4d"  # str(uuid.uuid4()) form: keyed as 16 bytes
    disk = DiskStore.open(tmp_path / "state.sqlite3", IDENTITY)
    try:
        disk.write([Row(issued, 5.0, "in"), Row("not-a-uuid", 6.0, "in", result="1")], None, b"")
        assert disk.pending(since_s=0) == [(issued, 5.0, 0.0, 0, "")]
        assert isinstance(disk.head(issued), Row)
        assert disk.head(issued.upper()) is None  # another string: another prediction
        assert isinstance(disk.head("not-a-uuid"), Row)
    finally:
        disk.close()


def test_expired_rows_are_deleted_oldest_first_and_newer_ones_kept(tmp_path: Path) -> None:
    disk = DiskStore.open(tmp_path / "state.sqlite3", IDENTITY)
    try:
        disk.write([Row(f"old-{i}", float(i), "in", result="1") for i in range(12_000)], None, b"")
        disk.write([Row("new", 50_000.0, "in", result="1")], None, b"")
        # Created early, finished late: not expired, and the walk goes past it.
        disk.write([Row("old-5", 60_000.0, "in", result="1")], None, b"")
        assert disk.delete_expired(before_s=40_000.0) == 11_999
        assert disk.count() == 2
        assert isinstance(disk.head("old-5"), Row) and isinstance(disk.head("new"), Row)
    finally:
        disk.close()


def test_every_string_comes_back_exactly_nul_and_all(tmp_path: Path) -> None:
    # A NUL takes the per-row path (SQLite's JSON cuts strings at one); the rest go in bulk.
    controls = "".join(map(chr, range(1, 32)))
    texts = ["nul\x00inside", "emoji 😀 \U0001d518", "\u2028 ' \" \\", controls]
    rows = [
        Row(f"id-{i}", at_s, text, result=text, created_at_s=at_s)
        for i, text in enumerate(texts)
        for at_s in [1e9 + 0.123456789 * i]
    ]
    rows.append(Row("failed", 1e9, "in", error="boom\x00", created_at_s=1e9))
    disk = DiskStore.open(tmp_path / "state.sqlite3", IDENTITY)
    try:
        disk.write(rows, offset=3, body=b"m")
        for row in rows:
            assert disk.head(row.prediction_id) == row
            assert disk.read(row.prediction_id) == row
    finally:
        disk.close()
