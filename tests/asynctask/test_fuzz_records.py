"""Fuzzing stored records: hypothesis writes random raw values (wrong types, empty, huge, not UTF-8, NUL,
negative, NaN, ...) into random fields of stored task records, beside healthy tasks, and one real
``AsyncTasks`` worker then runs through the real claim path of SQLite (asyncio and trio), Redis, PostgreSQL
and memory (where only the engine-owned payload and meta can be damaged).

The property: the worker survives; every healthy task succeeds; no record vanishes from ``get``,
``list_records`` or ``stats``, and inspection never fails; every damaged record ends final (succeeded when
its values happened to be usable, dead with a reason otherwise; a reason that blames damage names a field
that was damaged), unless, readable, it legitimately waits (a future ``run_at``, a queue nobody serves, a
lease far ahead, retries left); a record the backend still cannot read after the run is dead.

Examples are derandomized (the same ones on every run) and few, so the file stays well under 30 s.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from lifecycle import Backoff
from lifecycle.asynctask import AsyncTasks, Backend, MemoryBackend, SQLiteBackend, TaskRecord, TaskState
from tests.asynctask.corruption import (
    FIELDS,
    NotUtf8Text,
    corrupt_nats,
    corrupt_postgres,
    corrupt_redis,
    corrupt_sqlite,
)

FUZZ = settings(
    max_examples=25,
    derandomize=True,
    database=None,
    deadline=None,
    phases=[Phase.explicit, Phase.generate],  # no shrinking: a failing example is reported as generated
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.function_scoped_fixture,
        HealthCheck.data_too_large,
    ],
)

HEALTHY = 3
LEASE = 5.0
SETTLE_WITHIN = 10.0

_SPECIAL: list[object] = [
    "",
    "\x00",
    "nan",
    "inf",
    "-1",
    "0",
    "1e999",
    "pending",
    "active",
    "succeeded",
    "dead",
    "cancelled",
    "default",
    "fuzz.job",
    "[]",
    "[1]",
    "null",
    '{"chain": {"id": 1, "step": "x"}}',
    "x" * 100_000,
    b"\xff" * 100_000,
    0,
    -1,
    2**31 - 1,
    2**31,
    2**63 - 1,
    2**63,
    -0.0,
    math.nan,
    math.inf,
    -math.inf,
    1e308,
]

RAW = st.one_of(
    st.none(),
    st.sampled_from(_SPECIAL),
    st.text(max_size=12),
    st.binary(max_size=12),
    st.binary(min_size=1, max_size=12).map(NotUtf8Text),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
)
"""A raw value to store in a field: every type a storage may hold, and then some it may refuse."""

DAMAGED_TASKS = st.lists(
    st.lists(st.tuples(st.sampled_from(FIELDS), RAW), min_size=1, max_size=2), min_size=1, max_size=2
)
"""One list of (field, raw value) per damaged task."""

KNOWN = [
    [[("attempts", "x")], [("max_retries", "x"), ("timeout", "soon")]],
    [[("name", NotUtf8Text(b"\xff\xfe"))], [("meta", b"\xff")]],
    [[("run_at", math.nan)], [("state", "active"), ("lease_until", None)]],
    [[("state", "bogus")], [("queue", b"\xff\xfe"), ("run_at", "1e999")]],
    [[("enqueued_at", "yesterday"), ("payload", None)], [("attempts", 2**31 - 1)]],
]
"""Damage every run tries besides the generated examples: the reports of issue 10, and the damage that
keeps a record from being claimed at all."""


def known(test: Callable[..., None]) -> Callable[..., None]:
    """``test`` with every :data:`KNOWN` example added."""
    for damages in KNOWN:
        test = example(damages=damages)(test)
    return test


@dataclass
class Storage:
    """How one backend is opened, damaged and emptied for a fuzz example."""

    open: Callable[[], Awaitable[Backend]]
    corrupt: Callable[[Backend, str, str, object], Awaitable[bool]]
    empty: Callable[[Backend], Awaitable[None]]
    fields: Sequence[str] = field(default=FIELDS)


def _run(storage: Storage, damages: list[list[tuple[str, object]]], library: str) -> None:
    anyio.run(_example, storage, damages, backend=library)


async def _example(storage: Storage, damages: list[list[tuple[str, object]]]) -> None:
    backend = await storage.open()
    try:
        await _check(backend, storage, damages)
    finally:
        with anyio.CancelScope(shield=True):
            await backend.close()


async def _check(backend: Backend, storage: Storage, damages: list[list[tuple[str, object]]]) -> None:
    final = {state: None for state in TaskState if state.is_final}
    tasks = AsyncTasks(
        backend,
        concurrency=8,
        lease=LEASE,
        recovery_interval=0.05,
        poll_interval=0.05,
        retry_backoff=Backoff(initial=0.0, cap=0.01),
        shutdown_grace=2.0,
        retention=final,
    )

    @tasks.register(name="fuzz.job", max_retries=0)
    async def job(n: int) -> int:
        return n * 2

    await tasks.initialize()
    try:
        healthy = [await tasks.enqueue(job, n) for n in range(HEALTHY)]
        damaged: dict[str, set[str]] = {}
        for n, changes in enumerate(damages):
            task_id = await tasks.enqueue(job, 100 + n)
            written = {name for name, raw in changes if name in storage.fields and await storage.corrupt(
                backend, task_id, name, raw
            )}  # fmt: skip
            damaged[task_id] = written
        everyone = [*healthy, *damaged]
        await _assert_nothing_vanished(tasks, backend, everyone)

        async with anyio.create_task_group() as group:
            group.start_soon(tasks.execute)
            with anyio.move_on_after(SETTLE_WITHIN):
                while not await _settled(backend, healthy, damaged, tasks.queues):
                    await anyio.sleep(0.02)  # polling storage for an outcome, under a deadline
            group.cancel_scope.cancel()
        if not await _settled(backend, healthy, damaged, tasks.queues):
            records = [await backend.get(task_id) for task_id in everyone]
            unsettled = [r for r in records if r is not None and r.state is not TaskState.SUCCEEDED]
            pytest.fail(f"not settled within {SETTLE_WITHIN} s (damaged: {damaged}): {unsettled}")

        for n, task_id in enumerate(healthy):
            info = await tasks.info(task_id)
            assert info is not None
            assert (info.state, info.result) == (TaskState.SUCCEEDED, n * 2), info
        for task_id, written in damaged.items():
            record = await backend.get(task_id)
            assert record is not None
            _assert_outcome(record, written, tasks.queues)
        await _assert_nothing_vanished(tasks, backend, everyone)
    finally:
        with anyio.CancelScope(shield=True):
            await storage.empty(backend)
            await tasks.cleanup()


async def _assert_nothing_vanished(tasks: AsyncTasks, backend: Backend, task_ids: list[str]) -> None:
    listed = {record.id for record in await backend.list_records(limit=1000)}
    assert set(task_ids) <= listed, f"records vanished from list_records(): {set(task_ids) - listed}"
    for task_id in task_ids:
        assert await backend.get(task_id) is not None, f"get({task_id!r}) returned None"
    counted = sum(count for counts in (await backend.stats()).values() for count in counts.values())
    assert counted == len(task_ids), f"stats() counts {counted} records, {len(task_ids)} are stored"
    infos = await tasks.list(limit=1000)  # the inspection path (TaskInfo) never fails on a damaged record
    assert {info.id for info in infos} >= set(task_ids)


_SELECTED_BY = {TaskState.PENDING: ("state", "queue", "run_at"), TaskState.ACTIVE: ("state", "lease_until")}


def _waits(record: TaskRecord, queues: Sequence[str], now: float) -> bool:
    """A record that legitimately is not final yet: it waits in a queue this worker does not serve, for a
    future ``run_at``, for a lease held far ahead, or (readable) for more retries. A record whose fields it
    is selected by (its state, queue and run_at when pending, lease_until when active) cannot be read never
    waits: recovery must end it."""
    selected_by = _SELECTED_BY.get(record.state, ())
    if record.fault is not None and any(f"field {name!r}" in record.fault for name in selected_by):
        return False
    if record.state is TaskState.PENDING:
        if record.queue not in queues or record.run_at > now + 1:
            return True
        retrying = record.attempts <= record.max_retries and record.last_error is not None
        return retrying and record.max_retries > 3 and record.fault is None
    if record.state is TaskState.ACTIVE:
        return record.lease_until is not None and record.lease_until > now + LEASE + 1
    return False


async def _settled(
    backend: Backend, healthy: list[str], damaged: dict[str, set[str]], queues: Sequence[str]
) -> bool:
    now = time.time()
    for task_id in healthy:
        record = await backend.get(task_id)
        if record is None or record.state is not TaskState.SUCCEEDED:
            return False
    for task_id in damaged:
        record = await backend.get(task_id)
        assert record is not None, f"the damaged record {task_id!r} vanished"
        if not record.state.is_final and not _waits(record, queues, now):
            return False
    return True


def _assert_outcome(record: TaskRecord, written: set[str], queues: Sequence[str]) -> None:
    """The damaged record's end, given the fields that were damaged (``written``)."""
    if not record.state.is_final:
        assert _waits(record, queues, time.time()), f"not final and not legitimately waiting: {record}"
        return
    if record.fault is not None:
        assert record.state is TaskState.DEAD or "state" in written, (
            f"a record the backend cannot read must end dead, got {record.state}: {record.fault}"
        )
    if record.state is TaskState.DEAD and "state" not in written:
        assert record.last_error, f"a dead record must say why: {record}"
    error = record.last_error or ""
    if "is damaged (field " in error:  # the verdict on a record the backend could not read
        blamed = {name for name in FIELDS if f"field {name!r}" in error}
        allowed = written | ({"lease_until"} if "state" in written else set())
        assert blamed, f"the damage reason names no field: {error}"
        assert blamed <= allowed, f"blames {blamed - allowed}, but only {written} were damaged: {error}"


# -- the storages -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("library", ["asyncio", "trio"])
@FUZZ
@known
@given(damages=DAMAGED_TASKS)
def test_sqlite_survives_damaged_records(tmp_path: Path, library: str, damages: Any) -> None:
    async def open_backend() -> Backend:
        backend = SQLiteBackend(tmp_path / f"{uuid.uuid4().hex}.db", poll_interval=0.02)
        await backend.open()
        return backend

    async def corrupt(backend: Backend, task_id: str, name: str, raw: object) -> bool:
        assert isinstance(backend, SQLiteBackend)
        return await corrupt_sqlite(backend.path, task_id, name, raw)

    async def empty(backend: Backend) -> None:
        pass  # a fresh file per example

    _run(Storage(open_backend, corrupt, empty), damages, library)


@pytest.mark.redis
@FUZZ
@known
@given(damages=DAMAGED_TASKS)
def test_redis_survives_damaged_records(redis_url: str, unique_name: str, damages: Any) -> None:
    import redis.asyncio as aioredis

    from lifecycle.asynctask.redis import RedisBackend

    async def open_backend() -> Backend:
        backend = RedisBackend(redis_url, prefix=unique_name)
        await backend.open()
        return backend

    async def corrupt(backend: Backend, task_id: str, name: str, raw: object) -> bool:
        assert isinstance(backend, RedisBackend)
        client = aioredis.Redis.from_url(redis_url)
        try:
            return await corrupt_redis(client, backend.key_prefix, task_id, name, raw)
        finally:
            await client.aclose()

    async def empty(backend: Backend) -> None:
        assert isinstance(backend, RedisBackend)
        await backend.clear()

    _run(Storage(open_backend, corrupt, empty), damages, "asyncio")


@pytest.mark.nats
@FUZZ
@known
@given(damages=DAMAGED_TASKS)
def test_nats_survives_damaged_records(nats_url: str, unique_name: str, damages: Any) -> None:
    from lifecycle.asynctask.nats import NatsBackend

    async def open_backend() -> Backend:
        backend = NatsBackend(nats_url, prefix=unique_name)
        await backend.open()
        return backend

    async def corrupt(backend: Backend, task_id: str, name: str, raw: object) -> bool:
        assert isinstance(backend, NatsBackend)
        return await corrupt_nats(nats_url, backend.prefix, task_id, name, raw)

    async def empty(backend: Backend) -> None:
        assert isinstance(backend, NatsBackend)
        await backend.clear()

    _run(Storage(open_backend, corrupt, empty), damages, "asyncio")


@pytest.fixture
def fuzz_schema(postgres_dsn: str, unique_name: str) -> Any:
    """A schema for the PostgreSQL fuzz examples, dropped afterwards."""
    import psycopg
    from psycopg import sql

    yield unique_name
    with psycopg.connect(postgres_dsn, autocommit=True) as connection:
        connection.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(unique_name)))


@pytest.mark.postgres
@FUZZ
@known
@given(damages=DAMAGED_TASKS)
def test_postgres_survives_damaged_records(postgres_dsn: str, fuzz_schema: str, damages: Any) -> None:
    from lifecycle.asynctask.postgres import PostgresBackend

    async def open_backend() -> Backend:
        backend = PostgresBackend(postgres_dsn, schema=fuzz_schema)
        await backend.open()
        return backend

    async def corrupt(backend: Backend, task_id: str, name: str, raw: object) -> bool:
        return await corrupt_postgres(postgres_dsn, fuzz_schema, task_id, name, raw)

    async def empty(backend: Backend) -> None:
        await backend.purge(states=list(TaskState))

    _run(Storage(open_backend, corrupt, empty), damages, "asyncio")


@pytest.mark.parametrize("library", ["asyncio", "trio"])
@FUZZ
@known
@given(damages=DAMAGED_TASKS)
def test_memory_survives_damaged_payloads_and_meta(library: str, damages: Any) -> None:
    async def open_backend() -> Backend:
        return MemoryBackend()

    async def corrupt(backend: Backend, task_id: str, name: str, raw: object) -> bool:
        # A MemoryBackend holds what the engine gave it: only the engine-owned payload and meta can be wrong.
        row = backend._rows[task_id]  # type: ignore[attr-defined]
        if name == "payload" and isinstance(raw, bytes):
            row.payload = bytes(raw)
        elif name == "meta" and (raw is None or isinstance(raw, str)):
            row.meta = raw
        else:
            return False
        return True

    async def empty(backend: Backend) -> None:
        pass

    _run(Storage(open_backend, corrupt, empty, fields=("payload", "meta")), damages, library)
