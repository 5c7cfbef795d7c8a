"""A server restart mid-run: the worker reconnects, every task runs exactly once, every record survives.

The test runs its own nats-server with JetStream on file storage, stops it (SIGTERM to its PID) while a task
is running, other tasks are finishing and an enqueue is on its way, and starts it again on the same data. A
snapshot is taken before the restart, so the store is read back from a snapshot and the log after it.
"""

from __future__ import annotations

import logging
from collections import Counter

import anyio
import anyio.to_thread
import pytest

from lifecycle.asynctask import AsyncTasks, Call, TaskState
from lifecycle.asynctask.nats import NatsBackend
from tests.asynctask.nats.nats_servers import NatsServer

pytestmark = [pytest.mark.nats, pytest.mark.slow]

FIRST = 300
"""Tasks enqueued before the restart."""

LATER = 50
"""Tasks whose enqueue is sent while the server is down."""

GATE = 0
"""The task that is running when the server stops (it waits until the server is back)."""


async def test_a_restarted_server_loses_nothing_and_repeats_nothing(
    own_nats: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="lifecycle.asynctask.nats")
    backend = NatsBackend(own_nats.url, prefix="restart")
    backend.compact_every = 50  # snapshots, and a deleted log, before the restart
    tasks = AsyncTasks(backend, concurrency=8, poll_interval=5.0)
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

    with anyio.fail_after(90):
        async with tasks:
            first_ids = [await tasks.enqueue("restart.job", n) for n in range(FIRST)]
            async with anyio.create_task_group() as group:
                group.start_soon(tasks.execute)
                await gate_running.wait()
                await anyio.to_thread.run_sync(own_nats.stop)
                group.start_soon(enqueue_while_down)  # retried until the server answers again
                await anyio.wait_all_tasks_blocked()
                await anyio.to_thread.run_sync(own_nats.start)
                server_back.set()
                await all_ran.wait()
                infos = [await tasks.wait(task_id, timeout=30) for task_id in first_ids + later_ids]
                group.cancel_scope.cancel()

    reconnects = [r for r in caplog.records if "lost the connection to NATS" in r.getMessage()]
    assert reconnects, "the test should have made calls wait for a reconnect"
    assert len(later_ids) == LATER
    assert [info.state for info in infos] == [TaskState.SUCCEEDED] * (FIRST + LATER)
    assert [info.result for info in infos] == [2 * n for n in range(FIRST + LATER)]
    repeated = {number: count for number, count in runs.items() if count != 1}
    assert not repeated, f"tasks ran more than once: {repeated}"
    assert sorted(runs) == list(range(FIRST + LATER))

    reader = NatsBackend(own_nats.url, prefix="restart")
    await reader.open(create=False)
    try:
        assert await reader.stats() == {"default": {TaskState.SUCCEEDED: FIRST + LATER}}
    finally:
        await reader.close()


class _Reconnected(logging.Handler):
    """Sets an event when the backend logs that it reconnected (the log record comes from nats-py's
    reconnect callback, on the test's event loop)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.event = anyio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("reconnected to NATS"):
            self.event.set()


async def test_after_a_restart_an_idle_worker_sees_new_work_at_once_not_at_its_next_poll(
    own_nats: NatsServer,
) -> None:
    # The worker learns of work through the log's pushed messages; after a restart, the subscription that
    # pushed them is followed again at once, so the idle worker does not wait out its poll interval (or
    # nats-py's own reset of the subscription, after two missed heartbeats: two seconds at least).
    worker = AsyncTasks(NatsBackend(own_nats.url, prefix="idle"), concurrency=2, poll_interval=30.0)
    producer = AsyncTasks(NatsBackend(own_nats.url, prefix="idle"), execution=False)
    started: dict[int, anyio.Event] = {n: anyio.Event() for n in range(2)}

    @worker.register(name="idle.job")
    async def job(number: int) -> None:
        started[number].set()

    producer.register(job, name="idle.job")
    reconnected = _Reconnected()
    logger = logging.getLogger("lifecycle.asynctask.nats")
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(reconnected)
    try:
        with anyio.fail_after(60):
            async with worker, producer, anyio.create_task_group() as group:
                group.start_soon(worker.execute)
                await producer.enqueue("idle.job", 0)
                await started[0].wait()
                await anyio.wait_all_tasks_blocked()  # the worker is idle, waiting for work
                await anyio.to_thread.run_sync(own_nats.stop)
                await anyio.to_thread.run_sync(own_nats.start)
                await reconnected.event.wait()
                await producer.enqueue("idle.job", 1)  # stored once the producer has reconnected too
                with anyio.fail_after(1.5):
                    await started[1].wait()
                group.cancel_scope.cancel()
    finally:
        logger.removeHandler(reconnected)
        logger.setLevel(level)
