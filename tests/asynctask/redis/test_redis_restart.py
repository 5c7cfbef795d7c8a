"""A server restart mid-run: the worker reconnects, every task runs exactly once, every record survives.

The test runs its own redis-server (AOF with ``appendfsync always``), kills it with ``kill -9`` while a task
is running, other tasks are finishing and an enqueue is on its way, and starts it again on the same data.
"""

from __future__ import annotations

import logging
from collections import Counter

import anyio
import anyio.to_thread
import pytest

from lifecycle.asynctask import AsyncTasks, Call, TaskState
from lifecycle.asynctask.redis import RedisBackend
from tests.asynctask.redis.redis_servers import RedisServer

pytestmark = [pytest.mark.redis, pytest.mark.slow]

FIRST = 300
"""Tasks enqueued before the restart."""

LATER = 50
"""Tasks whose enqueue is sent while the server is down."""

GATE = 0
"""The task that is running when the server is killed (it waits until the server is back)."""


async def test_a_killed_and_restarted_server_loses_nothing_and_repeats_nothing(
    own_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="lifecycle.asynctask.redis")
    tasks = AsyncTasks(RedisBackend(own_redis.url, prefix="restart"), concurrency=8, poll_interval=5.0)
    runs: Counter[int] = Counter()
    gate_running = anyio.Event()
    server_back = anyio.Event()
    all_ran = anyio.Event()

    @tasks.register(name="restart.job")
    async def job(number: int) -> int:
        runs[number] += 1
        if number == GATE:
            gate_running.set()
            await server_back.wait()  # it finishes, and settles, only after the restart
        if len(runs) == FIRST + LATER:
            all_ran.set()
        return number * 2

    later_ids: list[str] = []

    async def enqueue_while_down() -> None:
        later_ids.extend(await tasks.enqueue_many([Call("restart.job", FIRST + n) for n in range(LATER)]))

    with anyio.fail_after(60):
        async with tasks:
            first_ids = await tasks.enqueue_many([Call("restart.job", n) for n in range(FIRST)])
            async with anyio.create_task_group() as group:
                group.start_soon(tasks.execute)
                await gate_running.wait()
                await anyio.to_thread.run_sync(own_redis.kill)
                group.start_soon(enqueue_while_down)  # retried until the server answers again
                await anyio.wait_all_tasks_blocked()
                await anyio.to_thread.run_sync(own_redis.start)
                server_back.set()
                await all_ran.wait()
                infos = [await tasks.wait(task_id, timeout=30) for task_id in first_ids + later_ids]
                group.cancel_scope.cancel()

    reconnects = [r for r in caplog.records if "Redis connection lost" in r.getMessage()]
    assert reconnects, "the test should have made calls fail over to a reconnect"
    assert len(later_ids) == LATER
    assert [info.state for info in infos] == [TaskState.SUCCEEDED] * (FIRST + LATER)
    assert [info.result for info in infos] == [2 * n for n in range(FIRST + LATER)]
    repeated = {number: count for number, count in runs.items() if count != 1}
    assert not repeated, f"tasks ran more than once: {repeated}"
    assert sorted(runs) == list(range(FIRST + LATER))

    # Every record is on disk: kill the server once more and read them back from its AOF.
    await anyio.to_thread.run_sync(own_redis.kill)
    await anyio.to_thread.run_sync(own_redis.start)
    reader = RedisBackend(own_redis.url, prefix="restart")
    await reader.open()
    try:
        assert await reader.stats() == {"default": {TaskState.SUCCEEDED: FIRST + LATER}}
        record = await reader.get(first_ids[GATE])
        assert record is not None
        assert (record.state, record.attempts, record.result) == (TaskState.SUCCEEDED, 1, b"0")
    finally:
        await reader.close()
