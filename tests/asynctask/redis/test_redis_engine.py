"""AsyncTasks runs end to end on RedisBackend: the public engine conformance suite, unchanged; and the paths
that only a backend that pushes has (cancellations and verdicts as pub/sub notices), with polling out of
the way."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

import anyio
import anyio.abc
import pytest
import redis.asyncio as aioredis

from lifecycle.asynctask import AsyncTasks, Call, Notice, TaskState
from lifecycle.asynctask.redis import RedisBackend
from lifecycle.asynctask.testing import EngineConformance

pytestmark = pytest.mark.redis


class TestRedisEngine(EngineConformance):
    """The engine's promises over Redis, under a fresh prefix per test."""

    @pytest.fixture
    def backend_factory(
        self, open_redis: Callable[..., Awaitable[RedisBackend]]
    ) -> Callable[[], Awaitable[RedisBackend]]:
        async def factory() -> RedisBackend:
            return await open_redis()

        return factory


async def _executing(tasks: AsyncTasks, group: anyio.abc.TaskGroup) -> anyio.CancelScope:
    scope = anyio.CancelScope()

    async def execute() -> None:
        with scope:
            await tasks.execute()

    group.start_soon(execute)
    return scope


async def _until_subscribed(url: str, channel: str) -> None:
    """Return once the server counts a subscriber of ``channel`` (it has no event to wait on: ask it)."""
    admin = aioredis.Redis.from_url(url)
    try:
        while dict(await admin.pubsub_numsub(channel)).get(channel.encode(), 0) < 1:
            await anyio.sleep(0.005)
    finally:
        await admin.aclose()


async def test_a_cancel_reaches_the_worker_through_notices(
    open_redis: Callable[..., Awaitable[RedisBackend]], redis_url: str, unique_name: str
) -> None:
    """The worker's store answers cancel_requests only for tasks whose "cancel" notice its backend already
    delivered: the request can reach the worker only as a pub/sub notice from the other AsyncTasks' backend
    (the worker then confirms it, as it does for every notice)."""
    worker_backend = await open_redis()
    delivered: set[str] = set()
    real_wait, real_requests = worker_backend.wait_for_notices, worker_backend.cancel_requests

    async def wait_for_notices(*, timeout: float) -> list[Notice]:
        notices = await real_wait(timeout=timeout)
        delivered.update(notice.task_id for notice in notices if notice.kind == "cancel")
        return notices

    async def cancel_requests(task_ids: Sequence[str]) -> set[str]:
        return await real_requests([task_id for task_id in task_ids if task_id in delivered])

    worker_backend.wait_for_notices = wait_for_notices  # type: ignore[method-assign]
    worker_backend.cancel_requests = cancel_requests  # type: ignore[method-assign]
    worker = AsyncTasks(worker_backend, concurrency=2)
    producer = AsyncTasks(await open_redis(), execution=False)
    started = anyio.Event()

    @worker.register(name="endless")
    async def endless() -> None:
        started.set()
        await anyio.sleep_forever()

    await worker.initialize()
    await producer.initialize()
    try:
        async with anyio.create_task_group() as group:
            scope = await _executing(worker, group)
            task_id = await producer.enqueue("endless")
            with anyio.fail_after(10):
                await started.wait()
                await _until_subscribed(redis_url, f"{{{unique_name}}}:notices")  # notices are best effort
            assert await producer.cancel(task_id) is True
            done = await producer.wait(task_id, timeout=10)
            assert (done.state, done.attempts) == (TaskState.CANCELLED, 1)
            assert task_id in delivered
            scope.cancel()
    finally:
        await producer.cleanup()
        await worker.cleanup()


async def test_wait_and_wait_group_in_another_asynctasks_are_woken_by_notices(
    open_redis: Callable[..., Awaitable[RedisBackend]],
) -> None:
    """The waiting AsyncTasks polls only every 3600 s, and the tasks finish only once it listens for notices:
    its wait() and wait_group() return because the worker's settlements are pushed to it."""
    waiter_backend = await open_redis()
    listening = anyio.Event()
    real_wait = waiter_backend.wait_for_notices

    async def wait_for_notices(*, timeout: float) -> list[Notice]:
        if timeout > 0:
            listening.set()
        return await real_wait(timeout=timeout)

    waiter_backend.wait_for_notices = wait_for_notices  # type: ignore[method-assign]
    worker = AsyncTasks(await open_redis(), concurrency=4)
    waiter = AsyncTasks(waiter_backend, execution=False, poll_interval=3600)

    @worker.register(name="gated")
    async def gated(n: int) -> int:
        await listening.wait()
        return n * 10

    await worker.initialize()
    await waiter.initialize()
    try:
        async with anyio.create_task_group() as group:
            scope = await _executing(worker, group)
            task_id = await waiter.enqueue("gated", 1)
            with anyio.fail_after(10):
                task = await waiter.wait(task_id, timeout=3600)
            assert (task.state, task.result) == (TaskState.SUCCEEDED, 10)
            listening = anyio.Event()
            group_id = await waiter.enqueue_group([Call("gated", 2), Call("gated", 3)])
            with anyio.fail_after(10):
                found = await waiter.wait_group(group_id, timeout=3600)
            assert (found.state, found.counts.get(TaskState.SUCCEEDED)) == (TaskState.SUCCEEDED, 2)
            scope.cancel()
    finally:
        await waiter.cleanup()
        await worker.cleanup()
