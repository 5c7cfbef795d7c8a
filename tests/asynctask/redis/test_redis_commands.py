"""What the worker's scripts make the server run, counted by a private server (``INFO commandstats``): the
per-task and per-call commands a drain pays for (issue 17), and the same results on a server without
ZMSCORE (Redis 6.0 and 6.1, whose settle looks up each task's index entry with ZSCORE)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

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
    assert ran["exists"] == 1, "only the wake-up list's"
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


async def test_the_leases_are_scored_in_whole_seconds_and_reclaimed_when_the_exact_lease_ends(
    backend: RedisBackend, admin: aioredis.Redis
) -> None:
    """{P}:leases holds lease_until rounded up to a whole second (an integer score, which a small sorted set
    compares without parsing it); reclaim reads the record's exact lease_until for the leases of the current
    second, so a lease is taken over exactly when it ends, as before."""
    leases = f"{backend.key_prefix}leases"
    await backend.enqueue_many([_task("a"), _task("b")])
    claimed = await backend.claim(["default"], 1, now=T0 + 1, lease_until=T0 + 30.25)
    assert await admin.zscore(leases, "a") == T0 + 31
    assert await backend.reclaim_expired(now=T0 + 30.2, lease_until=T0 + 60, limit=10) == []
    assert await backend.reclaim_expired(now=T0 + 30.25, lease_until=T0 + 60, limit=10) == []
    (taken,) = await backend.reclaim_expired(now=T0 + 30.3, lease_until=T0 + 60.5, limit=10)
    assert taken.record.id == "a"
    assert taken.token != claimed[0].token
    assert await admin.zscore(leases, "a") == T0 + 61
    assert await backend.extend_leases([("a", taken.token)], lease_until=T0 + 70.01) == set()
    assert await admin.zscore(leases, "a") == T0 + 71
    record = await backend.get("a")
    assert record is not None
    assert record.lease_until == T0 + 70.01, "the record keeps the exact lease_until"
    assert await backend.reclaim_expired(now=T0 + 70.005, lease_until=T0 + 100, limit=10) == []
    # A score as older versions wrote it (the exact lease_until) reads the same.
    await admin.zadd(leases, {"a": T0 + 70.01})
    assert await backend.reclaim_expired(now=T0 + 70.005, lease_until=T0 + 100, limit=10) == []
    (again,) = await backend.reclaim_expired(now=T0 + 70.02, lease_until=T0 + 100, limit=10)
    assert again.record.id == "a"


@pytest.mark.parametrize("result", [None, b"[1]"], ids=["no-result", "result"])
@pytest.mark.parametrize("at", [T0 + 2.5, 1_700_000_003], ids=["float", "int"])
def test_a_success_is_written_as_the_general_path_writes_it(result: bytes | None, at: float) -> None:
    """The common verdict's shortcut writes the values the general path writes (taken for a state given as
    its plain string)."""
    from lifecycle.asynctask._backends.redis._codec import settlement_args

    fast = Settlement("t1", "tok:1", TaskState.SUCCEEDED, at=at, result=result)
    general = Settlement("t1", "tok:1", "succeeded", at=at, result=result)  # type: ignore[arg-type]
    assert settlement_args(fast) == settlement_args(general)
