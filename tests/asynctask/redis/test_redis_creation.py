"""Looking at tasks never writes a key: ``open(create=False)`` refuses a prefix no backend has used, and
``open(create="on_enqueue")`` (``AsyncTasks(..., execution=False)``) writes nothing until the first enqueue.
Each test checks afterwards that its prefix holds exactly the keys it expects (none, for a refusal)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest

from lifecycle.asynctask import AsyncTasks, BackendError, NewTask, TaskState
from lifecycle.asynctask.redis import RedisBackend
from tests.asynctask.redis.redis_servers import delete_prefix, keys_of

pytestmark = [pytest.mark.anyio, pytest.mark.redis]


def _task(task_id: str) -> NewTask:
    now = time.time()
    return NewTask(task_id, "tests.job", "default", b"[]", 0, None, now, now + 3600)


@pytest.fixture
async def prefix(redis_url: str, unique_name: str) -> AsyncIterator[str]:
    """The test's prefix; its keys are deleted afterwards."""
    yield unique_name
    await delete_prefix(redis_url, unique_name)


async def test_open_without_create_refuses_an_unused_prefix_and_writes_nothing(
    redis_url: str, prefix: str
) -> None:
    url = redis_url.replace("redis://", "redis://:pw-in-url@", 1) if "@" not in redis_url else redis_url
    backend = RedisBackend(url, prefix=prefix)
    with pytest.raises(BackendError) as caught:
        await backend.open(create=False)
    message = str(caught.value)
    assert f"no tasks under prefix {prefix!r}" in message
    assert "pw-in-url" not in message
    assert await keys_of(redis_url, prefix) == set()
    await backend.close()


async def test_open_without_create_uses_a_prefix_in_use(redis_url: str, prefix: str) -> None:
    writer = RedisBackend(redis_url, prefix=prefix)
    await writer.open()
    await writer.enqueue_many([_task("a")])
    await writer.close()
    reader = RedisBackend(redis_url, prefix=prefix)
    await reader.open(create=False)
    try:
        assert await reader.stats() == {"default": {TaskState.PENDING: 1}}
    finally:
        await reader.close()


async def test_on_enqueue_writes_nothing_until_the_first_enqueue(redis_url: str, prefix: str) -> None:
    backend = RedisBackend(redis_url, prefix=prefix)
    await backend.open(create="on_enqueue")
    try:
        assert await backend.get("nope") is None
        assert await backend.list_records() == []
        assert await backend.stats() == {}
        assert await backend.cancel(["nope"], now=time.time()) == []
        assert await backend.requeue(["nope"], now=time.time()) == 0
        assert await backend.requeue(None, now=time.time()) == 0
        assert await backend.purge(states=[TaskState.DEAD]) == 0
        assert await keys_of(redis_url, prefix) == set()

        assert await backend.enqueue_many([_task("a")]) == ["a"]
        assert f"{{{prefix}}}:layout".encode() in await keys_of(redis_url, prefix)
    finally:
        await backend.close()
    # The prefix is now in use: a strict open finds it.
    strict = RedisBackend(redis_url, prefix=prefix)
    await strict.open(create=False)
    try:
        assert await strict.stats() == {"default": {TaskState.PENDING: 1}}
    finally:
        await strict.close()


async def test_an_enqueue_only_asynctasks_inspects_without_writing_a_key(redis_url: str, prefix: str) -> None:
    tasks = AsyncTasks(RedisBackend(redis_url, prefix=prefix), execution=False)

    @tasks.register(name="tests.job")
    async def job() -> None: ...

    async with tasks:
        assert await tasks.stats() == {}
        assert await tasks.list() == []
        assert await tasks.info("nope") is None
        assert await keys_of(redis_url, prefix) == set()
        task_id = await tasks.enqueue(job)
        info = await tasks.info(task_id)
        assert info is not None
        assert info.state is TaskState.PENDING
