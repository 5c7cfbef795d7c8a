"""Looking at tasks never creates streams: ``open(create=False)`` refuses a prefix without streams, and
``open(create="on_enqueue")`` (``AsyncTasks(..., execution=False)``) creates them at the first enqueue."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import nats.js.errors
import pytest
from nats.js.manager import JetStreamManager

from lifecycle.asynctask import AsyncTasks, BackendError, NewTask, TaskState
from lifecycle.asynctask.nats import NatsBackend
from tests.asynctask.nats.nats_servers import delete_streams, streams_of

pytestmark = pytest.mark.nats


def _task(task_id: str) -> NewTask:
    now = time.time()
    return NewTask(task_id, "tests.job", "default", b"[]", 0, None, now, now + 3600)


@pytest.fixture
async def prefix(nats_url: str, unique_name: str) -> AsyncIterator[str]:
    """The test's prefix; its streams are deleted afterwards."""
    yield unique_name
    await delete_streams(nats_url, unique_name)


async def test_open_without_create_refuses_an_unused_prefix_and_creates_nothing(
    nats_url: str, prefix: str
) -> None:
    backend = NatsBackend(nats_url.replace("nats://", "nats://app:pw-in-url@", 1), prefix=prefix)
    backend.connect_timeout = 2.0
    with pytest.raises(BackendError) as caught:
        await backend.open(create=False)
    message = str(caught.value)
    if "cannot connect" in message:  # the shared server has no such user: try without credentials
        backend = NatsBackend(nats_url, prefix=prefix)
        with pytest.raises(BackendError) as caught:
            await backend.open(create=False)
        message = str(caught.value)
    assert f"no tasks under prefix {prefix!r}" in message
    assert "pw-in-url" not in message
    assert await streams_of(nats_url, prefix) == set()
    await backend.close()


async def test_open_without_create_uses_a_prefix_in_use(nats_url: str, prefix: str) -> None:
    writer = NatsBackend(nats_url, prefix=prefix)
    await writer.open()
    await writer.enqueue_many([_task("a")])
    await writer.close()
    reader = NatsBackend(nats_url, prefix=prefix)
    await reader.open(create=False)
    try:
        assert await reader.stats() == {"default": {TaskState.PENDING: 1}}
    finally:
        await reader.close()


async def test_on_enqueue_creates_nothing_until_the_first_enqueue(nats_url: str, prefix: str) -> None:
    backend = NatsBackend(nats_url, prefix=prefix)
    await backend.open(create="on_enqueue")
    try:
        assert await backend.get("nope") is None
        assert await backend.list_records() == []
        assert await backend.stats() == {}
        assert await backend.paused() == set()
        assert await backend.cancel(["nope"], now=time.time()) == []
        assert await backend.requeue(["nope"], now=time.time()) == 0
        assert await backend.requeue(None, now=time.time()) == 0
        assert await backend.purge(states=[TaskState.DEAD]) == 0
        assert await backend.settle([]) == set()
        assert await streams_of(nats_url, prefix) == set(), "looking created nothing"
        assert await backend.enqueue_many([_task("first")]) == ["first"]
        assert await streams_of(nats_url, prefix) == {f"{prefix}_tasks_log", f"{prefix}_tasks_snap"}
        record = await backend.get("first")
        assert record is not None
        assert record.state is TaskState.PENDING
    finally:
        await backend.close()


async def test_an_enqueue_only_async_tasks_creates_the_streams_at_its_first_enqueue(
    nats_url: str, prefix: str
) -> None:
    tasks = AsyncTasks(NatsBackend(nats_url, prefix=prefix), execution=False)

    @tasks.register(name="tests.job")
    async def job() -> None: ...

    await tasks.initialize()
    try:
        assert await streams_of(nats_url, prefix) == set()
        task_id = await tasks.enqueue(job)
        assert await streams_of(nats_url, prefix) == {f"{prefix}_tasks_log", f"{prefix}_tasks_snap"}
        info = await tasks.info(task_id)
        assert info is not None
        assert info.state is TaskState.PENDING
    finally:
        await tasks.cleanup()


async def test_a_worker_started_after_a_producer_sees_its_tasks(nats_url: str, prefix: str) -> None:
    producer = NatsBackend(nats_url, prefix=prefix)
    await producer.open(create="on_enqueue")
    worker = NatsBackend(nats_url, prefix=prefix)
    await worker.open()
    try:
        assert await producer.enqueue_many([_task("made-before")]) == ["made-before"]
        record = await worker.get("made-before")
        assert record is not None
        assert record.state is TaskState.PENDING
    finally:
        await producer.close()
        await worker.close()


async def test_a_store_creation_race_on_the_server_is_tried_again(
    nats_url: str, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """nats-server 2.9 answers "error creating store for stream" (10049) when another client deletes the
    account's last stream while this one creates a stream; the creation is tried again and succeeds."""
    real_add_stream = JetStreamManager.add_stream
    refused: list[str] = []

    async def add_stream_refused_once(self: JetStreamManager, config: Any = None, **params: Any) -> Any:
        if not refused:
            refused.append(config.name)
            raise nats.js.errors.ServerError(
                code=500, err_code=10049, description="error creating store for stream"
            )
        return await real_add_stream(self, config, **params)

    monkeypatch.setattr(JetStreamManager, "add_stream", add_stream_refused_once)
    backend = NatsBackend(nats_url, prefix=prefix)
    await backend.open()
    try:
        assert refused == [f"{prefix}_tasks_log"]
        await backend.enqueue_many([_task("a")])
        assert await backend.stats() == {"default": {TaskState.PENDING: 1}}
    finally:
        await backend.close()


async def test_a_store_the_server_cannot_create_is_one_clear_error(
    nats_url: str, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def add_stream_refused(self: JetStreamManager, config: Any = None, **params: Any) -> Any:
        raise nats.js.errors.ServerError(
            code=500, err_code=10049, description="error creating store for stream"
        )

    monkeypatch.setattr(JetStreamManager, "add_stream", add_stream_refused)
    backend = NatsBackend(nats_url, prefix=prefix)
    with pytest.raises(BackendError, match=r"cannot create the stream .*error creating store.*-sd directory"):
        await backend.open()
    await backend.close()
