"""The documented key layout: one hash tag per prefix (one Redis Cluster slot), no keys left behind."""

from __future__ import annotations

import struct

import pytest
import redis.asyncio as aioredis
from redis.crc import key_slot

from lifecycle.asynctask import NewTask, Settlement, TaskState
from lifecycle.asynctask.redis import RedisBackend
from lifecycle.asynctask.testing import T0
from tests.asynctask.redis.redis_servers import OpenRedis, delete_prefix, keys_of

pytestmark = pytest.mark.redis


def _sortable(time: float) -> bytes:
    """A time as the scripts write it in claim members: 16 hex digits of the big-endian double, with the
    sign bit flipped for a positive number and every bit flipped for a negative one (so the text sorts as the
    times do)."""
    raw = bytearray(struct.pack(">d", time))
    if raw[0] & 0x80:
        raw = bytearray(255 - byte for byte in raw)
    else:
        raw[0] |= 0x80
    return raw.hex().encode()


def _task(task_id: str, *, queue: str = "default", run_at: float = T0) -> NewTask:
    return NewTask(task_id, "job", queue, b"p", 3, None, T0, run_at)


async def _workload(backend: RedisBackend) -> None:
    """Every kind of state change, across two queues with awkward names."""
    queues = ["default", "q:with:colons {and} braces"]
    await backend.enqueue_many(
        [_task(f"t{n}", queue=queues[n % 2]) for n in range(8)] + [_task("late", run_at=T0 + 500)]
    )
    claimed = await backend.claim(queues, 6, now=T0 + 1, lease_until=T0 + 2)
    ids = [c.record.id for c in claimed]
    await backend.extend_leases([(c.record.id, c.token) for c in claimed[:1]], lease_until=T0 + 60)
    verdicts = [
        Settlement(ids[1], claimed[1].token, TaskState.SUCCEEDED, at=T0 + 3, result=b"r"),
        Settlement(ids[2], claimed[2].token, TaskState.DEAD, at=T0 + 3, error="boom"),
        Settlement(
            ids[3], claimed[3].token, TaskState.PENDING, at=T0 + 3, run_at=T0 + 4, then=(_task("chained"),)
        ),
    ]
    assert await backend.settle(verdicts) == set()
    await backend.reclaim_expired(now=T0 + 10, lease_until=T0 + 40, limit=10)
    await backend.cancel(["late"], now=T0 + 11)
    await backend.requeue(now=T0 + 12)
    await backend.wait_for_work(queues, timeout=0)


async def test_every_key_of_a_prefix_is_in_one_cluster_slot(
    open_redis: OpenRedis, redis_url: str, unique_name: str
) -> None:
    backend = await open_redis()
    await _workload(backend)
    keys = await keys_of(redis_url, unique_name)
    assert len(keys) > 10
    assert all(key.startswith(f"{{{unique_name}}}:".encode()) for key in keys)
    assert {key_slot(key) for key in keys} == {key_slot(f"{{{unique_name}}}:seq".encode())}


async def test_purging_everything_leaves_only_the_counter_and_the_layout_version(
    open_redis: OpenRedis, redis_url: str, unique_name: str
) -> None:
    backend = await open_redis()
    await _workload(backend)
    assert await backend.claim(["default"], 1, now=T0 - 1, lease_until=T0) == []  # forgets the last claim log
    assert await backend.reclaim_expired(now=T0 - 1, lease_until=T0, limit=1) == []
    assert await backend.purge(states=set(TaskState)) == 10
    assert await backend.stats() == {}
    assert await keys_of(redis_url, unique_name) == {
        f"{{{unique_name}}}:seq".encode(),
        f"{{{unique_name}}}:layout".encode(),
    }


async def test_the_record_hash_holds_the_documented_fields(
    open_redis: OpenRedis, redis_url: str, unique_name: str
) -> None:
    backend = await open_redis()
    task = NewTask(
        "job-1",
        "app.send",
        "mail",
        b"[1]",
        2,
        9.5,
        T0,
        T0 + 1,
        "m",
        priority=-7,
        concurrency_key="k",
        expires_at=T0 + 9,
    )
    await backend.enqueue_many(
        [task, NewTask("job-2", "app.send", "mail", b"[]", 0, None, T0, T0, priority=3)]
    )
    client = aioredis.Redis.from_url(redis_url)
    prefix = f"{{{unique_name}}}:"
    try:
        fields = await client.hgetall(f"{prefix}t:job-1")
        plain = await client.hgetall(f"{prefix}t:job-2")
        delayed = await client.zrange(f"{prefix}dl:mail", 0, -1, withscores=True)
        ready = await client.zrange(f"{prefix}rd:mail", 0, -1, withscores=True)
        expiring = await client.zrange(f"{prefix}x:mail", 0, -1, withscores=True)
        pending = await client.zrange(f"{prefix}i:pending:mail", 0, -1, withscores=True)
        queues = await client.smembers(f"{prefix}queues")
    finally:
        await client.aclose()
    assert {k: v for k, v in fields.items() if k not in (b"o", b"c")} == {
        b"n": b"app.send",
        b"q": b"mail",
        b"p": b"[1]",
        b"s": b"pending",
        b"a": b"0",
        b"m": b"2",
        b"to": b"9.5",
        b"e": b"1000000.0",
        b"r": b"1000001.0",
        b"meta": b"m",
        b"pr": b"-7",
        b"ck": b"k",
        b"ex": b"1000009.0",
        b"rs": _sortable(T0 + 1),
    }
    assert not {b"ex", b"ck", b"meta"} & set(plain), "fields holding None are left out"
    assert len(fields[b"o"]) == 16, "the enqueue sequence, 16 hex digits"
    assert fields[b"o"] < plain[b"o"]
    assert delayed == [(fields[b"rs"] + fields[b"o"] + b"job-1", T0 + 1)]
    assert ready == [(plain[b"rs"] + plain[b"o"] + b"job-2", -3.0)], "scored minus the priority"
    assert expiring == [(b"job-1", T0 + 9)], "the later of run_at and expires_at"
    assert pending == [(fields[b"o"] + b"job-1", T0), (plain[b"o"] + b"job-2", T0)]
    assert queues == {b"mail"}


async def test_clear_deletes_every_key_of_its_prefix_and_nothing_else(
    open_redis: OpenRedis, redis_url: str, unique_name: str
) -> None:
    glob = f"{unique_name}*[x]?"
    mine = await open_redis(prefix=glob)
    other = await open_redis()
    try:
        await _workload(mine)
        await _workload(other)
        before = await keys_of(redis_url, unique_name)
        mine_keys = await keys_of(redis_url, glob)
        assert len(mine_keys) > 10
        assert await mine.clear() == len(mine_keys)
        assert await keys_of(redis_url, glob) == set()
        assert await keys_of(redis_url, unique_name) == before, "clear() touched another prefix"
    finally:
        await delete_prefix(redis_url, glob)


async def test_claim_members_sort_by_run_at_across_signs_and_magnitudes(open_redis: OpenRedis) -> None:
    """The 16 hex digits of run_at in a claim member sort as the times do, negative and tiny ones included."""
    backend = await open_redis()
    times = [-1e300, -5.0, -0.5, -1e-300, 0.0, 1e-300, 0.25, 3.0, 1e15, 1e300]
    shuffled = [times[k] for k in (4, 9, 0, 7, 2, 5, 8, 1, 6, 3)]
    tasks = [
        NewTask(f"t{time!r}", "job", "default", b"", 0, None, 1e301, time) for time in dict.fromkeys(shuffled)
    ]
    await backend.enqueue_many(tasks)
    claimed = await backend.claim(["default"], 100, now=1e301, lease_until=1e302)
    assert [c.record.run_at for c in claimed] == times
    assert sorted(_sortable(time) for time in times) == [_sortable(time) for time in times]
