"""The claim script's plain path: a claim without limits whose queues hold only ready tasks to take runs
before the prelude is defined, and must store and return exactly what the general part does; anything else
(an expiry or a delayed task due, parked tasks, a damaged record, a second page, a repeated call) is left to
the general part, with nothing written before."""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

import pytest
import redis.asyncio as aioredis

from lifecycle.asynctask import ClaimedTask, FlowLimits, NewGroup, NewTask
from lifecycle.asynctask._backends.redis._codec import claimed_tasks, limits_args, sortable_time, time_text
from lifecycle.asynctask._backends.redis._conn import SCRIPTS
from lifecycle.asynctask._backends.redis._lua import PRELUDE
from lifecycle.asynctask._backends.redis._lua_claim import PLAIN_BOUND, SCAN_BOUND
from lifecycle.asynctask.redis import RedisBackend
from lifecycle.asynctask.testing import T0
from tests.asynctask.redis.redis_servers import OpenRedis, counted_call_ids, stored_keys

pytestmark = pytest.mark.redis

# A limit of a name no task has: the claim takes the general part and applies no limit to these tasks.
UNRELATED = {"no-such-task": FlowLimits(max_running=1000)}


def _task(task_id: str, **fields: Any) -> NewTask:
    task = NewTask(task_id, "job", "default", b"[]", 3, None, T0, T0)
    return replace(task, **fields) if fields else task


def _shown(claimed: list[ClaimedTask]) -> list[tuple[Any, ...]]:
    return [(c.record, c.token) for c in claimed]


async def _both(
    open_redis: OpenRedis,
    unique_name: str,
    monkeypatch: pytest.MonkeyPatch,
    tasks: list[NewTask],
    claims: list[tuple[list[str], int, float]],
    *,
    groups: tuple[NewGroup, ...] = (),
    damage: Callable[[RedisBackend, aioredis.Redis], Awaitable[None]] | None = None,
) -> tuple[list[Any], list[Any], dict[str, Any], dict[str, Any]]:
    """Store ``tasks`` (and ``groups``) under two prefixes, let ``damage`` change each store, then run
    ``claims`` (queues, limit, now; a 30 s lease) on each, plainly and with an unrelated limit (the general
    part); return both replies and both stores."""
    plain = await open_redis(prefix=f"{unique_name}-plain")
    general = await open_redis(prefix=f"{unique_name}-general")
    client = plain._run().client
    replies: dict[RedisBackend, list[Any]] = {plain: [], general: []}
    for backend, got in replies.items():
        counted_call_ids(backend, monkeypatch)
        if tasks:
            await backend.enqueue_many(tasks)
        for group in groups:
            await backend.enqueue_group(group)
        if damage is not None:
            await damage(backend, client)
        limits = None if backend is plain else UNRELATED
        for queues, limit, now in claims:
            got.append(
                _shown(await backend.claim(queues, limit, now=now, lease_until=now + 30, limits=limits))
            )
    stored = await stored_keys(client, plain.key_prefix)
    expected = await stored_keys(client, general.key_prefix)
    return replies[plain], replies[general], stored, expected


def test_the_plain_path_returns_before_the_prelude_and_defines_no_function() -> None:
    source = SCRIPTS["claim"].source
    assert PRELUDE in source
    before = source[: source.index(PRELUDE)]
    assert "return out" in before
    # unsortable() only: what the claim shares with prepare_wait, needed by the wait's grace step.
    assert before.count("function") == 1
    assert "local function unsortable(hex)" in before


async def test_the_plain_path_stores_and_returns_what_the_general_part_does(
    open_redis: OpenRedis, unique_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    tasks = [
        _task("a"),
        _task("b", priority=5),
        _task("c", meta="\x00tenant\x00acme", concurrency_key="user-1"),
        _task("d", expires_at=T0 + 90, timeout=2.5, max_retries=0),
        _task("e", queue="other", name="other-job"),
        _task("f", payload=b"\x00\xff binary"),
        _task("g", concurrency_key="user-1"),
    ]
    group = NewGroup("grp", (_task("m1", group_id="grp"), _task("m2", group_id="grp")), None, T0)
    # Three of the default queue (a limit reached: another worker is woken), then the rest of both queues.
    claims = [(["default", "other"], 3, T0 + 1), (["other", "default"], 10, T0 + 1), (["default"], 5, T0 + 1)]
    plain, general, stored, expected = await _both(
        open_redis, unique_name, monkeypatch, tasks, claims, groups=(group,)
    )
    assert [len(reply) for reply in plain] == [3, 6, 0]
    assert plain == general
    assert len(stored) > 15
    assert stored == expected


@pytest.mark.parametrize(
    "case",
    [
        "expired",
        "delayed due",
        "delayed not due",
        "not due at the head",
        "wrong queue",
        "full",
        "gone",
        "listed twice",
    ],
)
async def test_what_the_plain_path_leaves_to_the_general_part_ends_the_same(
    open_redis: OpenRedis, unique_name: str, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    tasks = [_task("first"), _task("second")]
    if case == "expired":
        tasks.insert(1, _task("old", expires_at=T0 + 0.5))
    elif case == "delayed due":
        tasks.append(_task("later", run_at=T0 + 0.5))
    elif case == "delayed not due":
        tasks.append(_task("future", run_at=T0 + 60))
    elif case == "not due at the head":
        # Ready (due at their enqueue) but not by the claim's clock, and first by priority: the plain path's
        # page holds none it may take, so a second page is the general part's.
        tasks += [_task(f"h{i:02}", enqueued_at=T0 + 50, run_at=T0 + 50, priority=1) for i in range(20)]
    elif case == "full":
        tasks += [_task(f"n{i:02}") for i in range(PLAIN_BOUND + 20)]

    async def damage(backend: RedisBackend, client: aioredis.Redis) -> None:
        if case == "wrong queue":
            await client.hset(f"{backend.key_prefix}t:first", "q", "elsewhere")
        elif case == "gone":
            await client.delete(f"{backend.key_prefix}t:first")
        elif case == "listed twice":
            # A second ready entry for one id (a damaged store): the general part reads the record again after
            # its first lease, so the second lease counts a second attempt.
            first = f"{backend.key_prefix}t:first"
            sortable: Any = await client.hget(first, "rs")
            assert isinstance(sortable, bytes)
            await client.zadd(f"{backend.key_prefix}rd:default", {sortable + b"f" * 16 + b"first": 0})

    limit = PLAIN_BOUND if case == "full" else 3
    claims = [(["default"], limit, now) for now in (T0 + 1, T0 + 100)]
    plain, general, stored, expected = await _both(
        open_redis, unique_name, monkeypatch, tasks, claims, damage=damage
    )
    assert plain == general
    assert plain[0], "the first claim took tasks"
    assert stored == expected


async def test_a_repeated_plain_claim_returns_what_it_leased_and_leases_no_more(
    open_redis: OpenRedis,
) -> None:
    backend = await open_redis()
    await backend.enqueue_many([_task(f"t{n}") for n in range(4)])
    runner = backend._run()
    # What RedisBackend.claim sends, sent twice: a retry after a lost reply.
    args = [time_text(T0 + 1), sortable_time(T0 + 1), time_text(T0 + 31), "2", "same.1", "", "0", "default"]
    first = await runner.run("claim", args)
    again = await runner.run("claim", args)
    assert [c.record.id for c in claimed_tasks(first[1:])] == ["t0", "t1"]
    assert again == first
    assert [c.record.id for c in await backend.claim(["default"], 5, now=T0 + 1, lease_until=T0 + 31)] == [
        "t2",
        "t3",
    ]


async def test_the_plain_path_logs_and_counts_ids_and_names_that_hold_a_nul_byte(
    open_redis: OpenRedis, unique_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The call log and the running sets' keys take the id and the name whole (the plain path builds them
    with string.format('%d') and concatenation: its %s would end them at the NUL byte), so a repeat of the
    claim replays the leases, and both paths store the same."""
    tasks = [_task("a\x00b", name="jo\x00b"), _task("c")]
    plain, general, stored, expected = await _both(
        open_redis, unique_name, monkeypatch, tasks, [(["default"], 3, T0 + 1)]
    )
    assert plain == general
    assert stored == expected
    backend = await open_redis(prefix=f"{unique_name}-repeat")
    await backend.enqueue_many(tasks)
    args = [time_text(T0 + 1), sortable_time(T0 + 1), time_text(T0 + 31), "3", "same.1", "", "0", "default"]
    first = await backend._run().run("claim", args)
    assert [c.record.id for c in claimed_tasks(first[1:])] == ["a\x00b", "c"]
    assert await backend._run().run("claim", args) == first


_TIMES = [
    0.0,
    -0.0,
    1.0,
    -1.0,
    5e-324,
    -5e-324,
    1e-300,
    T0,
    T0 + 0.1234567,
    1_765_123_456.1234567,
    -1_765_123_456.1234567,
    2.0**53 + 2,
    1e308,
    -1e308,
    math.inf,
    -math.inf,
]


async def test_the_scripts_sortable_times_are_sortable_time_and_back(open_redis: OpenRedis) -> None:
    """The claim's sortable form of its measured now (behind a wait) and unsortable() (its grace step and
    prepare_wait's) work on the double's two 32-bit halves: the same digits as sortable_time(), and back."""
    client = (await open_redis())._run().client
    source = SCRIPTS["claim"].source
    start = source.index("  local hi, lo = struct.unpack('>I4I4'")
    end = source.index("  SNOW = string.format('%08x%08x', hi, lo)\n") + len(
        "  SNOW = string.format('%08x%08x', hi, lo)\n"
    )
    sortable = "local out = {}\nfor i = 1, #ARGV do\nlocal NOW, SNOW = tonumber(ARGV[i]), nil\n"
    sortable += source[start:end]
    sortable += "out[i] = SNOW\nend\nreturn out\n"
    unsortable = source[: source.index("local P = ARGV[1]")]
    unsortable += (
        "local out = {}\nfor i = 1, #ARGV do\nout[i] = string.format('%.17g', unsortable(ARGV[i]))\n"
    )
    unsortable += "end\nreturn out\n"
    texts = [repr(t) for t in _TIMES]
    digits = [bytes(d).decode() for d in await client.eval(sortable, 0, *texts)]
    assert digits == [sortable_time(t) for t in _TIMES]
    back = [float(bytes(t)) for t in await client.eval(unsortable, 0, *digits)]
    assert [math.copysign(1, t) for t in back] == [math.copysign(1, t) for t in _TIMES]
    assert back == _TIMES


async def test_a_claim_that_reaches_the_scan_bound_says_so_on_either_path(
    open_redis: OpenRedis, unique_name: str
) -> None:
    """Queues whose ready sets hold only tasks not due by the claim's clock: the entries looked at count
    against SCAN_BOUND on the plain path as on the general part, which answers that it stopped there."""
    queues = [f"q{n:02}" for n in range(SCAN_BOUND // 18 + 4)]
    # 18 each: a page shorter than a claim of 3 reads (19), so every queue's page is the set's end.
    tasks = [
        _task(f"{queue}-{i:02}", queue=queue, enqueued_at=T0 + 50, run_at=T0 + 50)
        for queue in queues
        for i in range(18)
    ]
    replies = []
    for name, limits in (("plain", limits_args(None)), ("general", limits_args(UNRELATED))):
        backend = await open_redis(prefix=f"{unique_name}-{name}")
        await backend.enqueue_many(tasks)
        args = [
            time_text(T0 + 1),
            sortable_time(T0 + 1),
            time_text(T0 + 31),
            "3",
            "c.1",
            "",
            *limits,
            *queues,
        ]
        replies.append(await backend._run().run("claim", args))
    assert replies[0] == replies[1] == [b"1"]


@pytest.mark.parametrize("case", ["a queue named twice", "the bound reached by the last entry"])
async def test_calls_the_plain_path_would_read_wrongly_go_to_the_general_part(
    open_redis: OpenRedis, unique_name: str, case: str
) -> None:
    """Script calls the backend itself never makes, which the plain path's read-then-write plan would answer
    differently from the general part: a queue named twice (it would lease its tasks twice), and a scan
    that reaches SCAN_BOUND exactly with the last queue's last entry (the general part says it stopped)."""
    if case == "a queue named twice":
        queues, limit = ["default", "default"], 5
        tasks = [_task("a"), _task("b")]
    else:
        # Full queues of not-due tasks (pages shorter than a claim of 20 reads), then one that brings the
        # count of entries looked at to SCAN_BOUND exactly.
        per_queue = 35
        full, rest = divmod(SCAN_BOUND, per_queue)
        counts = [per_queue] * full + ([rest] if rest else [])
        queues, limit = [f"q{n:02}" for n in range(len(counts))], 20
        tasks = [
            _task(f"{queue}-{i:02}", queue=queue, enqueued_at=T0 + 50, run_at=T0 + 50)
            for queue, count in zip(queues, counts, strict=True)
            for i in range(count)
        ]
        assert sum(counts) == SCAN_BOUND
    replies, stores = [], []
    for name, limits in (("plain", limits_args(None)), ("general", limits_args(UNRELATED))):
        backend = await open_redis(prefix=f"{unique_name}-{name}")
        await backend.enqueue_many(tasks)
        args = [time_text(T0 + 1), sortable_time(T0 + 1), time_text(T0 + 31), str(limit), "c.1", ""]
        replies.append(await backend._run().run("claim", [*args, *limits, *queues]))
        stores.append(await stored_keys(backend._run().client, backend.key_prefix))
    assert replies[0] == replies[1]
    assert stores[0] == stores[1]
    if case == "a queue named twice":
        assert [c.record.id for c in claimed_tasks(replies[0][1:])] == ["a", "b"]
    else:
        assert replies[0] == [b"1"]
