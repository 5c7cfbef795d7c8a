"""A PostgreSQL worker asked to stop while its server is down stops within the documented bound:
``shutdown_grace`` + 10 s (the engine's budget for saving verdicts) + 1 s (a claim waiting for a connection
gives up after it). A private server on a free port is stopped; the shared one is never touched.

The test checks that the engine's budget is the documented 10 s, then shortens it to 2 s: the bound it
asserts is the same sum with the shorter budget, so it proves the same (nothing in the PostgreSQL backend
outlasts the budget: its pool's own 10 s connection timeout would now fail it) without waiting 10 s.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Iterator

import anyio
import anyio.to_thread
import psycopg
import pytest
from psycopg import sql

from lifecycle.asynctask import AsyncTasks, TaskState
from lifecycle.asynctask.postgres import PostgresBackend

from ._server import PrivatePostgres, private_postgres
from ._support import OpenPostgres, make_task

pytestmark = [pytest.mark.anyio, pytest.mark.postgres]

GRACE = 1.0
POLL = 1.0
CLAIM_WAIT = 1.0  # docs/backends.md, PostgreSQL "Durability"
VERDICT_BUDGET = 10.0  # docs/asynctask.md, "Graceful shutdown"
SHORT_BUDGET = 2.0  # the budget the test gives the engine instead (see the module docstring)
SLACK = 1.0  # scheduling on a busy machine


@pytest.fixture(scope="module")
def server() -> Iterator[PrivatePostgres]:
    with private_postgres() as started:
        yield started


class _ClaimFailed(logging.Handler):
    """Sets ``event`` when the worker logs that a claim failed: it is retrying against a dead server."""

    def __init__(self, event: anyio.Event) -> None:
        super().__init__(logging.WARNING)
        self.event = event

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("could not claim tasks"):
            self.event.set()


@pytest.mark.slow
async def test_a_worker_stops_within_grace_plus_ten_seconds_while_the_server_is_down(
    server: PrivatePostgres, unique_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import lifecycle.asynctask._engine._worker as worker_module

    assert worker_module._FINAL_FLUSH_TIMEOUT == VERDICT_BUDGET, "the documented budget"
    monkeypatch.setattr(worker_module, "_FINAL_FLUSH_TIMEOUT", SHORT_BUDGET)
    tasks = AsyncTasks(
        PostgresBackend(server.dsn, schema=unique_name, poll_interval=POLL),
        shutdown_grace=GRACE,
        poll_interval=POLL,
    )
    started, stopped, claim_failed = anyio.Event(), anyio.Event(), anyio.Event()

    @tasks.register(name="tests.blocks")
    async def blocks() -> None:
        started.set()
        await anyio.sleep_forever()  # cancelled when the grace is over; its verdict cannot be saved

    async def worker(scope: anyio.CancelScope) -> None:
        with scope:
            await tasks.execute()
        stopped.set()

    watcher = _ClaimFailed(claim_failed)
    logging.getLogger("lifecycle.asynctask").addHandler(watcher)
    await tasks.initialize()
    try:
        await tasks.enqueue(blocks)
        async with anyio.create_task_group() as group:
            scope = anyio.CancelScope()
            group.start_soon(worker, scope)
            with anyio.fail_after(30):
                await started.wait()
            await anyio.to_thread.run_sync(server.stop, "immediate")
            with anyio.fail_after(60):
                await claim_failed.wait()
            # The worker is retrying its claims (one may be waiting for a connection): stop it, as a
            # TaskManager does, and close the backend.
            scope.cancel()
            with anyio.fail_after(GRACE + SHORT_BUDGET + CLAIM_WAIT + SLACK):
                await stopped.wait()
                await tasks.cleanup()
    finally:
        logging.getLogger("lifecycle.asynctask").removeHandler(watcher)
        await tasks.cleanup()
        await anyio.to_thread.run_sync(server.start)


async def _blocked_on_a_lock(dsn: str, application_name: str) -> None:
    """Return once a session of ``application_name`` waits for a row lock."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as admin:
        while True:
            cursor = await admin.execute(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE application_name = %s AND wait_event_type = 'Lock'",
                (application_name,),
            )
            row = await cursor.fetchone()
            if row is not None and row[0] > 0:
                return
            await anyio.sleep(0.02)


async def test_a_call_cancelled_while_waiting_for_a_connection_leaves_at_once_and_the_pool_whole(
    open_pg: OpenPostgres, postgres_dsn: str, unique_name: str
) -> None:
    dsn = f"{postgres_dsn}{'&' if '?' in postgres_dsn else '?'}application_name={unique_name}"
    backend = await open_pg(dsn=dsn, pool_size=1)
    await backend.enqueue_many([make_task("locked", delay=3600)])
    table = sql.Identifier(backend.schema, "lifecycle_tasks")
    async with await psycopg.AsyncConnection.connect(postgres_dsn) as locker:
        await locker.execute(sql.SQL("SELECT id FROM {} WHERE id = 'locked' FOR UPDATE").format(table))
        async with anyio.create_task_group() as group:
            # The pool's only connection waits for the row lock inside cancel().
            group.start_soon(functools.partial(backend.cancel, ["locked"], now=time.time()))
            with anyio.fail_after(10):
                await _blocked_on_a_lock(postgres_dsn, unique_name)
            with anyio.fail_after(5):  # leaves at once, although no connection came
                with anyio.move_on_after(0.2) as waiting:
                    await backend.get("locked")
            assert waiting.cancelled_caught
            await locker.rollback()  # cancel() finishes and hands its connection back
        # The abandoned wait received that connection and returned it to the pool: the next call gets it.
        with anyio.fail_after(5):
            record = await backend.get("locked")
        assert record is not None
        assert record.state is TaskState.CANCELLED
