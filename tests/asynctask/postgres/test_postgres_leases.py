"""PostgresBackend keeps a few pooled connections leased between its calls (ConnectionLeases): calls reuse
them without a pool checkout, a connection left dirty or ended by the server goes back to the pool, and calls
beyond the leases still get pooled connections."""

from __future__ import annotations

from typing import Any

import anyio
import psycopg
import pytest
from psycopg.pq import TransactionStatus
from psycopg_pool import AsyncConnectionPool

from lifecycle.asynctask.postgres import PostgresBackend

from ._support import OpenPostgres, make_task

pytestmark = [pytest.mark.anyio, pytest.mark.postgres]


def _with_app_name(dsn: str, name: str) -> str:
    return f"{dsn}{'&' if '?' in dsn else '?'}application_name={name}"


def _count_pool_calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    calls = {"getconn": 0, "putconn": 0}
    getconn, putconn = AsyncConnectionPool.getconn, AsyncConnectionPool.putconn

    async def counting_getconn(pool: AsyncConnectionPool[Any], *args: Any, **kwargs: Any) -> Any:
        calls["getconn"] += 1
        return await getconn(pool, *args, **kwargs)

    async def counting_putconn(pool: AsyncConnectionPool[Any], connection: Any) -> None:
        calls["putconn"] += 1
        await putconn(pool, connection)

    monkeypatch.setattr(AsyncConnectionPool, "getconn", counting_getconn)
    monkeypatch.setattr(AsyncConnectionPool, "putconn", counting_putconn)
    return calls


async def test_single_enqueues_and_a_worker_s_calls_reuse_a_leased_connection_without_the_pool(
    open_pg: OpenPostgres, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = await open_pg()
    await backend.enqueue_many([make_task("warm-up")])
    calls = _count_pool_calls(monkeypatch)
    for n in range(5):
        assert await backend.enqueue_many([make_task(f"t{n}")]) == [f"t{n}"]
    claimed = await backend.claim(["default"], 10, now=1e10, lease_until=1e10 + 30)
    assert len(claimed) == 6
    assert (
        await backend.extend_leases([(c.record.id, c.token) for c in claimed], lease_until=1e10 + 60) == set()
    )
    assert calls == {"getconn": 0, "putconn": 0}, "one lease serves calls made one after another"


async def test_a_lease_left_inside_a_transaction_goes_back_to_the_pool_rolled_back(
    open_pg: OpenPostgres, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = await open_pg()
    await backend.enqueue_many([make_task("warm-up")])
    calls = _count_pool_calls(monkeypatch)
    async with backend._connection() as connection:
        await connection.execute("BEGIN")
        assert connection.pgconn.transaction_status == TransactionStatus.INTRANS
    assert calls["putconn"] == 1, "a dirty lease is not kept"
    async with backend._connection() as connection:
        assert connection.pgconn.transaction_status == TransactionStatus.IDLE
    assert await backend.enqueue_many([make_task("after")]) == ["after"]


async def test_calls_beyond_the_leases_wait_for_pooled_connections_and_all_complete(
    open_pg: OpenPostgres,
) -> None:
    # pool_size=2 keeps one lease: the other callers share the one pooled connection left, and a lease
    # released meanwhile must not leave them waiting for a connection that never comes back to the pool.
    backend = await open_pg(pool_size=2, connect_timeout=5)
    done: list[int] = []

    async def hold(n: int) -> None:
        async with backend._connection() as connection:
            await connection.execute("SELECT pg_sleep(0.05)")
        done.append(n)

    with anyio.fail_after(4):  # under connect_timeout: a starved caller would fail with PoolTimeout at 5 s
        for _ in range(2):
            async with anyio.create_task_group() as group:
                for n in range(6):
                    group.start_soon(hold, n)
    assert sorted(done) == sorted([*range(6)] * 2)


async def test_a_lease_the_server_ended_is_replaced_before_the_next_call(
    open_pg: OpenPostgres, postgres_dsn: str, unique_name: str
) -> None:
    app = f"lc_lease_{unique_name}"
    backend = await open_pg(dsn=_with_app_name(postgres_dsn, app))
    await backend.enqueue_many([make_task("before")])
    async with await psycopg.AsyncConnection.connect(postgres_dsn, autocommit=True) as admin:
        cursor = await admin.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s AND query NOT LIKE 'LISTEN%%'",
            (app,),
        )
        pids = [row[0] for row in await cursor.fetchall()]
        assert pids
        with anyio.fail_after(20):
            for pid in pids:
                await admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
            while await (
                await admin.execute("SELECT 1 FROM pg_stat_activity WHERE pid = ANY(%s)", (pids,))
            ).fetchall():
                await anyio.sleep(0.01)
    with anyio.fail_after(20):
        assert await backend.enqueue_many([make_task("after")]) == ["after"]
        claimed = await backend.claim(["default"], 10, now=1e10, lease_until=1e10 + 30)
    assert sorted(c.record.id for c in claimed) == ["after", "before"]


async def test_a_lease_goes_back_to_the_pool_once_renew_after_has_passed(
    open_pg: OpenPostgres, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("lifecycle.asynctask._backends.postgres._leases.RENEW_AFTER", 0.0)
    backend: PostgresBackend = await open_pg()
    await backend.enqueue_many([make_task("warm-up")])
    calls = _count_pool_calls(monkeypatch)
    for n in range(3):
        await backend.enqueue_many([make_task(f"t{n}")])
    assert calls == {"getconn": 3, "putconn": 3}


async def test_a_lease_interrupted_mid_statement_is_not_kept_and_the_pool_stays_whole(
    open_pg: OpenPostgres, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = await open_pg(pool_size=2, connect_timeout=5)
    await backend.enqueue_many([make_task("warm-up")])
    calls = _count_pool_calls(monkeypatch)
    interrupted: list[psycopg.AsyncConnection[Any]] = []
    with anyio.move_on_after(0.2):
        async with backend._connection() as connection:
            interrupted.append(connection)
            await connection.execute("SELECT pg_sleep(30)")
    assert calls["putconn"] == 1, "a lease whose statement was interrupted goes back to the pool"
    async with backend._connection() as connection:
        assert connection is not interrupted[0]
    # Both pooled connections still serve calls at once (the interrupted one was replaced, not lost).
    taken, holding = anyio.Event(), anyio.Event()
    with anyio.fail_after(4):
        async with anyio.create_task_group() as group:

            async def hold() -> None:
                async with backend._connection() as held:
                    await held.execute("SELECT 1")
                    taken.set()
                    await holding.wait()

            group.start_soon(hold)
            await taken.wait()
            async with backend._connection() as other:
                await other.execute("SELECT 1")
            holding.set()
    assert await backend.enqueue_many([make_task("after")]) == ["after"]
