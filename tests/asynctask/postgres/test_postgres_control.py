"""Control of running work on PostgresBackend beyond the conformance suites: the migration of a store written
by schema version 2, fan-in when two backend objects settle the last members of a group at once (forced to
overlap by a lock held from outside, so the interleaving is the one that matters, every run), the claim with
limits ending the group of a member it finds expired, and the notices: one ``NOTIFY`` per settlement batch,
payloads split under PostgreSQL's 8000-byte limit, a process that never asks for notices not listening for
them, listening again after the connection was lost. Times are explicit (``T0``), never slept."""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Any

import anyio
import psycopg
import pytest
from psycopg import sql

from lifecycle.asynctask import (
    AsyncTasks,
    ClaimedTask,
    DuplicateTaskError,
    FlowLimits,
    NewGroup,
    Notice,
    Settlement,
    TaskState,
)
from lifecycle.asynctask._backends.postgres import _schema as schema_module
from lifecycle.asynctask.postgres import PostgresBackend
from lifecycle.asynctask.testing import T0

from ._support import OpenPostgres, start_listening
from ._support import layout as _layout
from ._support import rows as _rows
from ._support import task as _task

pytestmark = [pytest.mark.anyio, pytest.mark.postgres]

LEASE = 30.0


def _group(group_id: str, count: int, *, then: bool = True, queue: str = "default") -> NewGroup:
    return NewGroup(
        id=group_id,
        members=tuple(_task(f"{group_id}-m{n}", group_id=group_id, queue=queue) for n in range(count)),
        then=_task(f"{group_id}-then", queue="after") if then else None,
        created_at=T0,
    )


def _verdict(claimed: ClaimedTask, state: TaskState, at: float, result: bytes | None = None) -> Settlement:
    return Settlement(claimed.record.id, claimed.token, state, at=at, result=result, error=None)


async def _claim_all(backend: PostgresBackend, count: int, queue: str = "default") -> dict[str, ClaimedTask]:
    claimed = await backend.claim([queue], count, now=T0 + 1, lease_until=T0 + 1 + LEASE)
    assert len(claimed) == count
    return {c.record.id: c for c in claimed}


async def _stored_thens(dsn: str, schema: str) -> list[str]:
    rows = await _rows(
        dsn,
        sql.SQL("SELECT id FROM {} WHERE queue = 'after' ORDER BY id").format(
            sql.Identifier(schema, "lifecycle_tasks")
        ),
    )
    return [row[0] for row in rows]


# -- the migration from schema version 2 ---------------------------------------------------------------------


async def test_a_store_written_by_schema_version_2_is_migrated_with_its_tasks(
    open_pg: OpenPostgres,
    postgres_dsn: str,
    pg_schema: str,
    unique_name: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Version 2 as the previous release created it (its claim functions included), with tasks in it.
    monkeypatch.setattr(schema_module, "SCHEMA_VERSION", 2)
    async with await psycopg.AsyncConnection.connect(postgres_dsn, autocommit=True) as connection:
        assert await schema_module.ensure_schema(connection, pg_schema) == 2
    monkeypatch.undo()
    table = sql.Identifier(pg_schema, "lifecycle_tasks")
    insert = sql.SQL(
        "INSERT INTO {} (id, name, queue, payload, state, attempts, max_retries, enqueued_at, run_at, "
        "started_at, lease_until, token, finished_at, expires_at) "
        "VALUES (%s, 'tests.job', 'default', 'p', %s, %s, 3, %s, %s, %s, %s, %s, %s, %s)"
    ).format(table)
    for values in (
        ("old-pending", "pending", 0, T0, T0 + 1, None, None, None, None, None),
        ("old-expiring", "pending", 0, T0, T0 + 1, None, None, None, None, T0 + 2),
        ("old-active", "active", 1, T0, T0, T0 + 2, T0 + 60, "old-token", None, None),
        ("old-done", "succeeded", 1, T0, T0, T0 + 1, None, None, T0 + 2, None),
    ):
        await _rows(postgres_dsn, insert, values)

    backend = await open_pg()  # migrates
    assert await _rows(
        postgres_dsn, sql.SQL("SELECT version FROM {}").format(sql.Identifier(pg_schema, "lifecycle_schema"))
    ) == [(schema_module.SCHEMA_VERSION,)]
    for task_id in ("old-pending", "old-active", "old-done"):
        record = await backend.get(task_id)
        assert record is not None
        assert record.fault is None
        assert (record.cancel_requested, record.progress_done, record.progress_total) == (False, None, None)
        assert (record.progress_message, record.group_id) == (None, None)

    # The stored tasks take part in everything version 3 adds.
    assert await backend.cancel(["old-active"], now=T0 + 3) == ["old-active"]
    assert await backend.cancel_requests(["old-active", "old-pending"]) == {"old-active"}
    assert (
        await backend.settle([Settlement("old-active", "old-token", TaskState.CANCELLED, at=T0 + 4)]) == set()
    )
    assert (await backend.get("old-active")).state is TaskState.CANCELLED  # type: ignore[union-attr]
    await backend.enqueue_group(_group("g", 2, queue="default"))
    claimed = await backend.claim(["default"], 10, now=T0 + 5, lease_until=T0 + 60)
    assert sorted(c.record.id for c in claimed) == ["g-m0", "g-m1", "old-pending"], (
        "the replaced claim function still cancels what expired"
    )
    assert (await backend.get("old-expiring")).state is TaskState.CANCELLED  # type: ignore[union-attr]
    members = {c.record.id: c for c in claimed}
    verdicts = [_verdict(members[f"g-m{n}"], TaskState.SUCCEEDED, T0 + 6, b"%d" % n) for n in range(2)]
    assert await backend.settle(verdicts) == set()
    group = await backend.get_group("g")
    assert group is not None
    assert (group.outcome, group.results, group.then_id) == (TaskState.SUCCEEDED, (b"0", b"1"), "g-then")

    # A schema created now has exactly the layout the migration produced.
    fresh = await open_pg(schema=unique_name + "_fresh")
    try:
        assert await _layout(postgres_dsn, fresh.schema) == await _layout(postgres_dsn, pg_schema)
    finally:
        await fresh.close()
        await _rows(postgres_dsn, sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(fresh.schema)))


# -- fan-in across backend objects ---------------------------------------------------------------------------


_WAITING_FOR = (
    "WITH RECURSIVE line(pid) AS (SELECT %s::int UNION "
    "SELECT a.pid FROM pg_stat_activity AS a JOIN line AS l ON l.pid = ANY(pg_blocking_pids(a.pid))) "
    "SELECT count(*) - 1 FROM line"
)


async def _while_groups_are_locked(
    dsn: str, schema: str, group_ids: list[str], waiters: int, run: Callable[[], Coroutine[Any, Any, None]]
) -> None:
    """Hold the rows of ``group_ids`` locked (as a transaction of another process would) while ``run()``
    starts, until ``waiters`` sessions wait for that lock; then let them go and wait for ``run()`` to end.

    A settlement's statement starts (and takes its snapshot) before it reaches the group rows, so every
    settlement started here began before any of the others committed: exactly the overlap in which a
    fan-in that counted successes from what its own snapshot saw would store ``then`` zero times, or twice.
    """
    async with await psycopg.AsyncConnection.connect(dsn) as locker:
        await locker.execute(
            sql.SQL("SELECT id FROM {} WHERE id = ANY(%s) FOR UPDATE").format(
                sql.Identifier(schema, "lifecycle_groups")
            ),
            (group_ids,),
        )
        pid = locker.info.backend_pid
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(run)
            with anyio.fail_after(30):
                # The sessions waiting for the locker, directly or behind another waiter (the second one in
                # line waits for the first, which holds the row's place in the queue).
                while (await _rows(dsn, _WAITING_FOR, (pid,)))[0][0] < waiters:
                    await anyio.sleep(0.005)  # polling the server for the condition, not waiting for luck
            await locker.commit()


@pytest.mark.parametrize("last", ["two successes", "a success and a death"])
async def test_two_objects_settling_the_last_two_members_at_once_store_then_exactly_once(
    open_pg: OpenPostgres, postgres_dsn: str, pg_schema: str, last: str
) -> None:
    first, second = await open_pg(), await open_pg()
    await first.enqueue_group(_group("g", 4))
    claimed = await _claim_all(first, 4)
    early = [_verdict(claimed[f"g-m{n}"], TaskState.SUCCEEDED, T0 + 2, b"%d" % n) for n in (0, 1)]
    assert await first.settle(early) == set()
    ending = TaskState.SUCCEEDED if last == "two successes" else TaskState.DEAD
    lost: list[set[str]] = []

    async def settle_both() -> None:
        async with anyio.create_task_group() as tasks:

            async def one(backend: PostgresBackend, settlement: Settlement) -> None:
                lost.append(await backend.settle([settlement]))

            tasks.start_soon(one, first, _verdict(claimed["g-m2"], TaskState.SUCCEEDED, T0 + 3, b"2"))
            tasks.start_soon(one, second, _verdict(claimed["g-m3"], ending, T0 + 3, b"3"))

    await _while_groups_are_locked(postgres_dsn, pg_schema, ["g"], 2, settle_both)
    assert lost == [set(), set()]
    group = await first.get_group("g")
    assert group is not None
    if ending is TaskState.SUCCEEDED:
        assert (group.outcome, group.then_id) == (TaskState.SUCCEEDED, "g-then")
        assert group.results == (b"0", b"1", b"2", b"3")
        assert await _stored_thens(postgres_dsn, pg_schema) == ["g-then"], "then stored exactly once"
    else:
        assert (group.outcome, group.then_id) == (TaskState.DEAD, None)
        assert await _stored_thens(postgres_dsn, pg_schema) == [], "then never stored for a dead group"
    expected = (
        {TaskState.SUCCEEDED: 4} if ending is TaskState.SUCCEEDED else {TaskState.SUCCEEDED: 3, ending: 1}
    )
    assert dict(group.counts) == expected


async def test_batches_ending_two_groups_in_opposite_orders_at_once_neither_deadlock_nor_repeat_then(
    open_pg: OpenPostgres, postgres_dsn: str, pg_schema: str
) -> None:
    """Each of two objects settles the last member of both groups, in opposite orders: each group is locked in
    id order by both, so neither waits for the other in a cycle (a deadlock would fail one settlement)."""
    first, second = await open_pg(), await open_pg()
    for group_id in ("a", "b"):
        await first.enqueue_group(_group(group_id, 2))
    claimed = await _claim_all(first, 4)
    lost: list[set[str]] = []

    async def settle_both() -> None:
        async with anyio.create_task_group() as tasks:

            async def one(backend: PostgresBackend, ids: list[str]) -> None:
                verdicts = [_verdict(claimed[i], TaskState.SUCCEEDED, T0 + 2, i.encode()) for i in ids]
                lost.append(await backend.settle(verdicts))

            tasks.start_soon(one, first, ["a-m0", "b-m1"])
            tasks.start_soon(one, second, ["b-m0", "a-m1"])

    await _while_groups_are_locked(postgres_dsn, pg_schema, ["a", "b"], 2, settle_both)
    assert lost == [set(), set()]
    assert await _stored_thens(postgres_dsn, pg_schema) == ["a-then", "b-then"]
    for group_id in ("a", "b"):
        group = await second.get_group(group_id)
        assert group is not None
        assert group.results == (f"{group_id}-m0".encode(), f"{group_id}-m1".encode())


async def test_many_objects_settling_members_of_many_groups_at_once_store_each_then_once(
    open_pg: OpenPostgres, postgres_dsn: str, pg_schema: str
) -> None:
    """No forced interleaving: 3 objects settle 40 groups of 5 members in small mixed batches, all at once."""
    backends = [await open_pg(pool_size=3) for _ in range(3)]
    groups = [_group(f"g{n:02d}", 5) for n in range(40)]
    for group in groups:
        await backends[0].enqueue_group(group)
    claimed = await _claim_all(backends[0], 200)
    ids = sorted(claimed, key=lambda task_id: (task_id.split("-")[1], task_id))  # members spread over batches
    batches = [ids[n : n + 7] for n in range(0, len(ids), 7)]

    async def settle(backend: PostgresBackend, batch: list[str]) -> None:
        verdicts = [_verdict(claimed[i], TaskState.SUCCEEDED, T0 + 2, i.encode()) for i in batch]
        assert await backend.settle(verdicts) == set()

    with anyio.fail_after(60):
        async with anyio.create_task_group() as tasks:
            for n, batch in enumerate(batches):
                tasks.start_soon(settle, backends[n % 3], batch)
    assert await _stored_thens(postgres_dsn, pg_schema) == [f"g{n:02d}-then" for n in range(40)]
    for group in groups:
        stored = await backends[1].get_group(group.id)
        assert stored is not None
        assert stored.outcome is TaskState.SUCCEEDED
        assert stored.results == tuple(member.id.encode() for member in group.members)


# -- expiry in the claim with limits -------------------------------------------------------------------------


async def test_a_member_found_expired_by_the_claim_with_limits_cancels_its_group(
    open_pg: OpenPostgres,
) -> None:
    listener = await open_pg()
    await listener.wait_for_notices(timeout=0)
    backend = await open_pg()
    group = NewGroup(
        id="g",
        members=(
            _task("g-m0", "tests.limited", group_id="g"),
            _task("g-m1", "tests.limited", group_id="g", expires_at=T0 + 5),
        ),
        then=_task("g-then"),
        created_at=T0,
    )
    await backend.enqueue_group(group)
    limits = {"tests.limited": FlowLimits(max_running=10)}
    claimed = await backend.claim(["default"], 10, now=T0 + 10, lease_until=T0 + 40, limits=limits)
    assert [c.record.id for c in claimed] == ["g-m0"]
    stored = await backend.get_group("g")
    assert stored is not None
    assert (stored.outcome, stored.finished_at) == (TaskState.CANCELLED, T0 + 10)
    assert dict(stored.counts) == {TaskState.ACTIVE: 1, TaskState.CANCELLED: 1}
    with anyio.fail_after(20):
        while Notice("settled", "g-m1") not in await listener.wait_for_notices(timeout=20):
            pass
    assert await backend.settle([_verdict(claimed[0], TaskState.SUCCEEDED, T0 + 11)]) == set()
    assert await backend.get("g-then") is None


# -- notices -------------------------------------------------------------------------------------------------


class _RawListener:
    """A plain LISTEN on the notice channel, to see the payloads themselves. ``until_marker()`` returns the
    payloads received before the marker it sends: notifications arrive in commit order, so every payload of
    a transaction committed before the marker was sent is among them."""

    def __init__(self, dsn: str, channel: str) -> None:
        self._dsn = dsn
        self._channel = channel
        self._connection: psycopg.AsyncConnection[Any] | None = None

    async def __aenter__(self) -> _RawListener:
        self._connection = await psycopg.AsyncConnection.connect(self._dsn, autocommit=True)
        await self._connection.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self._channel)))
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._connection is not None
        await self._connection.close()

    async def until_marker(self) -> list[str]:
        assert self._connection is not None
        await _rows(self._dsn, "SELECT pg_notify(%s, 'marker')", (self._channel,))
        payloads: list[str] = []
        with anyio.fail_after(20):
            async for notify in self._connection.notifies():
                if notify.payload == "marker":
                    return payloads
                payloads.append(notify.payload)
        raise AssertionError("unreachable")


def _ids(payloads: list[str], kind: str) -> list[str]:
    ids: list[str] = []
    for payload in payloads:
        assert payload[0] == kind
        ids.extend(json.loads(payload[1:]))
    return ids


async def test_a_settlement_batch_sends_one_notify_and_long_batches_are_split_under_the_payload_limit(
    open_pg: OpenPostgres, postgres_dsn: str
) -> None:
    backend = await open_pg()
    async with _RawListener(postgres_dsn, backend.notice_channel) as raw:
        await backend.enqueue_many([_task(f"t{n:03d}") for n in range(100)])
        claimed = await _claim_all(backend, 100)
        await raw.until_marker()  # nothing so far: enqueues and claims send no notices
        verdicts = [_verdict(c, TaskState.SUCCEEDED, T0 + 2) for c in claimed.values()]
        assert await backend.settle(verdicts) == set()
        payloads = await raw.until_marker()
        assert len(payloads) == 1, "one NOTIFY for the whole batch"
        assert sorted(_ids(payloads, "s")) == sorted(claimed)

        # 300 ids of 200 characters (60 000 bytes), one of them with quotes and non-ASCII text, and one too
        # long for any payload: split into payloads under 8000 bytes; the long id is left out, not fatal.
        long_ids = [f'{n:03d}-"é"-' + "x" * 192 for n in range(300)] + ["y" * 5000]
        await backend.enqueue_many([_task(task_id, queue="long") for task_id in long_ids])
        many = await _claim_all(backend, len(long_ids), queue="long")
        assert await backend.settle([_verdict(c, TaskState.DEAD, T0 + 2) for c in many.values()]) == set()
        payloads = await raw.until_marker()
        assert all(len(payload.encode()) < 8000 for payload in payloads)
        assert 8 <= len(payloads) <= 20
        assert sorted(_ids(payloads, "s")) == sorted(long_ids[:-1])


async def test_cancel_sends_cancel_notices_for_active_tasks_and_settled_ones_for_pending_tasks(
    open_pg: OpenPostgres, postgres_dsn: str
) -> None:
    backend = await open_pg()
    async with _RawListener(postgres_dsn, backend.notice_channel) as raw:
        await backend.enqueue_many([_task("run1"), _task("run2"), _task("wait", run_at=T0 + 500)])
        await _claim_all(backend, 2)
        assert await backend.cancel(["wait", "run2", "ghost", "run1"], now=T0 + 3) == ["wait", "run2", "run1"]
        payloads = await raw.until_marker()
        assert sorted(payloads) == ['c["run2", "run1"]', 's["wait"]'], (
            "one NOTIFY per kind, ids in call order"
        )


async def test_a_process_that_never_asks_for_notices_is_not_sent_them(
    open_pg: OpenPostgres, postgres_dsn: str
) -> None:
    producer = await open_pg()
    await producer.enqueue_many([_task("job")])
    assert not producer.listening, "a backend that only enqueues opens no LISTEN connection"
    with anyio.fail_after(20):
        await start_listening(producer)  # a wait for work listens for wake-ups only
    listener = producer._listener
    assert listener is not None
    pid = listener._connection.info.backend_pid  # type: ignore[union-attr]
    listening = "SELECT count(*) FROM pg_stat_activity WHERE pid = %s AND query LIKE %s"
    assert (await _rows(postgres_dsn, listening, (pid, "LISTEN%lifecycle-notices%")))[0][0] == 0
    assert await producer.wait_for_notices(timeout=0) == []
    assert (await _rows(postgres_dsn, listening, (pid, "LISTEN%lifecycle-notices%")))[0][0] == 1, (
        "the first wait_for_notices() listens to the notice channel, and returns once it does"
    )


def _listening(backend: PostgresBackend) -> bool:
    return backend.listening  # read anew at each call (an attribute read after an assert is narrowed)


async def test_an_enqueue_only_asynctasks_listens_only_once_it_waits_for_a_result(
    postgres_dsn: str, pg_schema: str
) -> None:
    backend = PostgresBackend(postgres_dsn, schema=pg_schema)
    producer = AsyncTasks(backend, execution=False)
    worker = AsyncTasks(PostgresBackend(postgres_dsn, schema=pg_schema), concurrency=2)
    release = anyio.Event()

    async def double(value: int) -> int:
        await release.wait()
        return 2 * value

    producer.register(double, name="tests.double")
    worker.register(double, name="tests.double")
    async with producer, worker:
        first = await producer.enqueue("tests.double", 1)
        second = await producer.enqueue("tests.double", 2)
        assert not backend.listening, "enqueues alone open no LISTEN connection, and read no notification"
        with anyio.fail_after(30):
            async with anyio.create_task_group() as group:
                group.start_soon(worker.execute)
                waited: list[int] = []

                async def wait_for(task_id: str) -> None:
                    info = await producer.wait(task_id)
                    assert info.state is TaskState.SUCCEEDED
                    waited.append(info.result)

                async with anyio.create_task_group() as waits:
                    waits.start_soon(wait_for, first)
                    waits.start_soon(wait_for, second)
                    while not _listening(backend):  # the waits open it (no event to wait on from outside)
                        await anyio.sleep(0.02)
                    release.set()
                group.cancel_scope.cancel()
        assert sorted(waited) == [2, 4]


async def test_notices_flow_again_after_the_listen_connection_was_lost(
    open_pg: OpenPostgres, postgres_dsn: str
) -> None:
    waiter, actor = await open_pg(), await open_pg()
    assert await waiter.wait_for_notices(timeout=0) == []
    listener = waiter._listener
    assert listener is not None
    pid = listener._connection.info.backend_pid  # type: ignore[union-attr]
    assert await _rows(postgres_dsn, "SELECT pg_terminate_backend(%s)", (pid,)) == [(True,)]
    await actor.enqueue_many([_task("job")])
    assert len(await actor.claim(["default"], 1, now=T0 + 1, lease_until=T0 + 31)) == 1
    with anyio.fail_after(30):
        while True:  # each round: the listener is back and listening (or not yet), then a cancel goes out
            await waiter.wait_for_notices(timeout=0)
            assert await actor.cancel(["job"], now=T0 + 2) == ["job"]
            if Notice("cancel", "job") in await waiter.wait_for_notices(timeout=0.5):
                break
    assert waiter.listening


# -- a group in the caller's transaction ---------------------------------------------------------------------


async def test_enqueue_group_in_stores_a_group_only_if_the_callers_transaction_commits(
    open_pg: OpenPostgres, postgres_dsn: str
) -> None:
    backend = await open_pg()
    async with await psycopg.AsyncConnection.connect(postgres_dsn) as connection:
        async with connection.transaction():
            assert await backend.enqueue_group_in(connection, _group("rolled", 2)) == "rolled"
            assert await backend.get_group("rolled") is None, "not visible before the commit"
            raise psycopg.Rollback()  # ends the transaction block; the code after it runs
        assert await backend.get_group("rolled") is None  # type: ignore[unreachable]
        assert await backend.get("rolled-m0") is None

        await backend.enqueue_many([_task("kept-m1", payload=b"live")])
        with pytest.raises(DuplicateTaskError):
            await backend.enqueue_group_in(connection, _group("kept", 2))
        # The caller's transaction (opened by the call) is still usable: only the savepoint was undone.
        assert await backend.enqueue_group_in(connection, _group("later", 2)) == "later"
        await connection.commit()
    group = await backend.get_group("later")
    assert group is not None
    assert group.task_ids == ("later-m0", "later-m1")
    assert await backend.get_group("kept") is None
    assert await backend.get("kept-m0") is None
    with pytest.raises(TypeError, match=r"psycopg\.AsyncConnection"):
        await backend.enqueue_group_in(object(), _group("x", 1))
