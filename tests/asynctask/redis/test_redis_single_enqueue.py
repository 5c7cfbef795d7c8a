"""The single enqueue's lean path: a task whose id the engine generated is stored by a script that looks for
no record with its id, in fewer server commands; a retry after a lost reply, an id a caller or a hook chose, a
uniqueness window and the wake-up of an idle worker all still behave as on the general path."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import anyio
import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from lifecycle.asynctask import AsyncTasks, DuplicateTaskError, NewTask, TaskState
from lifecycle.asynctask._backends.redis._conn import SCRIPTS
from lifecycle.asynctask._backends.redis._lua import PRELUDE
from lifecycle.asynctask.redis import RedisBackend
from tests.asynctask.redis.redis_servers import OpenRedis, RedisServer, stored_keys

pytestmark = pytest.mark.redis

T0 = 1_700_000_000.0


def _task(task_id: str, *, generated: bool = True, queue: str = "default", **fields: Any) -> NewTask:
    task = NewTask(task_id, "job", queue, b"", 3, None, T0, T0, generated_id=generated)
    return replace(task, **fields) if fields else task


async def _commands(admin: aioredis.Redis) -> dict[str, int]:
    stats: dict[str, Any] = await admin.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(value["calls"]) for name, value in stats.items()}


async def test_a_generated_id_is_stored_in_six_commands_inside_one_script(own_redis: RedisServer) -> None:
    backend = RedisBackend(own_redis.url, prefix="lean")
    admin = aioredis.Redis.from_url(own_redis.url)
    await backend.open()
    try:
        await backend.enqueue_many([_task("first")])  # the queue's wake-up token is waiting from here on
        before = await _commands(admin)
        assert await backend.enqueue_many([_task("second")]) == ["second"]
        after = await _commands(admin)
        record = await backend.get("second")
    finally:
        await admin.aclose()
        await backend.close()
    ran = {name: after[name] - before.get(name, 0) for name in after if after[name] != before.get(name, 0)}
    ran.pop("info")
    # The record, its ready and pending-index entries, the sequence, the queue's name, the wake-up check:
    # no HMGET of an existing record, no LPUSH/LTRIM while a token waits.
    assert ran == {"evalsha": 1, "incr": 1, "hset": 1, "zadd": 2, "sadd": 1, "exists": 1}
    assert record is not None
    assert record.state is TaskState.PENDING


async def test_a_lost_reply_is_retried_by_the_general_script_and_stores_the_task_once(
    open_redis: OpenRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = await open_redis()
    runner = backend._run()
    real = runner.evalsha
    calls: list[str] = []

    async def reply_lost_once(sha: str, numkeys: int, *keys_and_args: Any) -> Any:
        reply = await real(sha, numkeys, *keys_and_args)
        calls.append(sha)
        if len(calls) == 1:
            raise RedisConnectionError("the connection dropped after the script ran")
        return reply

    monkeypatch.setattr(runner, "evalsha", reply_lost_once)
    assert await backend.enqueue_many([_task("once")]) == ["once"]
    assert len(calls) == 2
    assert calls[0] != calls[1]  # the lean script, then the general one
    monkeypatch.undo()
    assert (await backend.stats())["default"] == {TaskState.PENDING: 1}
    claimed = await backend.claim(["default"], 10, now=T0 + 1, lease_until=T0 + 60)
    assert [task.record.id for task in claimed] == ["once"]
    assert await backend.claim(["default"], 10, now=T0 + 1, lease_until=T0 + 60) == []


async def test_a_batch_looks_for_records_of_the_ids_the_caller_chose_only(own_redis: RedisServer) -> None:
    backend = RedisBackend(own_redis.url, prefix="batch")
    admin = aioredis.Redis.from_url(own_redis.url)
    await backend.open()
    try:
        await backend.enqueue_many([_task("first")])
        batch = [_task(f"made-{i}") for i in range(10)] + [_task("chosen", generated=False)]
        before = await _commands(admin)
        assert await backend.enqueue_many(batch) == [task.id for task in batch]
        after = await _commands(admin)
        with pytest.raises(DuplicateTaskError):
            await backend.enqueue_many([_task("made-3", generated=False)])
    finally:
        await admin.aclose()
        await backend.close()
    # The chosen id's look-up; none for the ten generated ones.
    assert after["hmget"] - before.get("hmget", 0) == 1
    assert after["hset"] - before.get("hset", 0) == 11


async def test_a_batch_whose_reply_was_lost_is_stored_once(
    open_redis: OpenRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = await open_redis()
    runner = backend._run()
    real = runner.evalsha
    attempts = 0

    async def reply_lost_once(sha: str, numkeys: int, *keys_and_args: Any) -> Any:
        nonlocal attempts
        reply = await real(sha, numkeys, *keys_and_args)
        attempts += 1
        if attempts == 1:
            raise RedisConnectionError("the connection dropped after the script ran")
        return reply

    monkeypatch.setattr(runner, "evalsha", reply_lost_once)
    batch = [_task(f"made-{i}") for i in range(5)]
    assert await backend.enqueue_many(batch) == [task.id for task in batch]
    assert attempts == 2
    monkeypatch.undo()
    assert (await backend.stats())["default"] == {TaskState.PENDING: 5}
    claimed = await backend.claim(["default"], 10, now=T0 + 1, lease_until=T0 + 60)
    assert sorted(task.record.id for task in claimed) == [task.id for task in batch]


async def test_an_id_the_caller_chose_is_still_checked(open_redis: OpenRedis) -> None:
    backend = await open_redis()
    assert await backend.enqueue_many([_task("mine", generated=False)]) == ["mine"]
    with pytest.raises(DuplicateTaskError):
        await backend.enqueue_many([_task("mine", generated=False)])
    assert await backend.enqueue_many([_task("mine", generated=False)], if_exists="skip") == []
    assert (await backend.stats())["default"] == {TaskState.PENDING: 1}


async def test_a_uniqueness_window_is_checked_for_a_generated_id(open_redis: OpenRedis) -> None:
    backend = await open_redis()
    window: dict[str, Any] = {"unique_key": "job:abc", "unique_until": T0 + 60}
    assert await backend.enqueue_many([_task("a", **window)]) == ["a"]
    with pytest.raises(DuplicateTaskError):
        await backend.enqueue_many([_task("b", **window)])


async def test_a_hook_that_sets_the_id_makes_the_enqueue_check_it(open_redis: OpenRedis) -> None:
    tasks = AsyncTasks(await open_redis(), execution=False)

    async def job() -> None:
        pass

    tasks.register(job, name="job")

    @tasks.on_enqueue
    def fixed_id(task: NewTask) -> NewTask:
        return replace(task, id="fixed")

    async with tasks:
        assert await tasks.enqueue(job) == "fixed"
        with pytest.raises(DuplicateTaskError):
            await tasks.enqueue(job)


async def test_a_single_enqueue_wakes_an_idle_worker_and_keeps_one_token(open_redis: OpenRedis) -> None:
    worker = await open_redis()
    producer = await open_redis()
    woken = anyio.Event()

    async def wait() -> None:
        await worker.wait_for_work(["default"], timeout=120)
        woken.set()

    with anyio.fail_after(10):
        async with anyio.create_task_group() as group:
            group.start_soon(wait)
            await anyio.wait_all_tasks_blocked()
            await producer.enqueue_many([_task("wake", enqueued_at=time.time(), run_at=time.time())])
            await woken.wait()
    for number in range(3):
        await producer.enqueue_many([_task(f"more-{number}")])
    tokens = await producer._run().client.llen(f"{producer.key_prefix}w:default")
    assert tokens == 1


async def test_only_ids_the_engine_made_up_are_marked_generated(open_redis: OpenRedis) -> None:
    tasks = AsyncTasks(await open_redis(), execution=False)
    before: list[tuple[str, bool]] = []
    after: list[tuple[str, bool]] = []

    async def job() -> None:
        pass

    tasks.register(job, name="job")

    @tasks.on_enqueue
    def look_before(task: NewTask) -> None:
        before.append((task.id, task.generated_id))

    @tasks.on_enqueue
    def rename(task: NewTask) -> NewTask | None:
        return replace(task, id=f"renamed-{len(before)}") if task.meta is None and len(before) == 3 else None

    @tasks.on_enqueue
    def claim_generated(task: NewTask) -> NewTask:
        return replace(task, generated_id=True)  # not a hook's to set: the engine clears it

    @tasks.on_enqueue
    def look_after(task: NewTask) -> None:
        after.append((task.id, task.generated_id))

    async with tasks:
        made_up = await tasks.enqueue(job)
        await tasks.enqueue(job, task_id="chosen")
        renamed = await tasks.enqueue(job)
    assert before[:2] == [(made_up, True), ("chosen", False)]
    assert before[2][1] is True
    assert after == [(made_up, True), ("chosen", False), ("renamed-3", False)]
    assert renamed == "renamed-3"


def test_the_single_enqueue_script_defines_no_function_on_each_call() -> None:
    lean = SCRIPTS["enqueue_new"].source
    assert "function" not in lean
    assert "local P = ARGV[1]" not in lean  # no part of the prelude
    # prepare_wait carries a few prelude lines (test_redis_wait); the claim's and the settle's plain paths run
    # before the prelude (test_redis_plain_claim, test_redis_plain_settle).
    lean_ones = ("enqueue_new", "prepare_wait", "claim", "settle")
    assert all(script.source.startswith(PRELUDE) for name, script in SCRIPTS.items() if name not in lean_ones)
    assert PRELUDE in SCRIPTS["claim"].source
    assert PRELUDE in SCRIPTS["settle"].source


async def _keys(client: aioredis.Redis, prefix: str) -> dict[str, Any]:
    """Every key of ``prefix`` (named without it) with its contents; the enqueue call ids left out."""
    return {name: value for name, (_kind, value, _ttl) in (await stored_keys(client, prefix)).items()}


async def test_the_single_enqueue_script_stores_what_the_general_one_stores(
    open_redis: OpenRedis, unique_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The lean script repeats the prelude's store() and announce() written out: every kind of field they
    # write must come out the same on both paths.
    variants: list[dict[str, Any]] = [
        {},
        {"run_at": T0 + 30},
        {"priority": 7},
        {"priority": -4, "queue": "other"},
        {"meta": "\x00tenant\x00acme", "concurrency_key": "user-1"},
        {"expires_at": T0 + 10},
        {"expires_at": T0 + 90, "run_at": T0 + 30, "timeout": 2.5, "max_retries": 0},
        {"payload": b"\x00\xff binary", "name": "other-job"},
    ]
    lean = await open_redis(prefix=f"{unique_name}-lean")
    general = await open_redis(prefix=f"{unique_name}-general")
    client = lean._run().client
    calls: dict[RedisBackend, list[str]] = {lean: [], general: []}
    for backend, made in calls.items():
        call_id = backend._call_id

        def recorded(call_id: Callable[[], str] = call_id, made: list[str] = made) -> str:
            made.append(call_id())
            return made[-1]

        monkeypatch.setattr(backend, "_call_id", recorded)
    try:
        for number, fields in enumerate(variants):
            assert await lean.enqueue_many([_task(f"t{number}", **fields)]) == [f"t{number}"]
            assert await general.enqueue_many([_task(f"t{number}", generated=False, **fields)]) == [
                f"t{number}"
            ]
        stored = await _keys(client, lean.key_prefix)
        expected = await _keys(client, general.key_prefix)
        # The call id each record keeps (left out above, as it differs between the two backends) is the one
        # of the call that stored it, on both paths.
        for backend, made in calls.items():
            assert len(made) == len(variants)
            kept = [await client.hget(f"{backend.key_prefix}t:t{n}", "c") for n in range(len(variants))]
            assert kept == [call.encode() for call in made]
    finally:
        for backend in (lean, general):
            keys = [key async for key in client.scan_iter(match=f"{backend.key_prefix}*")]
            if keys:
                await client.delete(*keys)
    assert len(stored) > 10
    assert stored == expected
