"""RedisBackend's own flow-control cases, beyond the public conformance rules (``FlowRules``): tasks held
back are parked, so a saturated name at the head of a queue costs later claims nothing and the names behind it
are claimed; idle workers wake for held tasks (a freed slot, a refilled token, a resumed queue); a free slot
is never left unused while tasks wait; limits that change take effect without a freed slot; and slots come
back in every way a task leaves ACTIVE, a record deleted behind the backend's back included.

Times are explicit (``T0`` plus offsets) except where a test is about waking a waiting worker, which waits in
real time by the backend's clock."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import anyio
import pytest
import redis.asyncio as aioredis

from lifecycle.asynctask import FlowLimits, NewTask, Settlement, TaskState
from lifecycle.asynctask._backends.redis._lua_claim import SCAN_BOUND
from lifecycle.asynctask.redis import RedisBackend
from lifecycle.asynctask.testing import T0
from tests.asynctask.redis.redis_servers import OpenRedis, RedisServer

pytestmark = pytest.mark.redis

PROMPT = 10.0
"""How long something that should happen at once may take on a busy machine before the test fails."""

CAPPED = "job.capped"
KEYED = "job.keyed"


def _task(
    task_id: str,
    name: str = "job.plain",
    *,
    at: float = T0,
    run_at: float | None = None,
    queue: str = "default",
    key: str | None = None,
    priority: int = 0,
    expires_at: float | None = None,
) -> NewTask:
    return NewTask(
        task_id,
        name,
        queue,
        b"[]",
        3,
        None,
        at,
        at if run_at is None else run_at,
        priority=priority,
        concurrency_key=key,
        expires_at=expires_at,
    )


async def _claim(
    backend: RedisBackend,
    limits: dict[str, FlowLimits] | None,
    now: float,
    limit: int = 10,
    queues: tuple[str, ...] = ("default",),
) -> list[str]:
    claimed = await backend.claim(list(queues), limit, now=now, lease_until=now + 30, limits=limits)
    return [c.record.id for c in claimed]


async def _done(backend: RedisBackend, task_id: str, at: float) -> None:
    record = await backend.get(task_id)
    assert record is not None
    assert record.state is TaskState.ACTIVE
    token = await _token(backend, task_id)
    assert await backend.settle([Settlement(task_id, token, TaskState.SUCCEEDED, at=at)]) == set()


async def _token(backend: RedisBackend, task_id: str) -> str:
    runner = backend._run()
    value = await runner.client.hget(f"{backend.key_prefix}t:{task_id}", "k")
    assert isinstance(value, bytes)
    return value.decode()


@pytest.fixture
async def admin(own_redis: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(own_redis.url)
    yield client
    await client.aclose()


def _blocking(backend: RedisBackend, monkeypatch: pytest.MonkeyPatch) -> anyio.Event:
    """An event set when ``backend``'s next wait starts blocking on the server (past its check for due
    work, so that only a wake-up can end it early)."""
    waiting = backend._waiting
    assert waiting is not None
    real_block = waiting.block
    blocking = anyio.Event()

    async def block(keys: list[str], pause: float) -> None:
        blocking.set()
        await real_block(keys, pause)

    monkeypatch.setattr(waiting, "block", block)
    return blocking


async def _commands(admin: aioredis.Redis) -> int:
    return int((await admin.info("stats"))["total_commands_processed"])


# -- parking: bounded work per claim ---------------------------------------------------------------------


async def test_a_saturated_name_at_the_head_is_parked_and_the_names_behind_it_are_claimed(
    own_redis: RedisServer, admin: aioredis.Redis
) -> None:
    backend = RedisBackend(own_redis.url, prefix="head")
    await backend.open()
    try:
        limits = {CAPPED: FlowLimits(max_running=1)}
        head = [_task(f"a{n:05d}", CAPPED) for n in range(10_000)]
        for start in range(0, len(head), 2_000):
            await backend.enqueue_many(head[start : start + 2_000])
        await backend.enqueue_many([_task(f"b{n}", at=T0 + 1) for n in range(5)])

        taken: list[str] = []
        calls = 0
        while not any(task_id.startswith("b") for task_id in taken):
            calls += 1
            assert calls <= 10_000 // SCAN_BOUND + 2, "each claim must get further through the held tasks"
            taken += await _claim(backend, limits, T0 + 10, limit=5)
            if calls == 1:
                with anyio.fail_after(PROMPT):  # it stopped at its bound: the next wait returns at once
                    await backend.wait_for_work(["default"], timeout=60)
        assert calls > 1, "one claim call examines at most SCAN_BOUND held tasks"
        assert taken == ["a00000", "b0", "b1", "b2", "b3", "b4"]

        before = await _commands(admin)
        assert await _claim(backend, limits, T0 + 11) == []
        spent = await _commands(admin) - before
        assert spent < 30, (
            f"a claim past 9 999 parked tasks must cost next to nothing, it ran {spent} commands"
        )
        started = time.monotonic()
        await backend.wait_for_work(["default"], timeout=0.3)
        assert time.monotonic() - started >= 0.25, "parked tasks must not end every wait at once"

        await _done(backend, "a00000", T0 + 12)
        before = await _commands(admin)
        assert await _claim(backend, limits, T0 + 13) == ["a00001"], (
            "the freed slot goes to the next in order"
        )
        assert await _commands(admin) - before < 40
    finally:
        await backend.clear()
        await backend.close()


async def test_a_free_slot_is_not_lost_when_the_task_released_for_it_goes_away_unclaimed(
    open_redis: OpenRedis,
) -> None:
    backend = await open_redis()
    limits = {CAPPED: FlowLimits(max_running=1)}
    await backend.enqueue_many([_task(task_id, CAPPED) for task_id in ("a", "b", "c")])
    assert await _claim(backend, limits, T0 + 1) == ["a"]  # b and c are parked
    await _done(backend, "a", T0 + 2)
    await backend.enqueue_many([_task("urgent", priority=10, at=T0 + 2)])
    # The freed slot moves b back to the ready set, but the batch of one is filled by the urgent task first.
    assert await _claim(backend, limits, T0 + 3, limit=1) == ["urgent"]
    assert await backend.cancel(["b"], now=T0 + 4) == ["b"]
    assert await _claim(backend, limits, T0 + 5) == ["c"], "the slot b would have taken goes to c"


async def test_a_parked_task_that_expires_is_cancelled_without_a_freed_slot(open_redis: OpenRedis) -> None:
    backend = await open_redis()
    limits = {CAPPED: FlowLimits(max_running=1)}
    await backend.enqueue_many([_task("running", CAPPED), _task("short", CAPPED, expires_at=T0 + 5)])
    assert await _claim(backend, limits, T0 + 1) == ["running"]
    assert await _claim(backend, limits, T0 + 10) == []
    record = await backend.get("short")
    assert record is not None
    assert (record.state, record.last_error, record.finished_at) == (
        TaskState.CANCELLED,
        "expired before it started",
        T0 + 10,
    )


async def test_limits_that_change_take_effect_without_a_freed_slot(open_redis: OpenRedis) -> None:
    backend = await open_redis()
    await backend.enqueue_many(
        [_task(f"c{n}", CAPPED) for n in range(5)]
        + [_task(f"k{n}", KEYED, key=f"k{n % 2}") for n in range(6)]
    )
    tight = {CAPPED: FlowLimits(max_running=1), KEYED: FlowLimits(max_running_per_key=1)}
    assert await _claim(backend, tight, T0 + 1) == ["c0", "k0", "k1"]
    looser = {CAPPED: FlowLimits(max_running=3), KEYED: FlowLimits(max_running_per_key=2)}
    assert await _claim(backend, looser, T0 + 2) == ["c1", "c2", "k2", "k3"]
    assert await _claim(backend, looser, T0 + 3) == []
    assert await _claim(backend, {}, T0 + 4) == ["c3", "c4", "k4", "k5"], "no limits: nothing is held back"


async def test_a_record_deleted_while_active_gives_its_slot_back_when_its_lease_ends(
    open_redis: OpenRedis,
) -> None:
    """Like a worker that died: the slot is held until the lease ends, then recovery gives it back."""
    backend = await open_redis()
    limits = {CAPPED: FlowLimits(max_running=1, max_running_per_key=1)}
    await backend.enqueue_many(
        [
            _task("gone", CAPPED, key="k"),
            _task("same-key", CAPPED, key="k"),
            _task("other-key", CAPPED, key="j"),
        ]
    )
    assert await _claim(backend, limits, T0 + 1) == ["gone"]
    await backend._run().client.delete(f"{backend.key_prefix}t:gone")  # behind the backend's back
    assert await _claim(backend, limits, T0 + 2) == []
    assert await backend.reclaim_expired(now=T0 + 100, lease_until=T0 + 200, limit=10) == []
    assert await _claim(backend, limits, T0 + 101, limit=1) == ["same-key"], "both of its slots came back"
    state = await backend.flow_state(CAPPED, "k", now=T0 + 101, limits=limits[CAPPED])
    assert (state.running, state.running_for_key) == (1, 1)
    await _done(backend, "same-key", T0 + 102)
    assert await _claim(backend, limits, T0 + 103) == ["other-key"]


async def test_purging_an_active_task_gives_its_slot_back(open_redis: OpenRedis) -> None:
    backend = await open_redis()
    limits = {CAPPED: FlowLimits(max_running=1)}
    await backend.enqueue_many([_task("first", CAPPED), _task("second", CAPPED)])
    assert await _claim(backend, limits, T0 + 1) == ["first"]
    assert await _claim(backend, limits, T0 + 2) == []
    assert await backend.purge(states=[TaskState.ACTIVE]) == 1
    assert await _claim(backend, limits, T0 + 3) == ["second"]


# -- idle workers wake for held tasks --------------------------------------------------------------------


async def test_an_idle_worker_wakes_when_another_process_frees_a_slot(
    open_redis: OpenRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    worker = await open_redis()
    other = await open_redis()
    limits = {CAPPED: FlowLimits(max_running=1)}
    now = time.time()
    await other.enqueue_many([_task("first", CAPPED, at=now), _task("second", CAPPED, at=now)])
    assert await _claim(other, limits, now) == ["first"]
    assert await _claim(worker, limits, now) == []
    woken = anyio.Event()
    blocking = _blocking(worker, monkeypatch)

    async def wait() -> None:
        await worker.wait_for_work(["default"], timeout=120)
        woken.set()

    with anyio.fail_after(PROMPT):
        async with anyio.create_task_group() as group:
            group.start_soon(wait)
            await blocking.wait()
            assert not woken.is_set()
            await _done(other, "first", time.time())
            await woken.wait()
    assert await _claim(worker, limits, time.time()) == ["second"]


async def test_an_idle_worker_wakes_when_the_rate_bucket_has_a_token_again(open_redis: OpenRedis) -> None:
    worker = await open_redis()
    limits = {CAPPED: FlowLimits(rate=1, per=0.5)}
    now = time.time()
    await worker.enqueue_many([_task("first", CAPPED, at=now), _task("second", CAPPED, at=now)])
    assert await _claim(worker, limits, now) == ["first"]
    assert await _claim(worker, limits, time.time()) == []  # parked until the bucket refills
    with anyio.fail_after(PROMPT):
        started = time.monotonic()
        await worker.wait_for_work(["default"], timeout=120)
    assert time.monotonic() - started < 5, "the wait ends when the token is due, not at its timeout"
    assert await _claim(worker, limits, time.time()) == ["second"], "and not before the token is there"


async def test_resuming_a_queue_wakes_its_idle_workers(
    open_redis: OpenRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    worker = await open_redis()
    operator = await open_redis()
    await operator.pause("default")
    now = time.time()
    await operator.enqueue_many([_task("held", at=now)])
    woken = anyio.Event()
    blocking = _blocking(worker, monkeypatch)

    async def wait() -> None:
        await worker.wait_for_work(["default"], timeout=120)
        woken.set()

    with anyio.fail_after(PROMPT):
        async with anyio.create_task_group() as group:
            group.start_soon(wait)
            await blocking.wait()
            assert not woken.is_set(), "a due task of a paused queue is no work"
            await operator.resume("default")
            await woken.wait()
    assert await _claim(worker, None, time.time()) == ["held"]


async def test_a_claim_counts_as_refused_only_when_it_leaves_tasks_waiting_for_a_token(
    open_redis: OpenRedis,
) -> None:
    backend = await open_redis()
    limits = {CAPPED: FlowLimits(rate=2, per=10.0)}
    await backend.enqueue_many([_task(f"r{n}", CAPPED) for n in range(3)])
    assert await _claim(backend, limits, T0) == ["r0", "r1"]
    assert (await backend.flow_state(CAPPED, None, now=T0, limits=limits[CAPPED])).refused == 1
    assert await _claim(backend, limits, T0 + 1) == []  # still parked, waiting for its token: refused again
    assert await _claim(backend, limits, T0 + 100) == ["r2"], "the refilled bucket lets the parked task start"
    assert (await backend.flow_state(CAPPED, None, now=T0 + 100, limits=limits[CAPPED])).refused == 2
