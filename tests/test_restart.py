"""STATE_DIR: a restart resumes from its checkpoint; bad state is rebuilt, never served.

Real `python -m service` processes against the live broker, as an operator
runs them: restarted on the same directory, started on an empty one, on a
damaged one, on another deployment's, on one whose stream has moved on.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import sys
import time
from collections.abc import Callable
from pathlib import Path

import anyio
import httpx
import msgspec
import pytest

from service.schemas import Marker, envelope_decoder
from service.settings import Settings
from service.statedir import DATABASE_FILE
from tests.support import (
    REPO,
    ServiceProcess,
    delete_namespace,
    free_port,
    metric,
    publish_padding,
    settings_env,
    settings_for_test,
    submit_async,
    wait_finished,
)

Answers = dict[str, tuple[str, str]]  # prediction id -> (input, result)


def _settings(rabbitmq_url: str, state_dir: Path, **changes: object) -> Settings:
    return settings_for_test(rabbitmq_url, state_dir=str(state_dir), **changes)


async def _predict(service: ServiceProcess, count: int) -> Answers:
    async with httpx.AsyncClient(base_url=service.base_url, timeout=30) as client:
        inputs = [f"kept {i}" for i in range(count)]
        ids = await asyncio.gather(*(submit_async(client, text) for text in inputs))
        answers: Answers = {}
        for prediction_id, text in zip(ids, inputs, strict=True):
            response = await wait_finished(client, prediction_id)
            assert response.status_code == 200, response.text
            answers[prediction_id] = (text, response.json()["output"]["result"])
    return answers


async def _assert_answers(service: ServiceProcess, expected: Answers) -> None:
    async with httpx.AsyncClient(base_url=service.base_url, timeout=30) as client:
        for prediction_id, (text, result) in expected.items():
            response = await client.get(f"/predict/{prediction_id}")
            assert response.status_code == 200, response.text
            assert response.json()["output"] == {"input": text, "result": result}


async def _events_read(service: ServiceProcess) -> float:
    async with httpx.AsyncClient(base_url=service.base_url) as client:
        return await metric(client, "event_stream_events_total")


async def _run_and_stop(settings: Settings, count: int) -> Answers:
    service = ServiceProcess(settings)
    await service.start()
    try:
        return await _predict(service, count)
    finally:
        await service.stop()


async def test_a_restart_resumes_from_its_checkpoint_instead_of_replaying(
    rabbitmq_url: str, tmp_path: Path
) -> None:
    settings = _settings(rabbitmq_url, tmp_path / "state")
    answers = await _run_and_stop(settings, 40)
    service = ServiceProcess(settings)
    started_s = time.perf_counter()
    await service.start()
    try:
        assert time.perf_counter() - started_s < 10
        # Only its own catch-up marker came after the checkpoint: no replay.
        assert await _events_read(service) <= 2
        await _assert_answers(service, answers)
        async with httpx.AsyncClient(base_url=service.base_url) as client:
            assert await metric(client, "results_disk_entries") == 40
            assert await metric(client, "results_cold_reads_total") == 40
    finally:
        await service.stop()


async def test_a_replica_with_an_empty_state_dir_replays_the_stream(
    rabbitmq_url: str, tmp_path: Path
) -> None:
    settings = _settings(rabbitmq_url, tmp_path / "first")
    answers = await _run_and_stop(settings, 30)
    fresh = ServiceProcess(settings.with_changes(state_dir=str(tmp_path / "new")))
    await fresh.start()
    try:
        assert await _events_read(fresh) >= 2 * len(answers)  # accepted and done, each
        await _assert_answers(fresh, answers)
    finally:
        await fresh.stop()


def _garble(database: Path) -> None:
    with database.open("r+b") as file:
        file.write(b"this is not a database" * 50)


def _truncate(database: Path) -> None:
    os.truncate(database, database.stat().st_size // 2)


def _identity_edit(**changes: object) -> Callable[[Path], None]:
    def edit(database: Path) -> None:
        with sqlite3.connect(database) as connection:
            (raw,) = connection.execute("SELECT value FROM meta WHERE key = 'identity'").fetchone()
            identity = json.loads(raw) | changes
            connection.execute(
                "UPDATE meta SET value = ? WHERE key = 'identity'",
                (json.dumps(identity).encode(),),
            )
        connection.close()

    return edit


@pytest.mark.parametrize(
    ("damage", "why"),
    [
        (_garble, "not a readable state file"),
        (_truncate, "not a readable state file"),
        (_identity_edit(namespace="another"), "holds namespace 'another'"),
        (_identity_edit(vhost="another"), "on vhost 'another'"),
        (_identity_edit(schema=0), "schema version 0"),
    ],
    ids=["corrupt", "truncated", "other-namespace", "other-vhost", "older-schema"],
)
async def test_unusable_state_is_rebuilt_from_the_stream(
    rabbitmq_url: str, tmp_path: Path, damage: Callable[[Path], None], why: str
) -> None:
    settings = _settings(rabbitmq_url, tmp_path / "state")
    answers = await _run_and_stop(settings, 20)
    damage(tmp_path / "state" / DATABASE_FILE)
    service = ServiceProcess(settings)
    await service.start()
    try:
        assert "was not usable" in service.log() and why in service.log()
        assert await _events_read(service) >= 2 * len(answers)
        await _assert_answers(service, answers)
    finally:
        await service.stop()


async def test_another_deployments_state_is_never_served(rabbitmq_url: str, tmp_path: Path) -> None:
    state_dir = tmp_path / "shared"
    theirs = _settings(rabbitmq_url, state_dir)
    their_answers = await _run_and_stop(theirs, 5)
    ours = ServiceProcess(_settings(rabbitmq_url, state_dir))  # another namespace
    await ours.start()
    try:
        assert f"holds namespace {theirs.broker_namespace!r}" in ours.log()
        async with httpx.AsyncClient(base_url=ours.base_url) as client:
            for prediction_id in their_answers:
                response = await client.get(f"/predict/{prediction_id}")
                assert response.status_code == 404
    finally:
        await ours.stop()
        await delete_namespace(theirs)


async def test_a_stream_declared_anew_since_the_checkpoint_is_replayed_from_its_start(
    rabbitmq_url: str, tmp_path: Path
) -> None:
    settings = _settings(rabbitmq_url, tmp_path / "state")
    answers = await _run_and_stop(settings, 10)
    await delete_namespace(settings)  # the stream the state was built from is gone
    service = ServiceProcess(settings)
    await service.start()
    try:
        assert "no longer holds the message the local state ends at" in service.log()
        async with httpx.AsyncClient(base_url=service.base_url) as client:
            for prediction_id in answers:  # what the old stream said is not answered
                assert (await client.get(f"/predict/{prediction_id}")).status_code == 404
            assert await metric(client, "results_disk_entries") == 0
        assert (await _predict(service, 3)).keys()  # and it works on the new stream
    finally:
        await service.stop()


@pytest.mark.parametrize("new_stream", ["shorter", "longer"])
async def test_a_state_from_a_deleted_stream_is_never_served_even_while_starting(
    rabbitmq_url: str, tmp_path: Path, new_stream: str
) -> None:
    # Between the start and the check of the stream, the state on disk may
    # belong to a stream deleted since: it must not answer, nor come back
    # into memory through a read racing the rebuild.
    settings = _settings(rabbitmq_url, tmp_path / "state")
    answers = await _run_and_stop(settings, 3)
    await delete_namespace(settings)
    if new_stream == "longer":  # the new stream passes the old offset
        await _run_and_stop(settings.with_changes(state_dir=""), 20)
    service = ServiceProcess(settings)
    await service.start(wait_ready=False)
    statuses: list[int] = []
    try:
        async with httpx.AsyncClient(base_url=service.base_url, timeout=5) as client:
            with anyio.fail_after(30):
                while not await _ready(client):
                    statuses += await _get_all(client, answers)
            statuses += await _get_all(client, answers)
            assert await metric(client, "results_memory_entries") <= 20
    finally:
        await service.stop()
    assert 200 not in statuses
    assert statuses[-len(answers) :] == [404] * len(answers)


async def _ready(client: httpx.AsyncClient) -> bool:
    try:
        return (await client.get("/readyz")).status_code == 200
    except httpx.TransportError:
        return False


async def _get_all(client: httpx.AsyncClient, answers: Answers) -> list[int]:
    statuses = []
    for prediction_id in answers:
        try:
            statuses.append((await client.get(f"/predict/{prediction_id}")).status_code)
        except httpx.TransportError:
            await asyncio.sleep(0.01)  # not listening yet
    return statuses


async def test_a_checkpoint_that_retention_deleted_is_replayed_from_the_start(
    rabbitmq_url: str, tmp_path: Path
) -> None:
    # Retention deletes whole segments (8 MB) once older than RESULT_TTL_S,
    # when a newer segment is rolled.
    settings = _settings(rabbitmq_url, tmp_path / "state", result_ttl_s=2)
    await _run_and_stop(settings, 5)
    await publish_padding(settings, megabytes=10)  # fills the checkpoint's segment
    await asyncio.sleep(2.5)  # which then grows older than the retention
    await publish_padding(settings, megabytes=10)  # a new segment: retention deletes it
    service = ServiceProcess(settings)
    await service.start()
    try:
        assert "no longer holds the message the local state ends at" in service.log()
        assert "retention deleted it" in service.log()
    finally:
        await service.stop()


async def test_two_live_replicas_on_one_state_dir_are_refused(
    rabbitmq_url: str, tmp_path: Path
) -> None:
    settings = _settings(rabbitmq_url, tmp_path / "state")
    first = ServiceProcess(settings)
    await first.start()
    second = ServiceProcess(settings.with_changes(port=free_port()))
    try:
        await second.start(wait_ready=False)
        assert await second.wait_exit(timeout_s=20) == 1
        [line] = [line for line in second.log().splitlines() if line.startswith("error:")]
        assert "is in use by another running replica" in line
        assert first.process is not None and first.process.poll() is None
    finally:
        await first.stop()


async def test_an_unwritable_state_dir_stops_the_start_with_one_line(
    rabbitmq_url: str, tmp_path: Path
) -> None:
    (tmp_path / "a-file").write_text("")
    settings = _settings(rabbitmq_url, tmp_path / "a-file" / "state")
    with anyio.fail_after(20):
        done = await anyio.run_process(
            [sys.executable, "-m", "service"], env=settings_env(settings), cwd=REPO, check=False
        )
    assert done.returncode == 1
    stderr = done.stderr.decode()
    assert stderr.startswith(f"error: STATE_DIR='{tmp_path}/a-file/state' is not writable: ")
    assert stderr.count("\n") == 1 and "Traceback" not in stderr


async def test_a_replica_killed_with_9_resumes_from_its_last_commit(
    rabbitmq_url: str, tmp_path: Path
) -> None:
    # Killed instead of stopped, a replica resumes from its last commit and
    # reads the rest from the stream: nothing is lost.
    settings = _settings(rabbitmq_url, tmp_path / "state")
    service = ServiceProcess(settings)
    await service.start()
    answers = await _predict(service, 30)
    service.signal(signal.SIGKILL)
    await service.wait_exit()
    await service.start()
    try:
        await _assert_answers(service, answers)
    finally:
        await service.stop()


def test_padding_markers_are_valid_events() -> None:
    # The retention test relies on markers with a field the decoder ignores.
    body = msgspec.json.encode({"kind": "marker", "marker_id": "m", "pad": "x", "at_s": 1.0})
    assert envelope_decoder.decode(body) == Marker("m", 1.0)
