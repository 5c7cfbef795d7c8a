"""The documented key layout: one hash tag per prefix (one Redis Cluster slot), no keys left behind."""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import cast

import pytest
import redis.asyncio as aioredis
from redis.crc import key_slot

from lifecycle.asynctask import FlowLimits, NewTask, Settlement, TaskState
from lifecycle.asynctask._records import NewGroup, ProgressUpdate
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


_QUEUES = ["default", "q:with:colons {and} braces"]
_LIMITS = {
    "capped": FlowLimits(max_running=1),
    "keyed": FlowLimits(max_running_per_key=1),
    "rated": FlowLimits(rate=1, per=60.0),
}


async def _flow_workload(backend: RedisBackend) -> None:
    """Every flow-control structure, left in place: tasks parked by each kind of limit in two queues, running
    sets, a rate bucket, a paused queue, a uniqueness window, a debounce follow-up, an expiring task."""
    tasks = [
        NewTask(
            f"{name}-{n}-{queue}",
            name,
            queue,
            b"p",
            3,
            None,
            T0,
            T0,
            concurrency_key="{k}" if n < 4 else None,
        )
        for queue in _QUEUES
        for name in _LIMITS
        for n in range(2)
    ]
    tasks.append(
        NewTask("unique", "job", "default", b"p", 3, None, T0, T0, unique_key="{u}", unique_until=T0 + 60)
    )
    tasks.append(NewTask("expiring", "job", _QUEUES[1], b"p", 3, None, T0, T0 + 5, expires_at=T0 + 50))
    await backend.enqueue_many(tasks)
    claimed = await backend.claim(_QUEUES, 20, now=T0 + 1, lease_until=T0 + 30, limits=_LIMITS)
    assert len(claimed) == 7, "one of each limited name per queue (the rate: one in all), and the unique task"
    first = claimed[0].record
    follow_up = NewTask(first.id, first.name, first.queue, b"again", 3, None, T0 + 2, T0 + 2)
    assert await backend.enqueue_many([follow_up], if_exists="debounce") == [first.id]
    await backend.pause("paused {queue}")
    await backend.wait_for_work(_QUEUES, timeout=0)


async def _group_workload(backend: RedisBackend, *, finish: bool) -> int:
    """Groups in every state, a running member asked to stop, progress; with ``finish`` every group ends.
    Returns how many records it leaves."""
    members = tuple(
        NewTask(f"m{n}", "job", "groups", b"p", 3, None, T0, T0, group_id="g {1}") for n in range(2)
    )
    then = NewTask("then {1}", "job", "groups", b"p", 3, None, T0, T0)
    await backend.enqueue_group(NewGroup("g {1}", members, then, T0, meta="m"))
    single = NewTask("s0", "job", "groups", b"p", 3, None, T0, T0, group_id="g {2}")
    await backend.enqueue_group(NewGroup("g {2}", (single,), None, T0))
    tokens = {
        c.record.id: c.token for c in await backend.claim(["groups"], 10, now=T0 + 1, lease_until=T0 + 30)
    }
    await backend.settle([Settlement("m0", tokens["m0"], TaskState.SUCCEEDED, at=T0 + 2, result=b"r")])
    await backend.settle([Settlement("s0", tokens["s0"], TaskState.DEAD, at=T0 + 2, error="boom")])
    assert await backend.save_progress([ProgressUpdate("m1", tokens["m1"], 1.0, 2.0, "half")]) == set()
    assert await backend.cancel(["m1"], now=T0 + 3) == ["m1"]
    if finish:
        await backend.settle([Settlement("m1", tokens["m1"], TaskState.CANCELLED, at=T0 + 4, error="stop")])
    return 3


async def test_every_key_of_a_prefix_is_in_one_cluster_slot(
    open_redis: OpenRedis, redis_url: str, unique_name: str
) -> None:
    backend = await open_redis()
    await _workload(backend)
    await _flow_workload(backend)
    await _group_workload(backend, finish=False)
    done = NewTask("d0", "job", "groups", b"p", 3, None, T0, T0, group_id="g {3}")
    await backend.enqueue_group(NewGroup("g {3}", (done,), None, T0))
    assert await backend.cancel(["d0"], now=T0 + 5) == ["d0"]
    keys = await keys_of(redis_url, unique_name)
    prefix = f"{{{unique_name}}}:".encode()
    kinds = {key[len(prefix) :].split(b":")[0] for key in keys}
    assert kinds >= {
        b"g",
        b"gm",
        b"gr",
        b"gt",
        b"gf",
        b"an",
        b"ak",
        b"h",
        b"hs",
        b"hk",
        b"hq",
        b"tb",
        b"tr",
        b"paused",
        b"uq",
        b"fu",
        b"x",
        b"dl",
    }
    assert len(keys) > 10
    assert all(key.startswith(f"{{{unique_name}}}:".encode()) for key in keys)
    assert {key_slot(key) for key in keys} == {key_slot(f"{{{unique_name}}}:seq".encode())}


async def test_purging_everything_leaves_only_the_counter_and_the_layout_version(
    open_redis: OpenRedis, redis_url: str, unique_name: str
) -> None:
    backend = await open_redis()
    await _workload(backend)
    await _flow_workload(backend)
    left = await _group_workload(backend, finish=True)
    await backend.resume("paused {queue}")
    assert await backend.claim(["default"], 1, now=T0 - 1, lease_until=T0) == []  # forgets the last claim log
    assert await backend.reclaim_expired(now=T0 - 1, lease_until=T0, limit=1) == []
    assert await backend.purge(states=set(TaskState)) == 10 + 14 + left
    assert await backend.stats() == {}
    prefix = f"{{{unique_name}}}:"
    remaining = await keys_of(redis_url, unique_name)
    markers = {key for key in remaining if key.startswith((f"{prefix}sc:".encode(), f"{prefix}sr:".encode()))}
    assert markers, "each settle call that applied something leaves a marker for its own retries"
    # (and one that made a task pending again lists it besides: the workload retries tasks)
    assert any(key.startswith(f"{prefix}sr:".encode()) for key in markers)
    client = aioredis.Redis.from_url(redis_url)
    try:
        ttls = [await client.ttl(key) for key in markers]
        assert all(0 < ttl <= 120 for ttl in ttls), "markers expire on their own"
    finally:
        await client.aclose()
    assert remaining - markers == {
        f"{prefix}seq".encode(),
        f"{prefix}layout".encode(),
        f"{prefix}uq:{{u}}".encode(),  # windows outlive the records (and expire a minute after they end)
        f"{prefix}tb".encode(),  # the rate buckets and their refusal counts, one field per task name
        f"{prefix}tr".encode(),
    }


def _raw_hash(values: Mapping[bytes | str, bytes | str]) -> dict[bytes, bytes]:
    """A hash as read by a client without decoding: every key and value is bytes."""
    raw = {key: value for key, value in values.items() if isinstance(key, bytes) and isinstance(value, bytes)}
    assert len(raw) == len(values)
    return raw


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
        fields = _raw_hash(await client.hgetall(f"{prefix}t:job-1"))
        plain = _raw_hash(await client.hgetall(f"{prefix}t:job-2"))
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


async def _write_layout_1(client: aioredis.Redis, prefix: str) -> None:
    """A store as version 1 of the layout wrote it (documented in the 0.x docs/backends.md): records without
    priority, key, expiry or the new bookkeeping fields; one pending set per queue, ``{P}:r:<queue>``, scored
    by run_at with the member ``o .. id``; no running sets."""

    def member(seq: int, task_id: str) -> str:
        return f"{seq:016x}{task_id}"

    pending = [
        ("late", 1, T0, T0 + 100),
        ("second", 2, T0, T0 + 5),
        ("first", 3, T0 + 1, T0),
        ("third", 4, T0, T0 + 5),
    ]
    for task_id, seq, enqueued_at, run_at in pending:
        await client.hset(
            f"{prefix}t:{task_id}",
            mapping={
                "n": "job", "q": "default", "p": b"[]", "s": "pending", "a": "0", "m": "3", "to": "",
                "e": repr(enqueued_at), "r": repr(run_at), "o": f"{seq:016x}", "c": "old-call",
            },
        )  # fmt: skip
        await client.zadd(f"{prefix}r:default", {member(seq, task_id): run_at})
        await client.zadd(f"{prefix}i:pending:default", {member(seq, task_id): enqueued_at})
    await client.hset(
        f"{prefix}t:running",
        mapping={
            "n": "job.capped", "q": "default", "p": b"[]", "s": "active", "a": "1", "m": "3", "to": "",
            "e": repr(T0), "r": repr(T0), "st": repr(T0), "l": repr(T0 + 30), "o": f"{5:016x}",
            "k": "old-call:1", "c": "old-call",
        },
    )  # fmt: skip
    await client.zadd(f"{prefix}i:active:default", {member(5, "running"): T0})
    await client.zadd(f"{prefix}leases", {"running": T0 + 30})
    await client.sadd(f"{prefix}queues", "default")
    await client.set(f"{prefix}seq", 5)
    await client.set(f"{prefix}layout", 1)


@pytest.mark.parametrize("chunk", [5000, 2])
async def test_a_store_written_by_layout_1_is_migrated_when_opened(
    open_redis: OpenRedis, redis_url: str, unique_name: str, monkeypatch: pytest.MonkeyPatch, chunk: int
) -> None:
    monkeypatch.setattr("lifecycle.asynctask._backends.redis._backend._MIGRATE_CHUNK", chunk)
    prefix = f"{{{unique_name}}}:"
    client = aioredis.Redis.from_url(redis_url)
    try:
        await _write_layout_1(client, prefix)
        backend = await open_redis()
        assert await client.get(f"{prefix}layout") == b"4"
        assert not await client.exists(f"{prefix}r:default"), "the version-1 pending set is gone"
        assert await client.zcard(f"{prefix}dl:default") == 4
        assert await client.smembers(f"{prefix}an:job.capped") == {b"running"}
        assert await client.hget(f"{prefix}t:late", "rs") == _sortable(T0 + 100), "as Python writes it"
    finally:
        await client.aclose()
    assert await backend.stats() == {"default": {TaskState.PENDING: 4, TaskState.ACTIVE: 1}}
    first = await backend.get("first")
    assert first is not None
    assert (first.fault, first.priority, first.concurrency_key, first.expires_at) == (None, 0, None, None)

    limits = {"job.capped": FlowLimits(max_running=1)}
    await backend.enqueue_many([NewTask("capped", "job.capped", "default", b"[]", 3, None, T0 + 2, T0 + 2)])
    claimed = await backend.claim(["default"], 10, now=T0 + 10, lease_until=T0 + 40, limits=limits)
    assert [c.record.id for c in claimed] == ["first", "second", "third"], (
        "due tasks by run_at, then enqueue order; the active task of version 1 holds the only slot"
    )
    assert (
        await backend.flow_state("job.capped", None, now=T0 + 10, limits=limits["job.capped"])
    ).running == 1
    done = Settlement("running", "old-call:1", TaskState.SUCCEEDED, at=T0 + 11)
    assert await backend.settle([done]) == set(), "a lease taken under version 1 is still held"
    claimed = await backend.claim(["default"], 10, now=T0 + 100, lease_until=T0 + 140, limits=limits)
    assert [c.record.id for c in claimed] == ["capped", "late"]
    again = await open_redis()  # opening a migrated store again changes nothing
    assert await again.stats() == {"default": {TaskState.SUCCEEDED: 1, TaskState.ACTIVE: 5}}


async def test_a_store_written_by_layout_2_is_marked_the_current_layout_and_keeps_its_running_slots(
    open_redis: OpenRedis, redis_url: str, unique_name: str
) -> None:
    """Layout 3 (groups, cancellation of running tasks, progress) only adds keys and record fields whose
    absence means what a layout-2 record meant: opening a layout-2 store changes nothing but the version, and
    above all leaves the running slots of its active tasks (their rn fields, keys included) as they are."""
    prefix = f"{{{unique_name}}}:"
    limits = {"keyed": FlowLimits(max_running_per_key=1)}
    first = await open_redis()
    await first.enqueue_many(
        [NewTask(f"k{n}", "keyed", "default", b"p", 3, None, T0, T0, concurrency_key="a") for n in range(2)]
    )
    (running,) = await first.claim(["default"], 10, now=T0 + 1, lease_until=T0 + 31, limits=limits)
    client = aioredis.Redis.from_url(redis_url)
    try:
        rn = await client.hget(f"{prefix}t:{running.record.id}", "rn")
        await client.set(f"{prefix}layout", 2)
        second = await open_redis()
        assert await client.get(f"{prefix}layout") == b"4"
        assert await client.hget(f"{prefix}t:{running.record.id}", "rn") == rn == b"5:keyed:a"
        assert await client.smembers(f"{prefix}ak:5:keyeda") == {running.record.id.encode()}
    finally:
        await client.aclose()
    record = await second.get(running.record.id)
    assert record is not None
    assert (record.fault, record.cancel_requested, record.group_id, record.progress_done) == (
        None,
        False,
        None,
        None,
    )
    assert await second.claim(["default"], 10, now=T0 + 2, lease_until=T0 + 32, limits=limits) == []
    assert (
        await second.settle([Settlement(running.record.id, running.token, TaskState.SUCCEEDED, at=T0 + 3)])
        == set()
    )
    claimed = await second.claim(["default"], 10, now=T0 + 4, lease_until=T0 + 34, limits=limits)
    assert len(claimed) == 1, "the slot came back when the layout-2 lease was settled"


async def test_a_store_written_by_layout_3_is_marked_layout_4_and_counts_exactly(
    open_redis: OpenRedis, redis_url: str, unique_name: str
) -> None:
    """Layout 4 adds a member that keeps {P}:leases and the active indexes skiplists (see the prelude's KEPT),
    which the next claim puts in: a layout-3 store, without it, is marked layout 4 as it is, its running tasks
    counted, listed, settled and reclaimed as before, and the next claim's member counted nowhere."""
    prefix = f"{{{unique_name}}}:"
    first = await open_redis()
    await first.enqueue_many([_task(f"t{n}") for n in range(3)])
    running = await first.claim(["default"], 2, now=T0 + 1, lease_until=T0 + 31)
    client = aioredis.Redis.from_url(redis_url)
    try:
        for key in (f"{prefix}leases", f"{prefix}i:active:default"):  # as layout 3 wrote them
            found = cast("list[bytes]", await client.zrangebyscore(key, "+inf", "+inf"))
            (kept,) = found
            assert await client.zrem(key, kept) == 1
        await client.set(f"{prefix}layout", 3)
        second = await open_redis()
        assert await client.get(f"{prefix}layout") == b"4"
        assert await client.zcard(f"{prefix}i:active:default") == 2
        assert await second.stats() == {"default": {TaskState.PENDING: 1, TaskState.ACTIVE: 2}}
        listed = await second.list_records(states={TaskState.ACTIVE})
        assert sorted(record.id for record in listed) == ["t0", "t1"]
        done = Settlement(running[0].record.id, running[0].token, TaskState.SUCCEEDED, at=T0 + 2)
        assert await second.settle([done]) == set()
        (taken,) = await second.reclaim_expired(now=T0 + 40, lease_until=T0 + 70, limit=10)
        assert taken.record.id == running[1].record.id
        assert len(await second.claim(["default"], 10, now=T0 + 41, lease_until=T0 + 71)) == 1
        assert await client.zrangebyscore(f"{prefix}i:active:default", "+inf", "+inf") == [kept]
        assert await second.stats() == {
            "default": {TaskState.SUCCEEDED: 1, TaskState.ACTIVE: 2},
        }
        assert len(await second.list_records(states={TaskState.ACTIVE})) == 2
    finally:
        await client.aclose()
