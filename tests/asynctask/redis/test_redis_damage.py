"""RedisBackend with damaged keys (issue 10): no script leaves a half-done change or fails a batch for one
record, whatever a record hash holds; the indexes, not a record's own fields, say where it lives. The
backend-neutral rules are in the conformance suite (``DamageRules``); these are Redis's own cases: index
entries whose record hash is gone, fields damaged while a task is leased, damaged state and queue fields."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping

import pytest
import redis.asyncio as aioredis

from lifecycle.asynctask import DuplicateTaskError, FlowLimits, NewTask, Settlement, TaskState
from lifecycle.asynctask.redis import RedisBackend
from lifecycle.asynctask.testing import T0
from tests.asynctask.redis.redis_servers import OpenRedis

pytestmark = pytest.mark.redis


def _task(task_id: str, *, queue: str = "default", enqueued_at: float = T0) -> NewTask:
    return NewTask(task_id, "job", queue, b"[]", 3, None, enqueued_at, enqueued_at)


@pytest.fixture
async def raw(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


def _key(backend: RedisBackend, task_id: str) -> str:
    return f"{backend.key_prefix}t:{task_id}"


def _total(stats: Mapping[str, Mapping[TaskState, int]]) -> dict[TaskState, int]:
    totals: dict[TaskState, int] = {}
    for counts in stats.values():
        for state, count in counts.items():
            totals[state] = totals.get(state, 0) + count
    return totals


async def test_a_non_numeric_attempts_field_does_not_lose_the_claim_batch(
    open_redis: OpenRedis, raw: aioredis.Redis
) -> None:
    """The report: ``a`` = "a" made the claim script fail after its ZREMs, and the batch vanished."""
    backend = await open_redis()
    await backend.enqueue_many([_task(f"t{n}", enqueued_at=T0 + n) for n in range(3)])
    await raw.hset(_key(backend, "t1"), "a", "a")
    claimed = await backend.claim(["default"], 10, now=T0 + 10, lease_until=T0 + 40)
    assert [c.record.id for c in claimed] == ["t0", "t1", "t2"]
    assert claimed[1].record.fault == "field 'attempts' holds 'a', not a whole number >= 0"
    assert [c.record.attempts for c in claimed] == [1, 0, 1]
    assert await raw.hget(_key(backend, "t1"), "a") == b"a", "a damaged count is never computed with"
    assert _total(await backend.stats()) == {TaskState.ACTIVE: 3}


async def test_unparsable_fields_never_fail_reads_or_recovery(
    open_redis: OpenRedis, raw: aioredis.Redis
) -> None:
    """The report: a bad ``m``, ``to`` or non-UTF-8 ``n`` made every read of the batch raise."""
    backend = await open_redis()
    await backend.enqueue_many([_task(f"t{n}", enqueued_at=T0 + n) for n in range(4)])
    await raw.hset(_key(backend, "t0"), mapping={"m": "x"})
    await raw.hset(_key(backend, "t1"), mapping={"to": "soon"})
    await raw.hset(_key(backend, "t2"), mapping={"n": b"\xff\xfe"})
    faults = {r.id: r.fault for r in await backend.list_records()}
    assert faults == {
        "t0": "field 'max_retries' holds 'x', not a whole number >= 0",
        "t1": "field 'timeout' holds 'soon', not a positive, finite number of seconds",
        "t2": "field 'name' holds b'\\xff\\xfe', not UTF-8 text",
        "t3": None,
    }
    claimed = await backend.claim(["default"], 10, now=T0 + 10, lease_until=T0 + 20)
    assert [c.record.fault is None for c in claimed] == [False, False, False, True]
    reclaimed = await backend.reclaim_expired(now=T0 + 30, lease_until=T0 + 60, limit=10)
    assert sorted(c.record.id for c in reclaimed) == ["t0", "t1", "t2", "t3"]
    assert await backend.get("t2") is not None


async def test_index_entries_whose_record_is_gone_are_dropped_and_the_rest_goes_on(
    open_redis: OpenRedis, raw: aioredis.Redis
) -> None:
    backend = await open_redis()
    await backend.enqueue_many([_task(f"t{n}", enqueued_at=T0 + n) for n in range(6)])
    await raw.delete(_key(backend, "t1"))
    claimed = await backend.claim(["default"], 3, now=T0 + 10, lease_until=T0 + 20)
    assert [c.record.id for c in claimed] == ["t0", "t2", "t3"]
    assert not await raw.exists(_key(backend, "t1")), "a claim never creates a partial record"
    assert await backend.get("t1") is None

    await raw.delete(_key(backend, "t2"))  # gone while leased
    reclaimed = await backend.reclaim_expired(now=T0 + 30, lease_until=T0 + 60, limit=10)
    assert sorted(c.record.id for c in reclaimed) == ["t0", "t3"]
    assert not await raw.exists(_key(backend, "t2"))
    verdicts = [Settlement(c.record.id, c.token, TaskState.DEAD, at=T0 + 31, error="e") for c in reclaimed]
    assert await backend.settle(verdicts) == set()

    await raw.delete(_key(backend, "t0"))  # gone while dead
    assert [r.id for r in await backend.list_records(states=[TaskState.DEAD])] == ["t3"]
    assert await backend.requeue(now=T0 + 40) == 1
    assert sorted(r.id for r in await backend.list_records()) == ["t3", "t4", "t5"]


async def test_fields_damaged_during_a_lease_do_not_misplace_the_settlement(
    open_redis: OpenRedis, raw: aioredis.Redis
) -> None:
    """Settling moves a record between indexes by where the indexes hold it, not by its own q and e fields."""
    backend = await open_redis()
    await backend.enqueue_many([_task("a", queue="q1"), _task("b", queue="q1"), _task("c", queue="q1")])
    claimed = await backend.claim(["q1"], 10, now=T0 + 10, lease_until=T0 + 40)
    await raw.hset(_key(backend, "a"), mapping={"q": "elsewhere", "e": "not a time"})
    await raw.hdel(_key(backend, "b"), "q")
    await raw.hset(_key(backend, "c"), "a", "many")
    verdicts = [
        Settlement("a", claimed[0].token, TaskState.SUCCEEDED, at=T0 + 11),
        Settlement("b", claimed[1].token, TaskState.DEAD, at=T0 + 11, error="e"),
        Settlement("c", claimed[2].token, TaskState.PENDING, at=T0 + 11, run_at=T0 + 11, refund_attempt=True),
    ]
    assert await backend.settle(verdicts) == set()
    assert await backend.stats() == {"q1": {TaskState.SUCCEEDED: 1, TaskState.DEAD: 1, TaskState.PENDING: 1}}
    assert await raw.hget(_key(backend, "a"), "q") == b"q1", "the queue field is restored from the index"
    assert await raw.hget(_key(backend, "b"), "q") == b"q1"
    assert [r.id for r in await backend.list_records(states=[TaskState.SUCCEEDED])] == ["a"]


async def test_damaged_state_and_queue_fields_are_restored_by_a_claim(
    open_redis: OpenRedis, raw: aioredis.Redis
) -> None:
    backend = await open_redis()
    await backend.enqueue_many([_task("a"), _task("b")])
    await raw.hset(_key(backend, "a"), mapping={"s": "bogus", "q": b"\xff"})
    await raw.hdel(_key(backend, "b"), "s")
    shown = await backend.get("b")
    assert shown is not None, "a record without its state field is still there"
    assert shown.fault == "field 'state' is missing"
    assert shown.state is TaskState.DEAD, "a record in no known state reads as dead"
    claimed = await backend.claim(["default"], 10, now=T0 + 10, lease_until=T0 + 40)
    assert [(c.record.id, c.record.fault, c.record.queue) for c in claimed] == [
        ("a", None, "default"),
        ("b", None, "default"),
    ]
    assert await backend.cancel(["a"], now=T0 + 11) == ["a"], "an active task is asked to stop"
    asked = await backend.get("a")
    assert asked is not None
    assert (asked.state, asked.cancel_requested) == (TaskState.ACTIVE, True), "it stays active meanwhile"


async def test_operator_actions_find_a_record_whose_state_field_is_damaged(
    open_redis: OpenRedis, raw: aioredis.Redis
) -> None:
    backend = await open_redis()
    await backend.enqueue_many([_task("pending-one"), _task("dead-one")])
    (claimed,) = await backend.claim(["default"], 1, now=T0 + 10, lease_until=T0 + 40)
    verdict = Settlement("pending-one", claimed.token, TaskState.DEAD, at=T0 + 11)
    assert await backend.settle([verdict]) == set()
    await raw.hset(_key(backend, "pending-one"), "s", "bogus")  # dead in the indexes
    await raw.hset(_key(backend, "dead-one"), "s", "dead")  # pending in the indexes
    assert await backend.cancel(["dead-one", "pending-one"], now=T0 + 12) == ["dead-one"]
    assert await backend.requeue(["pending-one", "dead-one"], now=T0 + 13) == 2
    assert await backend.stats() == {"default": {TaskState.PENDING: 2}}
    await backend.enqueue_many([_task("pending-one")], if_exists="skip")
    with pytest.raises(DuplicateTaskError, match="pending-one"):
        await backend.enqueue_many([_task("pending-one")])


async def test_damaged_flow_fields_are_never_computed_with(
    open_redis: OpenRedis, raw: aioredis.Redis
) -> None:
    """A priority read when a delayed task becomes due, a concurrency key counted for a limit, an expiry
    compared by the claim: damaged, each reads as its default, and the task is claimed with a fault."""
    backend = await open_redis()
    keyed = FlowLimits(max_running_per_key=1)
    await backend.enqueue_many(
        [
            NewTask("prio", "job", "default", b"[]", 3, None, T0, T0 + 5, priority=9),
            NewTask("key", "keyed", "default", b"[]", 3, None, T0, T0, concurrency_key="k"),
            NewTask("key-2", "keyed", "default", b"[]", 3, None, T0 + 1, T0 + 1, concurrency_key="k"),
            NewTask("expiry", "job", "default", b"[]", 3, None, T0, T0, expires_at=T0 + 5),
        ]
    )
    await raw.hset(_key(backend, "prio"), "pr", "high")
    await raw.hset(_key(backend, "key"), "ck", b"\xff\xfe")
    await raw.hset(_key(backend, "key-2"), "ck", b"\xff\xfe")
    await raw.hset(_key(backend, "expiry"), "ex", "soon")
    claimed = await backend.claim(["default"], 10, now=T0 + 10, lease_until=T0 + 40, limits={"keyed": keyed})
    faults = {c.record.id: c.record.fault for c in claimed}
    assert faults == {
        "key": "field 'concurrency_key' holds b'\\xff\\xfe', not UTF-8 text",
        "expiry": "field 'expires_at' holds 'soon', not a time (a finite number of seconds)",
        "prio": f"field 'priority' holds 'high', not a whole number between -{10**15} and {10**15}",
    }, "key-2 shares the (damaged) key of the running task: held back, the others claimed"
    assert [c.record.id for c in claimed] == ["key", "expiry", "prio"], "a damaged priority sorts as 0"
    done = next(c for c in claimed if c.record.id == "key")
    assert (
        await backend.settle([Settlement("key", done.token, TaskState.DEAD, at=T0 + 11, error="e")]) == set()
    )
    (second,) = await backend.claim(
        ["default"], 10, now=T0 + 12, lease_until=T0 + 40, limits={"keyed": keyed}
    )
    assert second.record.id == "key-2", "the damaged key's slot came back with the settlement"
