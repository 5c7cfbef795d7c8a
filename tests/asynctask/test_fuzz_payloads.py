"""Fuzzing as a standing test: random and mutated payloads through ``JSONEncoding.decode`` and through the
real claim path of every backend.

Properties:

- ``JSONEncoding.decode`` returns a value or raises ``ValueError``, and nothing else, whatever the bytes.
- A worker that claims poisoned payloads stored beside healthy tasks survives; every healthy task succeeds;
  every payload that does not decode ends ``dead`` at its first attempt, with a reason naming the decode
  error; a payload that happens to decode runs like any task (succeeds, or is dead with the reason).

Memory and SQLite run on asyncio and trio; Redis and PostgreSQL on asyncio, under a unique prefix / schema,
skipped when the server is down (failed under ``LIFECYCLE_REQUIRE_SERVICES=1``). Hypothesis is derandomized
(the same examples on every run, so CI is deterministic) and the example counts are modest.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lifecycle import Backoff
from lifecycle.asynctask import (
    AsyncTasks,
    Backend,
    JSONEncoding,
    MemoryBackend,
    NewTask,
    SQLiteBackend,
    TaskInfo,
    TaskState,
)

WAIT = 20.0
TAGS = [
    "tuple", "dict", "set", "frozenset", "float", "bytes", "bytearray", "datetime", "date", "time",
    "timedelta", "uuid", "decimal", "obj", "enum",
]  # fmt: skip


@dataclasses.dataclass
class Point:
    x: int
    y: int


class Money:
    def __init__(self, cents: int, currency: str) -> None:
        self.cents, self.currency = cents, currency


def make_encoding() -> JSONEncoding:
    """An encoding with a registered dataclass and a hand-written codec, so fuzzed ``obj`` tags reach them."""
    encoding = JSONEncoding()
    encoding.register(Point, name="point")
    encoding.register(
        Money, name="money", encode=lambda m: [m.cents, m.currency], decode=lambda data: Money(*data)
    )
    return encoding


ENCODING = make_encoding()

# -- payload strategies --------------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=8,
)
arguments = st.recursive(
    st.none()
    | st.integers()
    | st.text(max_size=6)
    | st.binary(max_size=6)
    | st.decimals(allow_nan=False)
    | st.datetimes()
    | st.uuids()
    | st.builds(Point, st.integers(), st.integers()),
    lambda children: st.lists(children, max_size=3) | st.lists(children, max_size=3).map(tuple),
    max_leaves=6,
)
valid_payloads = st.lists(arguments, max_size=3).map(lambda args: ENCODING.encode(tuple(args)))


def _mutate(data: bytes, edits: list[tuple[str, int, int]]) -> bytes:
    buffer = bytearray(data)
    for kind, position, byte in edits:
        at = position % (len(buffer) + 1)
        if kind == "flip" and buffer:
            buffer[at % len(buffer)] ^= 1 << (byte % 8)
        elif kind == "set" and buffer:
            buffer[at % len(buffer)] = byte
        elif kind == "insert":
            buffer[at:at] = bytes([byte])
        elif kind == "delete" and buffer:
            del buffer[at % len(buffer)]
        elif kind == "truncate":
            del buffer[at:]
        elif kind == "splice":  # a fragment that means something to the decoder
            fragment = [
                b'{"__lifecycle__":',
                b'"decimal"',
                b'"obj"',
                b"[",
                b"{",
                b"]",
                b"}",
                b"\\u0000",
                b"1e999",
            ]
            buffer[at:at] = fragment[byte % len(fragment)]
    return bytes(buffer)


mutated_payloads = st.builds(
    _mutate,
    valid_payloads,
    st.lists(
        st.tuples(
            st.sampled_from(["flip", "set", "insert", "delete", "truncate", "splice"]),
            st.integers(0, 10_000),
            st.integers(0, 255),
        ),
        min_size=1,
        max_size=4,
    ),
)
tagged_payloads = st.builds(
    lambda tag, value, extra: json.dumps([{"__lifecycle__": tag, "v": value, **extra}]).encode(),
    st.one_of(
        st.sampled_from(TAGS), st.sampled_from(TAGS), st.sampled_from(TAGS), st.text(max_size=6), json_values
    ),
    json_values | st.text(max_size=30),
    st.dictionaries(
        st.sampled_from(["cls", "tz", "fold"]),
        st.sampled_from(["point", "money", "os:environ", "Europe/Paris", "../etc"]) | json_values,
        max_size=2,
    ),
)
deep_payloads = st.builds(
    lambda depth, shape: (shape[0] * depth + shape[1] + shape[2] * depth).encode(),
    st.integers(150, 3000),
    st.sampled_from([("[", "1", "]"), ('{"a":', "[]", "}"), ('{"__lifecycle__":"tuple","v":[', "0", "]}")]),
)
re_encoded_payloads = st.builds(
    lambda data, codec: data.decode().encode(codec),
    valid_payloads,
    st.sampled_from(["utf-16", "utf-16-be", "utf-32"]),
)
payloads = st.one_of(
    st.binary(max_size=80), mutated_payloads, tagged_payloads, deep_payloads, re_encoded_payloads
)


# -- JSONEncoding.decode -------------------------------------------------------------------------------------


@settings(max_examples=800, derandomize=True, database=None, deadline=None)
@given(payloads)
def test_decode_returns_a_value_or_raises_value_error_and_nothing_else(data: bytes) -> None:
    raised: BaseException | None = None
    try:
        ENCODING.decode(data)
    except BaseException as exc:  # anything but a plain ValueError is the bug sought
        raised = exc
    if raised is not None:
        assert type(raised) is ValueError, f"{type(raised).__name__}: {raised}"
        assert str(raised), "the error says what is wrong"


@settings(max_examples=200, derandomize=True, database=None, deadline=None)
@given(valid_payloads)
def test_valid_payloads_still_decode(data: bytes) -> None:
    assert isinstance(ENCODING.decode(data), tuple)


# -- the claim path of every backend -------------------------------------------------------------------------

BACKENDS = [
    ("asyncio", "memory"),
    ("trio", "memory"),
    ("asyncio", "sqlite"),
    ("trio", "sqlite"),
    ("asyncio", "redis"),  # redis-py, psycopg and nats-py are asyncio-only
    ("asyncio", "postgres"),
    ("asyncio", "nats"),
]


@pytest.fixture
async def store(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    """A fresh, unopened backend of ``kind``; a server store is deleted afterwards (what the test made)."""
    if kind == "memory":
        yield MemoryBackend()
    elif kind == "sqlite":
        yield SQLiteBackend(tmp_path / "fuzz.db", poll_interval=0.01)
    elif kind == "redis":
        from lifecycle.asynctask.redis import RedisBackend

        url, prefix = request.getfixturevalue("redis_url"), request.getfixturevalue("unique_name")
        yield RedisBackend(url, prefix=prefix)
        cleaner = RedisBackend(url, prefix=prefix)
        await cleaner.open()
        try:
            await cleaner.clear()
        finally:
            await cleaner.close()
    elif kind == "nats":
        from lifecycle.asynctask.nats import NatsBackend

        url, prefix = request.getfixturevalue("nats_url"), request.getfixturevalue("unique_name")
        yield NatsBackend(url, prefix=prefix)
        from tests.asynctask.nats.nats_servers import delete_streams

        await delete_streams(url, prefix)
    else:
        import psycopg
        from psycopg import sql

        from lifecycle.asynctask.postgres import PostgresBackend

        dsn, schema = request.getfixturevalue("postgres_dsn"), request.getfixturevalue("unique_name")
        yield PostgresBackend(dsn, schema=schema, poll_interval=0.05)
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as connection:
            await connection.execute(
                sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema))
            )


class Worker:
    """An executing AsyncTasks over the store, for the whole test (every example): it must survive all."""

    def __init__(self, tasks: AsyncTasks) -> None:
        self.tasks = tasks
        self.ended: BaseException | str | None = None

    async def execute(self) -> None:
        try:
            await self.tasks.execute()
            self.ended = "execute() returned"
        except BaseException as exc:
            self.ended = exc
            raise


@pytest.fixture
async def worker(store: Backend) -> AsyncIterator[Worker]:
    tasks = AsyncTasks(
        store,
        encoding=make_encoding(),
        concurrency=8,
        poll_interval=0.02,
        retry_backoff=Backoff(initial=0.0, cap=0.0, jitter=False),
    )

    @tasks.register(name="fuzz.echo")
    async def echo(value: object) -> object:
        return value

    running = Worker(tasks)
    async with tasks, anyio.create_task_group() as group:
        group.start_soon(running.execute)
        yield running
        group.cancel_scope.cancel()


def _expected(data: bytes) -> tuple[TaskState, str]:
    """What the worker must make of a payload: the state, and text its ``last_error`` must hold."""
    try:
        args = ENCODING.decode(data)
    except ValueError as exc:
        reason = f"cannot decode the arguments of task 'fuzz.echo': {exc}"
        return TaskState.DEAD, reason.replace("\x00", "\\x00")  # stored errors hold no NUL
    if isinstance(args, list | tuple) and len(args) == 1:
        return TaskState.SUCCEEDED, ""
    if isinstance(args, list | tuple):
        return TaskState.DEAD, "task 'fuzz.echo' takes 1 argument (value)"
    return TaskState.DEAD, f"the payload holds {type(args).__name__}, not an argument list"


@pytest.mark.parametrize(("anyio_backend", "kind"), BACKENDS, ids=[f"{kind}-{lib}" for lib, kind in BACKENDS])
@settings(
    max_examples=25,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(poisons=st.lists(payloads, min_size=1, max_size=4), healthy=st.integers(1, 3))
async def test_a_worker_survives_poisoned_payloads_on_every_backend(
    worker: Worker, poisons: list[bytes], healthy: int
) -> None:
    tasks = worker.tasks
    run = uuid.uuid4().hex[:8]
    now = time.time()

    def stored(task_id: str, payload: bytes) -> NewTask:
        return NewTask(
            id=task_id,
            name="fuzz.echo",
            queue="default",
            payload=payload,
            max_retries=0,
            timeout=None,
            enqueued_at=now,
            run_at=now,
        )

    good = [stored(f"{run}-ok-{i}", ENCODING.encode((f"ok-{i}",))) for i in range(healthy)]
    bad = [stored(f"{run}-poison-{i}", payload) for i, payload in enumerate(poisons)]
    mixed = [
        task for pair in zip(good + [None] * len(bad), bad + [None] * len(good)) for task in pair if task
    ]
    await tasks.backend.enqueue_many(mixed)  # raw: past every check enqueue() would make

    for index, task in enumerate(good):
        info = await _finished(tasks, task.id)
        assert (info.state, info.result, info.attempts) == (TaskState.SUCCEEDED, f"ok-{index}", 1)
    for task in bad:
        info = await _finished(tasks, task.id)
        state, reason = _expected(task.payload)
        payload = base64.b64encode(task.payload)[:200]
        assert info.state is state, f"payload (base64) {payload!r}: {info.last_error}"
        assert info.attempts == 1, payload
        if state is TaskState.DEAD:
            assert reason in (info.last_error or ""), f"payload (base64) {payload!r}: {info.last_error}"
    assert worker.ended is None, f"the worker ended: {worker.ended!r}"


async def _finished(tasks: AsyncTasks, task_id: str) -> TaskInfo:
    return await tasks.wait(task_id, timeout=WAIT)


def test_the_fuzzing_covers_every_backend_and_both_async_libraries() -> None:
    assert {kind for _, kind in BACKENDS} == {"memory", "sqlite", "redis", "postgres", "nats"}
    assert {(lib, kind) for lib, kind in BACKENDS if kind in ("memory", "sqlite")} == {
        (lib, kind) for lib in ("asyncio", "trio") for kind in ("memory", "sqlite")
    }
