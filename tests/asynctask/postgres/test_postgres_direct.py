"""The single enqueue's INSERT runs through libpq (``DirectStatement``, on psycopg's ``connection.pgconn``):
it stores what psycopg's path stores, it leaves every error to psycopg's path (which raises it as before), it
prepares its statement again when the server lost it, and an interrupted or broken call does not break the
backend's connections."""

from __future__ import annotations

import asyncio
import dataclasses
import struct
import time
from typing import Any

import anyio
import psycopg
import psycopg.errors
import pytest
from psycopg import sql

from lifecycle.asynctask import DuplicateTaskError, NewTask, TaskState
from lifecycle.asynctask._backends.postgres import _ops
from lifecycle.asynctask._backends.postgres._direct import DirectStatement, numbered
from lifecycle.asynctask._backends.postgres._sql import NOTIFY_PAYLOAD_LIMIT

from ._support import OpenPostgres
from ._support import make_task as make_chosen_task

pytestmark = [pytest.mark.anyio, pytest.mark.postgres]


def _insert_one_by_psycopg(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """The texts of the statements psycopg's cursors execute from now on."""
    executed: list[bytes] = []
    execute = psycopg.AsyncCursor.execute

    async def recording(cursor: Any, query: Any, *args: Any, **kwargs: Any) -> Any:
        executed.append(query if isinstance(query, bytes) else str(query).encode())
        return await execute(cursor, query, *args, **kwargs)

    monkeypatch.setattr(psycopg.AsyncCursor, "execute", recording)
    return executed


def _generated(task: NewTask) -> NewTask:
    """``task`` as the engine makes it when the caller gives no id."""
    return dataclasses.replace(task, generated_id=True)


def make_task(task_id: str) -> NewTask:
    """A task whose id the engine generated (``insert_one``; ``make_chosen_task`` for a caller's id)."""
    return _generated(make_chosen_task(task_id))


def _full_task(task_id: str, now: float) -> NewTask:
    return NewTask(
        id=task_id,
        name="tests.jöb ✓",
        queue="quëue",
        payload=b"\x00\xffpayload",
        max_retries=2**31 - 1,
        timeout=2.5,
        enqueued_at=now,
        run_at=now + 1.25,
        meta='{"chain": "ü"}',
        priority=-(10**15) + 1,
        concurrency_key="key ✓",
        expires_at=now + 60.5,
        group_id="group-1",
    )


async def test_a_single_enqueue_goes_through_libpq_and_stores_what_psycopg_s_path_stores(
    open_pg: OpenPostgres, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = await open_pg()
    await backend.enqueue_many([make_task("warm-up")])
    executed = _insert_one_by_psycopg(monkeypatch)
    now = time.time()
    assert await backend.enqueue_many([_full_task("direct", now)]) == ["direct"]
    assert await backend.enqueue_many([_generated(_full_task("direct-g", now))]) == ["direct-g"]
    for n in range(3):
        assert await backend.enqueue_many([make_chosen_task(f"t{n}")]) == [f"t{n}"]
        assert await backend.enqueue_many([make_task(f"g{n}")]) == [f"g{n}"]
    assert backend._statements.insert_one not in executed, "the single enqueue runs through libpq"
    assert backend._statements.insert_one_new not in executed, "with a chosen id too"
    # The same tasks through psycopg's path (the backend without its direct statements) are stored alike.
    backend._insert_one = backend._insert_one_new = None
    assert await backend.enqueue_many([_full_task("psycopg", now)]) == ["psycopg"]
    assert await backend.enqueue_many([_generated(_full_task("psycopg-g", now))]) == ["psycopg-g"]
    assert executed.count(backend._statements.insert_one_new) == 1, "a chosen id: ON CONFLICT"
    assert executed.count(backend._statements.insert_one) == 1, "a generated id: a plain INSERT"
    direct, by_psycopg = await backend.get("direct"), await backend.get("psycopg")
    assert direct is not None
    assert by_psycopg is not None
    fields = {name: getattr(direct, name) for name in direct.__dataclass_fields__ if name != "id"}
    assert fields == {name: getattr(by_psycopg, name) for name in fields}
    for key in ("direct-g", "psycopg-g"):
        stored = await backend.get(key)
        assert stored is not None
        assert {name: getattr(stored, name) for name in fields} == fields
    assert direct.fault is None
    assert direct.payload == b"\x00\xffpayload"
    assert direct.priority == -(10**15) + 1
    assert direct.max_retries == 2**31 - 1


def test_the_single_enqueue_s_parameters_are_its_row_s_values_in_binary() -> None:
    """``_insert_one_params`` builds the single enqueue's parameters from the task in one pass: the values
    of its row (``_new_task_row``) in binary, and ``None`` (psycopg's path) for what libpq is not given."""
    now = time.time()
    full = _full_task("full", now)
    for task in (full, make_task("plain"), dataclasses.replace(full, timeout=3, expires_at=int(now))):
        row = _ops._new_task_row(task)
        params = _ops._insert_one_params(task, "channel")
        assert params is not None
        assert params[:4] == [row[0].encode(), row[1].encode(), row[2].encode(), row[3]]
        assert params[4] == struct.pack("!i", row[4])
        for index in (5, 6, 7, 11):  # timeout, enqueued_at, run_at, expires_at
            assert params[index] == (None if row[index] is None else struct.pack("!d", row[index]))
        assert params[9] == struct.pack("!q", row[9])
        for index in (8, 10, 12):  # meta, concurrency_key, group_id
            assert params[index] == (None if row[index] is None else row[index].encode())
        assert params[13:] == [b"channel", row[2].encode()]
    long_queue = _ops._insert_one_params(dataclasses.replace(full, queue="q" * NOTIFY_PAYLOAD_LIMIT), "c")
    assert long_queue is not None
    assert long_queue[-1] == b"*", "a queue name too long for a payload wakes every waiter"
    assert _ops._insert_one_params(dataclasses.replace(full, priority=2**63), "c") is None
    assert _ops._insert_one_params(dataclasses.replace(full, meta="a\ud800"), "c") is None


@pytest.mark.parametrize(
    ("field", "value"),
    [("name", "a\x00b"), ("timeout", "soon"), ("max_retries", None), ("payload", 3.5), ("run_at", None)],
)
def test_the_single_enqueue_s_parameters_refuse_what_its_row_refuses(field: str, value: object) -> None:
    values: dict[str, Any] = {field: value}
    bad = dataclasses.replace(make_task("bad"), **values)
    with pytest.raises(Exception) as by_row:
        _ops._new_task_row(bad)
    with pytest.raises(Exception) as in_one_pass:
        _ops._insert_one_params(bad, "channel")
    assert type(in_one_pass.value) is type(by_row.value)
    assert str(in_one_pass.value) == str(by_row.value)


async def test_a_direct_statement_that_failed_is_not_run_directly_again_in_the_same_call(
    open_pg: OpenPostgres, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The server's error is left to psycopg's path, which runs the statement once more and raises it: the
    # general path after the single enqueue's must not send it directly a second time first.
    backend = await open_pg()
    first = make_task("same")
    assert await backend.enqueue_many([first]) == ["same"]
    runs: list[bytes] = []
    run = DirectStatement.run

    async def counting(statement: DirectStatement, connection: Any, params: Any) -> Any:
        runs.append(params[0])
        return await run(statement, connection, params)

    monkeypatch.setattr(DirectStatement, "run", counting)
    with pytest.raises(DuplicateTaskError):
        await backend.enqueue_many([dataclasses.replace(first, payload=b"other")])
    assert runs == [b"same"], "one direct run, then psycopg's"
    assert await backend.enqueue_many([make_task("next")]) == ["next"]
    assert runs == [b"same", b"next"]


async def test_an_existing_id_is_refused_or_skipped_as_before(open_pg: OpenPostgres) -> None:
    backend = await open_pg()
    assert await backend.enqueue_many([make_chosen_task("same")]) == ["same"]
    assert await backend.enqueue_many([make_chosen_task("same")], if_exists="skip") == []
    with pytest.raises(Exception, match="already"):
        await backend.enqueue_many([make_chosen_task("same")])


async def test_a_generated_id_that_exists_fails_the_plain_insert_and_is_sorted_out(
    open_pg: OpenPostgres, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No ON CONFLICT for an id the engine generated: the server neither probes the primary key first nor
    # confirms a speculative insertion. Should such an id exist after all, the checked path sorts it out.
    backend = await open_pg()
    assert b"ON CONFLICT" not in backend._statements.insert_one
    first = make_task("same")
    assert await backend.enqueue_many([first]) == ["same"]
    executed = _insert_one_by_psycopg(monkeypatch)
    with pytest.raises(DuplicateTaskError):
        await backend.enqueue_many([dataclasses.replace(first, payload=b"other")])
    assert executed.count(backend._statements.insert_one) == 1, "the failed statement, run again by psycopg"
    stored = await backend.get("same")
    assert stored is not None
    assert stored.payload == first.payload, "the stored task is untouched"
    assert await backend.enqueue_many([make_task("next")]) == ["next"]
    assert executed.count(backend._statements.insert_one) == 1, "then the direct path again"
    assert await backend.stats() == {"default": {TaskState.PENDING: 2}}


async def test_a_chosen_id_that_exists_stores_nothing_without_a_server_error(
    open_pg: OpenPostgres, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A caller's id exists when the caller enqueues the same work again: the direct INSERT's ON CONFLICT
    # stores nothing, with no error for the server to log and no failed statement to run again.
    backend = await open_pg()
    assert b"ON CONFLICT (id) DO NOTHING" in backend._statements.insert_one_new
    first = make_chosen_task("same")
    assert await backend.enqueue_many([first]) == ["same"]
    executed = _insert_one_by_psycopg(monkeypatch)
    assert await backend.enqueue_many([dataclasses.replace(first, payload=b"other")], if_exists="skip") == []
    with pytest.raises(DuplicateTaskError):
        await backend.enqueue_many([dataclasses.replace(first, payload=b"other")])
    assert backend._statements.insert_one_new not in executed, "no failed statement run again by psycopg"
    assert backend._statements.insert_one not in executed
    stored = await backend.get("same")
    assert stored is not None
    assert stored.payload == first.payload, "the stored task is untouched"
    assert await backend.stats() == {"default": {TaskState.PENDING: 1}}


@pytest.mark.parametrize(
    ("field", "value", "error"),
    [
        ("priority", 2**63, psycopg.errors.NumericValueOutOfRange),
        ("max_retries", 2**31, psycopg.errors.NumericValueOutOfRange),
    ],
)
async def test_a_value_libpq_is_not_given_goes_through_psycopg_with_its_error(
    open_pg: OpenPostgres, field: str, value: object, error: type[Exception]
) -> None:
    backend = await open_pg()
    await backend.enqueue_many([make_task("warm-up")])
    base = make_task("out-of-range")
    bad = NewTask(**{**{name: getattr(base, name) for name in base.__dataclass_fields__}, field: value})
    with pytest.raises(error):
        await backend.enqueue_many([bad])
    assert await backend.enqueue_many([make_task("after")]) == ["after"]


async def test_text_utf8_cannot_encode_fails_as_through_psycopg(open_pg: OpenPostgres) -> None:
    backend = await open_pg()
    await backend.enqueue_many([make_task("warm-up")])
    base = make_task("surrogate")
    bad = NewTask(**{**{name: getattr(base, name) for name in base.__dataclass_fields__}, "name": "a\ud800"})
    with pytest.raises(Exception) as direct:
        await backend.enqueue_many([bad])
    backend._insert_one = None
    with pytest.raises(Exception) as by_psycopg:
        await backend.enqueue_many([bad])
    assert type(direct.value) is type(by_psycopg.value)


async def test_a_server_error_is_raised_by_psycopg_and_the_next_enqueue_goes_direct_again(
    open_pg: OpenPostgres, postgres_dsn: str, pg_schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = await open_pg()
    await backend.enqueue_many([make_task("warm-up")])
    async with await psycopg.AsyncConnection.connect(postgres_dsn, autocommit=True) as connection:
        await connection.execute(
            sql.SQL("ALTER TABLE {} ADD CONSTRAINT no_bad CHECK (id <> 'bad')").format(
                sql.Identifier(pg_schema, "lifecycle_tasks")
            )
        )
    executed = _insert_one_by_psycopg(monkeypatch)
    with pytest.raises(psycopg.errors.CheckViolation) as raised:
        await backend.enqueue_many([make_task("bad")])
    assert raised.value.diag.constraint_name == "no_bad", "psycopg's error, with its diagnostics"
    assert executed.count(backend._statements.insert_one) == 1, "the failed statement, run again by psycopg"
    assert await backend.enqueue_many([make_task("good")]) == ["good"]
    assert executed.count(backend._statements.insert_one) == 1, "then the direct path again"
    assert await backend.get("bad") is None


def _count_socket_registrations(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """How often the running event loop is asked to watch a socket for reading, or to stop, from now on."""
    loop = asyncio.get_running_loop()
    calls = {"add_reader": 0, "remove_reader": 0}
    add_reader, remove_reader = loop.add_reader, loop.remove_reader

    def counting_add(fd: Any, callback: Any, *args: Any) -> None:
        calls["add_reader"] += 1
        add_reader(fd, callback, *args)

    def counting_remove(fd: Any) -> bool:
        calls["remove_reader"] += 1
        return remove_reader(fd)

    monkeypatch.setattr(loop, "add_reader", counting_add)
    monkeypatch.setattr(loop, "remove_reader", counting_remove)
    return calls


async def test_single_enqueues_on_a_lease_keep_its_socket_watched_from_one_to_the_next(
    open_pg: OpenPostgres, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Registering the socket with the event loop and removing it again was a quarter of a single enqueue's
    client instructions: the direct statements register a lease's socket once."""
    backend = await open_pg()
    await backend.enqueue_many([make_task("warm-up")])
    calls = _count_socket_registrations(monkeypatch)
    for n in range(5):
        assert await backend.enqueue_many([make_task(f"t{n}")]) == [f"t{n}"]
    assert calls == {"add_reader": 0, "remove_reader": 0}


async def test_psycopg_s_calls_between_direct_enqueues_on_a_lease_wait_on_its_socket_as_before(
    open_pg: OpenPostgres, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker's calls (psycopg's waits) and single enqueues alternate on one lease: the direct statements'
    watch ends before psycopg waits on the socket and starts again at the next enqueue, so neither loses its
    wake-up (a watch psycopg had replaced and removed would leave the next enqueue waiting forever)."""
    backend = await open_pg()
    await backend.enqueue_many([make_task("warm-up")])
    calls = _count_socket_registrations(monkeypatch)
    with anyio.fail_after(10):
        for n in range(3):
            assert await backend.enqueue_many([make_task(f"t{n}")]) == [f"t{n}"]
            claimed = await backend.claim(["default"], 10, now=1e10, lease_until=1e10 + 30)
            assert [c.record.id for c in claimed] == (["warm-up", "t0"] if n == 0 else [f"t{n}"])
        assert await backend.enqueue_many([make_task("last")]) == ["last"]
    assert calls["add_reader"] >= 3, "psycopg's own waits, and the watch started again after them"


async def test_a_statement_the_server_lost_is_prepared_again(
    open_pg: OpenPostgres, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = await open_pg(pool_size=2)  # one lease: every call below takes the same connection
    await backend.enqueue_many([make_task("warm-up")])
    async with backend._connection() as connection:
        await connection.execute("DEALLOCATE ALL")
    executed = _insert_one_by_psycopg(monkeypatch)
    assert await backend.enqueue_many([make_task("after-deallocate")]) == ["after-deallocate"]
    for n in range(3):
        assert await backend.enqueue_many([make_task(f"t{n}")]) == [f"t{n}"]
    assert backend._statements.insert_one not in executed, "prepared again in the call that found it gone"
    assert {r.id for r in await backend.list_records()} == {"warm-up", "after-deallocate", "t0", "t1", "t2"}


async def _slow_inserts(dsn: str, schema: str) -> None:
    """Make the insert of a task with the id ``slow`` take a second (a trigger sleeping)."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as connection:
        await connection.execute(
            sql.SQL(
                "CREATE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                "IF NEW.id = 'slow' THEN PERFORM pg_sleep(1); END IF; RETURN NEW; END $$; "
                "CREATE TRIGGER slow BEFORE INSERT ON {tasks} FOR EACH ROW EXECUTE FUNCTION {function}()"
            ).format(
                function=sql.Identifier(schema, "slow_insert"),
                tasks=sql.Identifier(schema, "lifecycle_tasks"),
            )
        )


async def test_an_enqueue_cancelled_mid_statement_leaves_the_backend_s_connections_working(
    open_pg: OpenPostgres, postgres_dsn: str, pg_schema: str
) -> None:
    backend = await open_pg(pool_size=2)
    await backend.enqueue_many([make_task("warm-up")])
    await _slow_inserts(postgres_dsn, pg_schema)
    with anyio.move_on_after(0.2) as scope:
        await backend.enqueue_many([make_task("slow")])
    assert scope.cancelled_caught
    with anyio.fail_after(10):
        for n in range(5):
            assert await backend.enqueue_many([make_task(f"t{n}")]) == [f"t{n}"]
    assert backend._pool is not None
    assert backend._pool.get_stats()["pool_size"] <= 2


async def _sleeping_insert_pids(dsn: str, schema: str) -> list[int]:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as connection:
        cursor = await connection.execute(
            "SELECT pid FROM pg_stat_activity WHERE wait_event = 'PgSleep' AND strpos(query, %s) > 0 "
            "AND pid <> pg_backend_pid()",
            (schema,),
        )
        return [row[0] for row in await cursor.fetchall()]


async def test_an_enqueue_cancelled_by_asyncio_mid_statement_is_cancelled_on_the_server(
    open_pg: OpenPostgres, postgres_dsn: str, pg_schema: str
) -> None:
    """As through psycopg's cursor: the server is asked to cancel the statement, so a caller that gave up
    (``asyncio.wait_for``, ``task.cancel()``) does not find the task stored later."""
    backend = await open_pg(pool_size=2)
    await backend.enqueue_many([make_task("warm-up")])
    await _slow_inserts(postgres_dsn, pg_schema)
    enqueue = asyncio.ensure_future(backend.enqueue_many([make_task("slow")]))
    with anyio.fail_after(10):
        while not await _sleeping_insert_pids(postgres_dsn, pg_schema):
            await anyio.sleep(0.01)
    enqueue.cancel()
    with pytest.raises(asyncio.CancelledError):
        await enqueue
    with anyio.fail_after(10):  # the statement has ended on the server, one way or the other
        while await _sleeping_insert_pids(postgres_dsn, pg_schema):
            await anyio.sleep(0.01)
    assert await backend.get("slow") is None, "the cancelled INSERT rolled back"
    assert backend._pool is not None
    assert backend._pool.get_stats().get("connections_lost", 0) == 0


async def test_a_connection_killed_mid_statement_raises_operational_error_and_the_next_call_works(
    open_pg: OpenPostgres, postgres_dsn: str, pg_schema: str
) -> None:
    backend = await open_pg(pool_size=2)
    await backend.enqueue_many([make_task("warm-up")])
    await _slow_inserts(postgres_dsn, pg_schema)

    async def kill_soon() -> None:
        await anyio.sleep(0.2)
        async with await psycopg.AsyncConnection.connect(postgres_dsn, autocommit=True) as connection:
            await connection.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE wait_event = 'PgSleep' "
                "AND strpos(query, %s) > 0 AND pid <> pg_backend_pid()",
                (pg_schema,),
            )

    async with anyio.create_task_group() as group:
        group.start_soon(kill_soon)
        with pytest.raises(psycopg.OperationalError):
            await backend.enqueue_many([make_task("slow")])
    with anyio.fail_after(10):
        assert await backend.enqueue_many([make_task("after")]) == ["after"]


def test_numbered_placeholders() -> None:
    assert numbered(b"SELECT %s, %b, '100%%'") == (b"SELECT $1, $2, '100%'", 2)
    with pytest.raises(ValueError, match="placeholder"):
        numbered(b"SELECT %x")


async def test_the_single_enqueue_s_wake_up_names_its_queue_or_everyone_past_the_payload_limit(
    open_pg: OpenPostgres, postgres_dsn: str
) -> None:
    # The single enqueue's statements take the wake-up's payload as a parameter, NOTIFY_QUEUE's rule applied
    # by the client: the queue's name, or "*" (wake every waiter) from 7900 bytes of UTF-8 on; both paths,
    # both statements. A chosen id that exists stores nothing and wakes nobody.
    backend = await open_pg()
    await backend.enqueue_many([make_task("warm-up")])
    fits, too_long = "é" * 3949 + "a", "é" * 3950  # 7899 and 7900 bytes, fewer characters
    queues = ["quëue", fits, too_long]
    async with await psycopg.AsyncConnection.connect(postgres_dsn, autocommit=True) as listener:
        await listener.execute(sql.SQL("LISTEN {}").format(sql.Identifier(backend.channel)))
        expected: list[str] = []
        for path in ("direct", "psycopg"):
            if path == "psycopg":
                backend._insert_one = backend._insert_one_new = None
            for n, queue in enumerate(queues):
                generated = make_task(f"{path}-g{n}")
                chosen = make_chosen_task(f"{path}-c{n}")
                for task in (
                    dataclasses.replace(generated, queue=queue),
                    dataclasses.replace(chosen, queue=queue),
                ):
                    assert await backend.enqueue_many([task]) == [task.id]
                    expected.append(queue if queue != too_long else "*")
            again = dataclasses.replace(make_chosen_task(f"{path}-c0"), queue="quëue")
            assert await backend.enqueue_many([again], if_exists="skip") == []
        await _execute(postgres_dsn, "SELECT pg_notify(%s, 'marker')", (backend.channel,))
        payloads: list[str] = []
        with anyio.fail_after(10):
            async for notify in listener.notifies():
                if notify.payload == "marker":
                    break
                payloads.append(notify.payload)
    assert payloads == expected
    assert len(fits.encode()) == 7899
    assert len(too_long.encode()) == 7900
    for queue in queues:
        assert (await backend.stats())[queue] == {TaskState.PENDING: 4}


async def _execute(dsn: str, query: str, params: tuple[object, ...]) -> None:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as connection:
        await connection.execute(query, params)
