"""PostgresBackend survives a restart of its server: a private server on a free port, crashed and restarted
while tasks are leased. The shared server is never touched."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator

import anyio
import anyio.to_thread
import psycopg
import pytest

import lifecycle
from lifecycle.asynctask import AsyncTasks, Call, ClaimedTask, Settlement, TaskState
from lifecycle.asynctask.postgres import PostgresBackend

from ._server import PrivatePostgres, private_postgres
from ._support import make_task, start_listening

# Marked at collection time (the root conftest marks anyio tests only after collection, too late for the
# anyio_backend override in conftest.py to take effect).
pytestmark = [pytest.mark.anyio, pytest.mark.postgres, pytest.mark.slow]


@pytest.fixture(scope="module")
def server() -> Iterator[PrivatePostgres]:
    """A private PostgreSQL server for this module's tests, which stop and restart it."""
    with private_postgres() as started:
        yield started


@pytest.fixture
async def backend(server: PrivatePostgres, unique_name: str) -> AsyncIterator[PostgresBackend]:
    """A backend on the private server; a long poll interval, so only notifications wake idle waits."""
    opened = PostgresBackend(server.dsn, schema=unique_name, connect_timeout=5, poll_interval=3600)
    await opened.open()
    yield opened
    await opened.close()


def _succeeded(claimed: list[ClaimedTask], at: float) -> list[Settlement]:
    return [Settlement(task_id=c.record.id, token=c.token, state=TaskState.SUCCEEDED, at=at) for c in claimed]


async def _listening_again(backend: PostgresBackend) -> None:
    # The LISTEN connection comes back from a background task with its own backoff; there is no event to
    # wait on from outside, so look at its state at each turn (the caller bounds the wait).
    while not backend.listening:
        await anyio.sleep(0.02)


async def test_leased_and_pending_tasks_survive_a_server_crash_and_restart(
    backend: PostgresBackend, server: PrivatePostgres
) -> None:
    ids = [f"task-{n:03d}" for n in range(100)]
    now = time.time()
    with anyio.fail_after(20):
        await start_listening(backend)
    await backend.enqueue_many([make_task(task_id, at=now) for task_id in ids])
    leased = await backend.claim(["default"], 40, now=now, lease_until=now + 600)
    assert len(leased) == 40

    # Like a crash: no shutdown checkpoint, the committed work is replayed from the WAL on start.
    await anyio.to_thread.run_sync(server.restart, "immediate")

    with anyio.fail_after(60):
        # The pool replaces its broken connections; the leases taken before the crash are still held.
        assert await backend.settle(_succeeded(leased, time.time())) == set()
        rest = await backend.claim(["default"], 100, now=time.time(), lease_until=time.time() + 600)
        assert sorted(c.record.id for c in rest) == ids[40:]
        assert await backend.settle(_succeeded(rest, time.time())) == set()
        assert await backend.stats() == {"default": {TaskState.SUCCEEDED: 100}}
        assert await backend.claim(["default"], 100, now=time.time(), lease_until=time.time() + 600) == []

        # The LISTEN connection is back, and an enqueue wakes an idle worker again.
        await _listening_again(backend)
        returned = anyio.Event()

        async def wait() -> None:
            await backend.wait_for_work(["default"], timeout=120)
            returned.set()

        async with anyio.create_task_group() as group:
            group.start_soon(wait)
            await anyio.wait_all_tasks_blocked()
            await backend.enqueue_many([make_task("after-restart")])
            await returned.wait()


async def test_calls_during_an_outage_fail_clearly_and_work_again_after_it(
    server: PrivatePostgres, unique_name: str
) -> None:
    backend = PostgresBackend(server.dsn, schema=unique_name, connect_timeout=2, poll_interval=3600)
    await backend.open()
    try:
        await _outage(backend, server)
    finally:
        await backend.close()


async def _outage(backend: PostgresBackend, server: PrivatePostgres) -> None:
    await backend.enqueue_many([make_task("before")])
    await anyio.to_thread.run_sync(server.stop, "fast")
    try:
        with anyio.fail_after(60):
            with pytest.raises(psycopg.OperationalError):
                await backend.get("before")
            # An idle wait does not raise during the outage: it waits, no longer than its timeout.
            started = anyio.current_time()
            await backend.wait_for_work(["default"], timeout=0.1)
            assert anyio.current_time() - started < 1.5, "the pool's connect timeout must not stretch a wait"
    finally:
        await anyio.to_thread.run_sync(server.start)
    with anyio.fail_after(60):
        record = await backend.get("before")
        assert record is not None
        assert record.state is TaskState.PENDING
        assert await backend.enqueue_many([make_task("after")]) == ["after"]


async def test_the_engine_completes_every_task_across_a_server_crash(
    server: PrivatePostgres, unique_name: str
) -> None:
    backend = PostgresBackend(server.dsn, schema=unique_name, connect_timeout=5)
    concurrency = 8
    tasks = AsyncTasks(
        backend,
        concurrency=concurrency,
        lease=5.0,
        recovery_interval=0.5,
        poll_interval=0.5,
        retry_backoff=lifecycle.Backoff(initial=0.05, cap=0.2),
    )
    runs: dict[str, int] = {}
    halfway = anyio.Event()
    count = 120

    @tasks.register(name="tests.restart.work")
    async def work(key: str) -> str:
        runs[key] = runs.get(key, 0) + 1
        if len(runs) >= count // 2:
            halfway.set()
        await anyio.sleep(0.005)
        return key

    await tasks.initialize()
    try:
        with anyio.fail_after(90):
            async with anyio.create_task_group() as group:
                group.start_soon(tasks.execute)
                ids = await tasks.enqueue_many([Call(work, f"k{n:03d}") for n in range(count)])
                await halfway.wait()
                # Crash the server while tasks are leased, running and being settled.
                await anyio.to_thread.run_sync(server.restart, "immediate")
                infos = [await tasks.wait(task_id, timeout=60) for task_id in ids]
                group.cancel_scope.cancel()
    finally:
        await tasks.cleanup()
    assert [info.state for info in infos] == [TaskState.SUCCEEDED] * count, "no task may be lost"
    assert sorted(runs) == [f"k{n:03d}" for n in range(count)]
    # At-least-once: only a claim whose reply the crash swallowed can run again (after its lease expires).
    assert sum(runs.values()) - count <= concurrency
