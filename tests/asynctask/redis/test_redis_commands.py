"""What the worker's scripts make the server run, counted by a private server (``INFO commandstats``): the
per-task and per-call commands a drain pays for (issue 17), and the same results on a server without
ZMSCORE (Redis 6.0 and 6.1, whose settle looks up each task's index entry with ZSCORE)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import cast

import pytest
import redis.asyncio as aioredis

from lifecycle.asynctask import FlowLimits, NewGroup, NewTask, Settlement, TaskState
from lifecycle.asynctask.redis import RedisBackend
from lifecycle.asynctask.testing import T0
from tests.asynctask.redis.redis_servers import RedisServer

pytestmark = pytest.mark.redis


def _task(task_id: str, *, queue: str = "default") -> NewTask:
    return NewTask(task_id, "job", queue, b"[]", 3, None, T0, T0)


@pytest.fixture
async def admin(own_redis: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(own_redis.url)
    yield client
    await client.aclose()


@pytest.fixture
async def backend(own_redis: RedisServer) -> AsyncIterator[RedisBackend]:
    opened = RedisBackend(own_redis.url, prefix="commands")
    await opened.open()
    yield opened
    await opened.close()


async def _counts(admin: aioredis.Redis) -> dict[str, int]:
    stats = await admin.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(value["calls"]) for name, value in stats.items()}


async def _ran(admin: aioredis.Redis, before: dict[str, int]) -> dict[str, int]:
    after = await _counts(admin)
    ran = {name: calls - before.get(name, 0) for name, calls in after.items()}
    ran["info"] -= 1  # the count's own INFO
    return {name: calls for name, calls in ran.items() if calls}


async def _claim_all(backend: RedisBackend) -> dict[str, str]:
    claimed = await backend.claim(["q1", "q2"], 100, now=T0 + 1, lease_until=T0 + 31)
    return {c.record.id: c.token for c in claimed}


async def test_a_settle_looks_up_its_tasks_index_entries_with_one_command_per_queue(
    backend: RedisBackend, admin: aioredis.Redis
) -> None:
    await backend.enqueue_many([_task(f"a{n}", queue="q1") for n in range(6)])
    await backend.enqueue_many([_task(f"b{n}", queue="q2") for n in range(4)])
    tokens = await _claim_all(backend)
    before = await _counts(admin)
    verdicts = [Settlement(i, token, TaskState.SUCCEEDED, at=T0 + 2) for i, token in tokens.items()]
    assert await backend.settle(verdicts) == set()
    ran = await _ran(admin, before)
    assert ran.get("zmscore") == 2, ran
    assert "zscore" not in ran, ran
    assert ran["hmget"] == 10, ran
    assert ran["hset"] == 10, ran
    assert await backend.stats() == {"q1": {TaskState.SUCCEEDED: 6}, "q2": {TaskState.SUCCEEDED: 4}}


@pytest.mark.parametrize("zmscore", [True, False], ids=["zmscore", "without-zmscore"])
async def test_settlements_apply_alike_with_and_without_zmscore(
    backend: RedisBackend, admin: aioredis.Redis, zmscore: bool
) -> None:
    """Damaged q fields, a lost lease and a repeated id in one call: what a Redis 6.0 server (no ZMSCORE)
    does, the one-command lookup does too."""
    if not zmscore:
        backend._zmscore = "0"  # as open() sets it for a server older than 6.2
    await backend.enqueue_many([_task(f"a{n}", queue="q1") for n in range(4)])
    await backend.enqueue_many([_task("b0", queue="q2")])
    tokens = await _claim_all(backend)
    prefix = backend.key_prefix
    await admin.hset(f"{prefix}t:a0", "q", "q2")  # names the wrong queue: found by the full search
    await admin.hdel(f"{prefix}t:a1", "q")
    await admin.hset(f"{prefix}t:a2", "o", "0000000000000000")  # no index holds it under this o: lost
    before = await _counts(admin)
    verdicts = [
        Settlement("a0", tokens["a0"], TaskState.SUCCEEDED, at=T0 + 2),
        Settlement("a1", tokens["a1"], TaskState.DEAD, at=T0 + 2, error="e"),
        Settlement("a2", tokens["a2"], TaskState.SUCCEEDED, at=T0 + 2),
        Settlement("a3", "not-the-token", TaskState.SUCCEEDED, at=T0 + 2),
        Settlement("a3", tokens["a3"], TaskState.PENDING, at=T0 + 2, run_at=T0 + 5),
        Settlement("b0", tokens["b0"], TaskState.SUCCEEDED, at=T0 + 2),
    ]
    assert await backend.settle(verdicts) == {"a2", "a3"}
    ran = await _ran(admin, before)
    assert ("zmscore" in ran) is zmscore, ran
    assert await backend.stats() == {
        "q1": {TaskState.SUCCEEDED: 1, TaskState.DEAD: 1, TaskState.ACTIVE: 1, TaskState.PENDING: 1},
        "q2": {TaskState.SUCCEEDED: 1},
    }
    assert await admin.hget(f"{prefix}t:a0", "q") == b"q1", "the queue field is restored from the index"
    assert await admin.hget(f"{prefix}t:a1", "q") == b"q1"
    a3 = await backend.get("a3")
    assert a3 is not None
    assert (a3.state, a3.run_at) == (TaskState.PENDING, T0 + 5)


async def test_a_settle_on_a_server_that_refuses_zmscore_finds_each_entry_by_itself(
    redis_server_factory: Callable[..., RedisServer],
) -> None:
    """A server that says 6.2 or newer but refuses ZMSCORE (a failover to an older one, a renamed command):
    the settle script looks each entry up as on Redis 6.0, instead of failing the call."""
    server = redis_server_factory("--rename-command", "ZMSCORE", "")
    refusing = RedisBackend(server.url, prefix="refusing")
    await refusing.open()
    try:
        assert refusing._zmscore == "1"
        await refusing.enqueue_many([_task(f"a{n}", queue="q1") for n in range(3)])
        tokens = await _claim_all(refusing)
        verdicts = [Settlement(i, token, TaskState.SUCCEEDED, at=T0 + 2) for i, token in tokens.items()]
        assert await refusing.settle(verdicts) == set()
        assert await refusing.stats() == {"q1": {TaskState.SUCCEEDED: 3}}
    finally:
        await refusing.close()


async def test_a_group_members_settlement_reads_its_group_field_with_the_record(
    backend: RedisBackend, admin: aioredis.Redis
) -> None:
    members = tuple(NewTask(f"m{n}", "job", "q1", b"[]", 3, None, T0, T0, group_id="g") for n in range(3))
    await backend.enqueue_group(NewGroup("g", members, None, T0))
    tokens = await _claim_all(backend)
    before = await _counts(admin)
    verdicts = [Settlement(i, token, TaskState.SUCCEEDED, at=T0 + 2) for i, token in tokens.items()]
    assert await backend.settle(verdicts) == set()
    ran = await _ran(admin, before)
    assert "hget" not in ran, ran
    group = await backend.get_group("g")
    assert group is not None
    assert group.outcome is TaskState.SUCCEEDED


async def test_a_claim_without_limits_reads_no_running_counts_and_logs_in_one_command(
    backend: RedisBackend, admin: aioredis.Redis
) -> None:
    await backend.enqueue_many([_task(f"t{n}") for n in range(5)])
    before = await _counts(admin)
    claimed = await backend.claim(["default"], 3, now=T0 + 1, lease_until=T0 + 31)
    assert [c.record.id for c in claimed] == ["t0", "t1", "t2"]
    ran = await _ran(admin, before)
    # No SCARD of the name's running set and no EXISTS of {P}:check (no limit asks), no ZRANGE for the
    # wake-up (the claim saw tasks left), the call's log in one SET with its expiry.
    assert "scard" not in ran, ran
    assert "expire" not in ran, ran
    assert "rpush" not in ran, ran
    assert ran["zrange"] == 1, ran
    assert ran["set"] == 1, ran
    # One EXISTS of every key that could hold the claim back (none does: no paused queue, no expiry entry, no
    # delayed task, no parked set) stands for the SMEMBERS, ZRANGEBYSCOREs and HGETALL that read them; the
    # other EXISTS is the wake-up list's.
    assert "smembers" not in ran, ran
    assert "zrangebyscore" not in ran, ran
    assert "hgetall" not in ran, ran
    assert ran["exists"] == 2, ran
    assert await admin.llen(f"{backend.key_prefix}w:default") == 1, "another worker is woken for the rest"


async def test_a_claim_that_empties_the_ready_set_reads_it_once(
    backend: RedisBackend, admin: aioredis.Redis
) -> None:
    """An idle worker's claim finds the one task just enqueued: the short page its ZRANGE read was the ready
    set's end, so no second ZRANGE looks past it."""
    await backend.enqueue_many([_task("only")])
    before = await _counts(admin)
    claimed = await backend.claim(["default"], 5, now=T0 + 1, lease_until=T0 + 31)
    assert [c.record.id for c in claimed] == ["only"]
    ran = await _ran(admin, before)
    assert ran["zrange"] == 1, ran
    await backend.enqueue_many([_task(f"t{n}") for n in range(40)])
    claimed = await backend.claim(["default"], 30, now=T0 + 1, lease_until=T0 + 31)
    assert [c.record.id for c in claimed] == [f"t{n}" for n in range(30)]
    claimed = await backend.claim(["default"], 30, now=T0 + 1, lease_until=T0 + 31)
    assert [c.record.id for c in claimed] == [f"t{n}" for n in range(30, 40)]


async def test_a_claim_with_limits_still_counts_the_running_tasks(backend: RedisBackend) -> None:
    """The running sets a limit asks about are counted (once per call, when first needed), by name and key."""
    tasks = [
        NewTask(f"t{n}", "job", "default", b"[]", 3, None, T0, T0, concurrency_key="k") for n in range(6)
    ]
    await backend.enqueue_many(tasks)
    limits = {"job": FlowLimits(max_running=4, max_running_per_key=3)}
    first = await backend.claim(["default"], 2, now=T0 + 1, lease_until=T0 + 31, limits=limits)
    assert len(first) == 2
    second = await backend.claim(["default"], 10, now=T0 + 1, lease_until=T0 + 31, limits=limits)
    assert len(second) == 1, "three of the key run at most"


async def test_the_running_tasks_sets_are_kept_skiplists_by_a_member_no_reader_counts(
    backend: RedisBackend, admin: aioredis.Redis
) -> None:
    """The claim keeps in {P}:leases and in the active index a member longer than zset-max-listpack-value,
    scored +inf: these sets hold the running tasks, few enough to be a listpack, which every ZADD walks
    parsing the scores it passes, and every ZREM searches. The member holds a NUL (no task id does); no
    reclaim takes it, stats and listings leave it out, a purge skips it and removes the sets it kept."""
    leases, active = f"{backend.key_prefix}leases", f"{backend.key_prefix}i:active:default"
    await backend.enqueue_many([_task("a"), _task("b"), _task("c")])
    claimed = await backend.claim(["default"], 2, now=T0 + 1, lease_until=T0 + 31)
    for key in (leases, active):
        assert await admin.object("encoding", key) == b"skiplist"
        entries = cast("list[tuple[bytes, float]]", await admin.zrange(key, 0, -1, withscores=True))
        assert len(entries) == 3
        kept, score = entries[-1]
        assert b"\0" in kept
        assert len(kept) > 64
        assert score == float("inf")
    assert await backend.stats() == {"default": {TaskState.PENDING: 1, TaskState.ACTIVE: 2}}
    listed = await backend.list_records(states={TaskState.ACTIVE}, limit=2)
    assert sorted(record.id for record in listed) == ["a", "b"]
    await backend.settle([Settlement(c.record.id, c.token, TaskState.SUCCEEDED, at=T0 + 2) for c in claimed])
    assert await admin.zrange(leases, 0, -1) == [kept]
    assert await admin.zrange(active, 0, -1) == [kept]
    assert await backend.stats() == {"default": {TaskState.PENDING: 1, TaskState.SUCCEEDED: 2}}
    assert await backend.list_records(states={TaskState.ACTIVE}) == []
    assert await backend.reclaim_expired(now=T0 + 10**9, lease_until=T0 + 10**9 + 30, limit=10) == []
    assert await admin.zrange(leases, 0, -1) == [kept]
    (again,) = await backend.claim(["default"], 10, now=T0 + 3, lease_until=T0 + 33)
    (taken,) = await backend.reclaim_expired(now=T0 + 40, lease_until=T0 + 70, limit=10)
    assert taken.record.id == "c"
    assert taken.token != again.token
    assert await backend.purge(states={TaskState.ACTIVE}) == 1
    assert await backend.stats() == {"default": {TaskState.SUCCEEDED: 2}}
    assert not await admin.exists(leases), "a purge removes the leases set KEPT alone kept"
    assert await backend.purge(states={TaskState.SUCCEEDED}) == 2
    assert await backend.stats() == {}
    assert not await admin.exists(active), "and the active index of a queue it emptied"


@pytest.mark.parametrize("result", [None, b"[1]"], ids=["no-result", "result"])
@pytest.mark.parametrize("at", [T0 + 2.5, 1_700_000_003], ids=["float", "int"])
def test_a_success_is_written_as_the_general_path_writes_it(result: bytes | None, at: float) -> None:
    """The common verdict's shortcut writes the values the general path writes (taken for a state given as
    its plain string)."""
    from lifecycle.asynctask._backends.redis._codec import settlement_args

    fast = Settlement("t1", "tok:1", TaskState.SUCCEEDED, at=at, result=result)
    general = Settlement("t1", "tok:1", "succeeded", at=at, result=result)  # type: ignore[arg-type]
    assert settlement_args(fast) == settlement_args(general)
