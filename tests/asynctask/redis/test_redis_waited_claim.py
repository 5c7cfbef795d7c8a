"""The claim sent behind a wait on its plain path: its grace step reads each queue's first page of ready
tasks (``limit + 16`` entries), and the plain path takes its pages from there instead of reading the ready
sets again. What it stores and returns must be what the general part does with the same arguments, for every
way the page can end (short, exactly one page, more than a page, a second queue's shorter page)."""

from __future__ import annotations

import itertools
from dataclasses import replace
from typing import Any

import pytest
import redis.asyncio as aioredis

from lifecycle.asynctask import ClaimedTask, FlowLimits, NewTask
from lifecycle.asynctask._backends.redis._codec import claimed_tasks, limits_args, time_text
from lifecycle.asynctask.redis import RedisBackend
from lifecycle.asynctask.testing import T0
from tests.asynctask.redis.redis_servers import OpenRedis, RedisServer, stored_keys

pytestmark = pytest.mark.redis

# A limit of a name no task has: the claim takes the general part and applies no limit to these tasks.
UNRELATED = {"no-such-task": FlowLimits(max_running=1000)}


def _task(task_id: str, **fields: Any) -> NewTask:
    task = NewTask(task_id, "job", "default", b"[]", 3, None, T0, T0)
    return replace(task, **fields) if fields else task


def _shown(reply: list[Any]) -> tuple[Any, list[tuple[Any, ...]]]:
    claimed: list[ClaimedTask] = claimed_tasks(reply[1:])
    return reply[0], [(c.record, c.token) for c in claimed]


def _waited_args(
    backend: RedisBackend, call: str, now: float, limit: int, queues: list[str], *, general: bool
) -> list[str]:
    """What a claim behind a wait sends, its wait's start stored nowhere (so no time is added: the claim's
    now is the caller's, moved up by the grace step only, the same in both runs)."""
    limits = limits_args(UNRELATED if general else None)
    began = f"@{backend.key_prefix}u:none:t"
    return [time_text(now), began, time_text(now + 30), str(limit), call, "", *limits, *queues]


async def _both(
    open_redis: OpenRedis, unique_name: str, tasks: list[NewTask], claims: list[tuple[list[str], int, float]]
) -> tuple[list[Any], list[Any], dict[str, Any], dict[str, Any]]:
    plain = await open_redis(prefix=f"{unique_name}-plain")
    general = await open_redis(prefix=f"{unique_name}-general")
    client = plain._run().client
    replies: dict[RedisBackend, list[Any]] = {plain: [], general: []}
    for backend, got in replies.items():
        numbers = itertools.count(1)
        await backend.enqueue_many(tasks)
        for queues, limit, now in claims:
            args = _waited_args(backend, f"x.{next(numbers)}", now, limit, queues, general=backend is general)
            got.append(_shown(await backend._run().run("claim", args)))
    stored = await stored_keys(client, plain.key_prefix)
    expected = await stored_keys(client, general.key_prefix)
    return replies[plain], replies[general], stored, expected


@pytest.mark.parametrize(
    ("case", "counts"),
    [
        # (tasks in default, tasks in other), limit; then what the first claim takes
        ("short pages", ((5, 3), 4)),
        ("a second queue's page cut to its want", ((2, 20), 10)),
        ("a second queue with exactly a page", ((2, 24), 10)),
        ("a second queue with more than a page", ((2, 25), 10)),
        ("the first queue with exactly a page", ((30, 0), 14)),
        ("nothing ready", ((0, 0), 3)),
    ],
)
async def test_a_claim_behind_a_wait_stores_and_returns_what_the_general_part_does(
    open_redis: OpenRedis, unique_name: str, case: str, counts: tuple[tuple[int, int], int]
) -> None:
    (in_default, in_other), limit = counts
    # Some ready tasks run_at a little ahead of the caller's now (the grace step moves now up to them), some
    # well ahead (beyond the grace: not due, left in the page).
    tasks = [
        _task(f"d{i:02}", enqueued_at=T0 + (i % 3) * 0.25, run_at=T0 + (i % 3) * 0.25)
        for i in range(in_default)
    ]
    tasks += [
        _task(
            f"o{i:02}",
            queue="other",
            enqueued_at=T0 + (5 if i % 7 == 6 else 0.5),
            run_at=T0 + (5 if i % 7 == 6 else 0.5),
        )
        for i in range(in_other)
    ]
    claims = [
        (["default", "other"], limit, T0),
        (["other", "default"], limit, T0 + 0.1),
        (["default"], 64, T0 + 10),
    ]
    plain, general, stored, expected = await _both(open_redis, unique_name, tasks, claims)
    assert plain == general
    assert stored == expected
    if in_default + in_other:
        assert plain[0][1], "the first claim took tasks"


async def _counts(admin: aioredis.Redis) -> dict[str, int]:
    stats = await admin.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(value["calls"]) for name, value in stats.items()}


async def test_the_plain_path_behind_a_wait_reads_each_ready_set_once(own_redis: RedisServer) -> None:
    backend = RedisBackend(own_redis.url, prefix="waited-once")
    await backend.open()
    admin = aioredis.Redis.from_url(own_redis.url)
    try:
        await backend.enqueue_many(
            [_task("a", enqueued_at=T0 + 0.5, run_at=T0 + 0.5), _task("b", queue="other")]
        )
        before = await _counts(admin)
        args = _waited_args(backend, "once.1", T0, 5, ["default", "other"], general=False)
        _, taken = _shown(await backend._run().run("claim", args))
        after = await _counts(admin)
        assert [record.id for record, _ in taken] == ["a", "b"]
        assert after.get("zrange", 0) - before.get("zrange", 0) == 2, "one ZRANGE per queue"
    finally:
        await backend.clear()
        await backend.close()
        await admin.aclose()
