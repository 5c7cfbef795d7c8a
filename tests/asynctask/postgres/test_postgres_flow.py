"""Flow control on PostgresBackend beyond the conformance suites: the migration of a store written by schema
version 1, limits held by concurrent claimers of several backend objects, the races of a debounce with a
settlement and of two enqueues opening one uniqueness window, wake-ups (resume, a freed slot), the outbox
with windows and debounce, and damaged values of the new columns. Times are explicit (``T0``), never slept."""

from __future__ import annotations

import random
import time

import anyio
import psycopg
import pytest
from psycopg import sql

from lifecycle.asynctask import (
    ClaimedTask,
    DuplicateTaskError,
    FlowLimits,
    NewTask,
    Settlement,
    TaskState,
)
from lifecycle.asynctask._backends.postgres import _schema as schema_module
from lifecycle.asynctask.postgres import PostgresBackend
from lifecycle.asynctask.testing import T0

from ._support import OpenPostgres, make_task
from ._support import layout as _layout
from ._support import rows as _rows
from ._support import task as _task

pytestmark = [pytest.mark.anyio, pytest.mark.postgres]

LEASE = 30.0


def _done(claimed: ClaimedTask, at: float) -> Settlement:
    return Settlement(task_id=claimed.record.id, token=claimed.token, state=TaskState.SUCCEEDED, at=at)


# -- the migration from schema version 1 ---------------------------------------------------------------------


async def test_a_store_written_by_schema_version_1_is_migrated_with_its_tasks(
    open_pg: OpenPostgres,
    postgres_dsn: str,
    pg_schema: str,
    unique_name: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Version 1 as the previous release created it, with a pending, an active and a finished task.
    monkeypatch.setattr(schema_module, "SCHEMA_VERSION", 1)
    async with await psycopg.AsyncConnection.connect(postgres_dsn, autocommit=True) as connection:
        assert await schema_module.ensure_schema(connection, pg_schema) == 1
    monkeypatch.undo()
    table = sql.Identifier(pg_schema, "lifecycle_tasks")
    insert = sql.SQL(
        "INSERT INTO {} (id, name, queue, payload, state, attempts, max_retries, enqueued_at, run_at, "
        "started_at, lease_until, token, finished_at) VALUES (%s, 'tests.job', 'default', 'p', %s, %s, 3, "
        "%s, %s, %s, %s, %s, %s)"
    ).format(table)
    for values in (
        ("old-pending", "pending", 0, T0, T0 + 1, None, None, None, None),
        ("old-active", "active", 1, T0, T0, T0 + 2, T0 + 60, "old-token", None),
        ("old-done", "succeeded", 1, T0, T0, T0 + 1, None, None, T0 + 2),
    ):
        await _rows(postgres_dsn, insert, values)

    backend = await open_pg()  # migrates
    assert await _rows(
        postgres_dsn, sql.SQL("SELECT version FROM {}").format(sql.Identifier(pg_schema, "lifecycle_schema"))
    ) == [(schema_module.SCHEMA_VERSION,)]
    for task_id in ("old-pending", "old-active", "old-done"):
        record = await backend.get(task_id)
        assert record is not None
        assert (record.priority, record.concurrency_key, record.expires_at, record.fault) == (
            0,
            None,
            None,
            None,
        )
    assert (
        await backend.settle([Settlement("old-active", "old-token", TaskState.SUCCEEDED, at=T0 + 3)]) == set()
    )
    await backend.enqueue_many([_task("new-urgent", enqueued_at=T0 + 1, priority=5)])
    claimed = await backend.claim(["default"], 10, now=T0 + 5, lease_until=T0 + 60)
    assert [c.record.id for c in claimed] == ["new-urgent", "old-pending"]
    await backend.pause("default")
    assert await backend.paused() == {"default"}

    # A schema created now has exactly the layout the migration produced.
    fresh = await open_pg(schema=unique_name + "_fresh")
    try:
        assert await _layout(postgres_dsn, fresh.schema) == await _layout(postgres_dsn, pg_schema)
    finally:
        await fresh.close()
        await _rows(postgres_dsn, sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(fresh.schema)))


# -- limits across backend objects ---------------------------------------------------------------------------


async def test_two_backend_objects_claiming_a_limited_name_at_once_never_exceed_its_limits(
    open_pg: OpenPostgres,
) -> None:
    """Two objects (two connection pools: as two processes), two claimers each, claim and settle in a loop
    with random small batches. A claimer forgets a task *before* settling it, so its own count never exceeds
    what the database counts: after every claim, the tasks held across all claimers must respect the limits.
    """
    first, second = await open_pg(pool_size=3), await open_pg(pool_size=3)
    limits = {
        "tests.capped": FlowLimits(max_running=3),
        "tests.keyed": FlowLimits(max_running_per_key=1),
    }
    tasks = [_task(f"cap{n:03d}", "tests.capped") for n in range(60)]
    tasks += [_task(f"key{n:03d}", "tests.keyed", concurrency_key=f"k{n % 4}") for n in range(60)]
    tasks += [_task(f"free{n:03d}") for n in range(30)]
    await first.enqueue_many(tasks)
    held: dict[str, ClaimedTask] = {}
    seen: list[str] = []
    rng = random.Random(13)

    def check() -> None:
        capped = [c for c in held.values() if c.record.name == "tests.capped"]
        assert len(capped) <= 3, f"max_running=3 exceeded: {sorted(held)}"
        keys = [c.record.concurrency_key for c in held.values() if c.record.name == "tests.keyed"]
        assert len(keys) == len(set(keys)), f"two tasks of one key at once: {sorted(held)}"

    async def claimer(backend: PostgresBackend) -> None:
        idle = 0
        while idle < 20:
            batch = await backend.claim(
                ["default"], rng.randint(1, 4), now=T0 + 1, lease_until=T0 + 600, limits=limits
            )
            for claimed in batch:
                held[claimed.record.id] = claimed
                seen.append(claimed.record.id)
            check()
            idle = 0 if batch or held else idle + 1
            if held:
                task_id = rng.choice(sorted(held))
                settled = held.pop(task_id)
                assert await backend.settle([_done(settled, T0 + 2)]) == set()
            await anyio.sleep(0)

    with anyio.fail_after(120):
        async with anyio.create_task_group() as group:
            for backend in (first, second, first, second):
                group.start_soon(claimer, backend)
    assert sorted(seen) == sorted(task.id for task in tasks), "every task ran exactly once"
    for name, limit in (("tests.capped", limits["tests.capped"]), ("tests.keyed", limits["tests.keyed"])):
        state = await second.flow_state(name, "k0", now=T0 + 3, limits=limit)
        assert (state.running, state.running_for_key) == (0, 0), "nothing is left counted"


async def test_a_rate_limit_shared_by_two_objects_claiming_at_once_hands_out_each_token_once(
    open_pg: OpenPostgres,
) -> None:
    first, second = await open_pg(pool_size=4), await open_pg(pool_size=4)
    limits = {"tests.rated": FlowLimits(rate=10, per=60.0)}
    await first.enqueue_many([_task(f"r{n:02d}", "tests.rated") for n in range(40)])
    claimed: list[str] = []

    async def claimer(backend: PostgresBackend, now: float) -> None:
        batch = await backend.claim(["default"], 3, now=now, lease_until=now + 600, limits=limits)
        claimed.extend(c.record.id for c in batch)

    with anyio.fail_after(60):
        for second_offset in (0.0, 30.0):  # 10 tokens at T0, then 5 refilled by T0 + 30
            async with anyio.create_task_group() as group:
                for n in range(8):
                    group.start_soon(claimer, first if n % 2 else second, T0 + second_offset)
    assert len(claimed) == 15
    assert len(set(claimed)) == 15
    assert claimed == sorted(claimed) or sorted(claimed) == [f"r{n:02d}" for n in range(15)]
    state = await first.flow_state("tests.rated", None, now=T0 + 30, limits=limits["tests.rated"])
    assert state.tokens == pytest.approx(0.0)
    assert state.refused >= 1


# -- expiry -------------------------------------------------------------------------------------------------


async def test_expired_tasks_at_the_head_take_no_room_in_a_claim_without_limits(
    backend_pg: PostgresBackend,
) -> None:
    await backend_pg.enqueue_many(
        [_task(f"gone{n}", priority=1, expires_at=T0 + 5) for n in range(5)]
        + [_task(f"live{n}", enqueued_at=T0 + 1) for n in range(3)]
    )
    claimed = await backend_pg.claim(["default"], 2, now=T0 + 10, lease_until=T0 + 60)
    assert [c.record.id for c in claimed] == ["live0", "live1"]
    states = {r.id: (r.state, r.last_error) for r in await backend_pg.list_records()}
    gone = (TaskState.CANCELLED, "expired before it started")
    assert states == {
        **{f"gone{n}": gone for n in range(5)},
        "live0": (TaskState.ACTIVE, None),
        "live1": (TaskState.ACTIVE, None),
        "live2": (TaskState.PENDING, None),
    }


@pytest.fixture
async def backend_pg(open_pg: OpenPostgres) -> PostgresBackend:
    return await open_pg()


# -- races --------------------------------------------------------------------------------------------------


async def test_a_debounce_racing_the_settlement_of_the_running_attempt_always_leaves_one_next_run(
    open_pg: OpenPostgres,
) -> None:
    """Whichever commits first, the debounce ends as the record's next pending run: as the follow-up the
    settlement applies, or as the replacement of the finished record."""
    worker, producer = await open_pg(), await open_pg()
    for round_ in range(15):
        task_id = f"d{round_}"
        await worker.enqueue_many([_task(task_id, payload=b"first")])
        (running,) = await worker.claim(["default"], 1, now=T0 + 1, lease_until=T0 + 60)
        debounce = _task(task_id, payload=b"second", enqueued_at=T0 + 2, run_at=T0 + 5)

        async def settle(running: ClaimedTask = running) -> None:
            assert await worker.settle([_done(running, T0 + 3)]) == set()

        async def enqueue(debounce: NewTask = debounce) -> None:
            assert await producer.enqueue_many([debounce], if_exists="debounce") == [debounce.id]

        async with anyio.create_task_group() as group:
            first, second = (settle, enqueue) if round_ % 2 else (enqueue, settle)
            group.start_soon(first)
            group.start_soon(second)
        record = await worker.get(task_id)
        assert record is not None
        assert (record.state, record.payload, record.attempts, record.run_at) == (
            TaskState.PENDING,
            b"second",
            0,
            T0 + 5,
        ), f"round {round_}"


async def test_two_enqueues_opening_one_uniqueness_window_at_once_store_exactly_one_task(
    open_pg: OpenPostgres,
) -> None:
    first, second = await open_pg(), await open_pg()
    for round_ in range(15):
        outcomes: list[str] = []

        async def enqueue(backend: PostgresBackend, task_id: str, key: str = f"window{round_}") -> None:
            task = _task(task_id, unique_key=key, unique_until=T0 + 60)
            try:
                await backend.enqueue_many([task])
            except DuplicateTaskError as exc:
                outcomes.append(f"refused {exc.task_id}")
            else:
                outcomes.append(f"stored {task_id}")

        async with anyio.create_task_group() as group:
            group.start_soon(enqueue, first, f"a{round_}")
            group.start_soon(enqueue, second, f"b{round_}")
        assert sorted(outcome.split()[0] for outcome in outcomes) == ["refused", "stored"], f"round {round_}"
        assert {outcome.split()[1] for outcome in outcomes} == {f"a{round_}", f"b{round_}"}


# -- the outbox ---------------------------------------------------------------------------------------------


async def test_the_outbox_opens_a_window_and_debounces_only_if_the_callers_transaction_commits(
    backend_pg: PostgresBackend, postgres_dsn: str
) -> None:
    windowed = _task("w1", unique_key="report", unique_until=T0 + 60)
    await backend_pg.enqueue_many([_task("d", payload=b"first", run_at=T0 + 5)])
    async with await psycopg.AsyncConnection.connect(postgres_dsn) as connection:
        await backend_pg.enqueue_many_in(connection, [windowed])
        await backend_pg.enqueue_many_in(connection, [_task("d", payload=b"second")], if_exists="debounce")
        await connection.rollback()
        assert await backend_pg.get("w1") is None
        record = await backend_pg.get("d")
        assert record is not None
        assert record.payload == b"first"
        assert await backend_pg.enqueue_many([_task("w2", unique_key="report", unique_until=T0 + 60)]) == [
            "w2"
        ]

        await backend_pg.enqueue_many_in(connection, [_task("d", payload=b"third")], if_exists="debounce")
        with pytest.raises(DuplicateTaskError):  # w2's window, committed: refused, only the savepoint undone
            await backend_pg.enqueue_many_in(
                connection, [_task("w3", unique_key="report", unique_until=T0 + 9)]
            )
        await connection.commit()
    record = await backend_pg.get("d")
    assert record is not None
    assert record.payload == b"third"
    assert await backend_pg.get("w3") is None


# -- wake-ups -----------------------------------------------------------------------------------------------


async def _returns(backend: PostgresBackend, queue: str, returned: anyio.Event) -> None:
    await backend.wait_for_work([queue], timeout=120)
    returned.set()


async def _notifications_delivered(backend: PostgresBackend, dsn: str) -> None:
    """Return once every notification committed so far has reached ``backend``'s listener (they arrive in
    commit order: seeing a marker sent now is enough)."""
    returned = anyio.Event()
    async with anyio.create_task_group() as group:
        group.start_soon(_returns, backend, "marker", returned)
        await anyio.wait_all_tasks_blocked()
        await _rows(dsn, "SELECT pg_notify(%s, 'marker')", (backend.channel,))
        await returned.wait()


async def test_a_paused_queue_does_not_wake_its_workers_and_resume_does(
    open_pg: OpenPostgres, postgres_dsn: str
) -> None:
    waiter = await open_pg(poll_interval=3600)  # only a notification can wake it
    operator = await open_pg()
    await operator.pause("default")
    await operator.enqueue_many([make_task("due")])
    returned = anyio.Event()
    with anyio.fail_after(20):
        await _notifications_delivered(waiter, postgres_dsn)  # the enqueue's own notification is no news
        async with anyio.create_task_group() as group:
            group.start_soon(_returns, waiter, "default", returned)
            await anyio.wait_all_tasks_blocked()
            assert not returned.is_set(), "a due task of a paused queue must not wake the worker"
            await operator.resume("default")
            await returned.wait()
    assert [c.record.id for c in await waiter.claim(["default"], 5, now=time.time(), lease_until=T0)] == [
        "due"
    ]


async def test_a_settled_task_of_a_name_limited_by_max_running_wakes_workers_of_other_processes(
    open_pg: OpenPostgres, postgres_dsn: str
) -> None:
    worker = await open_pg()
    idle = await open_pg(poll_interval=3600)
    limits = {"tests.capped": FlowLimits(max_running=1)}
    now = time.time()
    await worker.enqueue_many(
        [_task("c1", "tests.capped", enqueued_at=now), _task("c2", "tests.capped", enqueued_at=now)]
    )
    (running,) = await worker.claim(["default"], 5, now=now, lease_until=now + 60, limits=limits)
    assert await idle.claim(["default"], 5, now=now, lease_until=now + 60, limits=limits) == []
    with anyio.fail_after(20):
        await _notifications_delivered(idle, postgres_dsn)
        await idle.wait_for_work(["default"], timeout=120)  # c2 is due: reported once
        returned = anyio.Event()
        async with anyio.create_task_group() as group:
            group.start_soon(_returns, idle, "default", returned)
            await anyio.wait_all_tasks_blocked()
            assert not returned.is_set()
            assert await worker.settle([_done(running, now + 1)]) == set()
            await returned.wait()
    claimed = await idle.claim(["default"], 5, now=now + 2, lease_until=now + 60, limits=limits)
    assert [c.record.id for c in claimed] == ["c2"]


# -- damaged values -----------------------------------------------------------------------------------------


async def test_damaged_priority_and_expiry_fail_no_claim_and_read_with_their_fault(
    backend_pg: PostgresBackend, postgres_dsn: str, pg_schema: str
) -> None:
    await backend_pg.enqueue_many([_task(f"t{n}", enqueued_at=T0 + n) for n in range(3)])
    table = sql.Identifier(pg_schema, "lifecycle_tasks")
    await _rows(postgres_dsn, sql.SQL("UPDATE {} SET priority = %s WHERE id = 't0'").format(table), (2**62,))
    await _rows(postgres_dsn, sql.SQL("UPDATE {} SET expires_at = 'NaN' WHERE id = 't1'").format(table))
    for now, limits in ((T0 + 5, None), (T0 + 10, {"tests.job": FlowLimits(max_running=5)})):
        claimed = await backend_pg.claim(["default"], 10, now=now, lease_until=T0 + 60, limits=limits)
        faults = {c.record.id: c.record.fault for c in claimed}
        assert sorted(faults) == ["t0", "t1", "t2"]
        assert faults["t0"] is not None
        assert faults["t0"].startswith("field 'priority' holds 4611686018427387904")
        assert faults["t1"] is not None
        assert faults["t1"].startswith("field 'expires_at' holds nan")
        assert faults["t2"] is None
        releases = [
            Settlement(c.record.id, c.token, TaskState.PENDING, at=T0 + 6, run_at=T0 + 6, refund_attempt=True)
            for c in claimed
        ]
        assert await backend_pg.settle(releases) == set()
