"""Groups on Redis: the group and its members stored in one script, and the fan-in kept up to date inside the
script that ends each member, so a group's ``then`` is stored exactly once, in the same atomic step as the
last member's success: also when the last two members settle in one batch, and never again when a
settlement is replayed after its reply was lost (even once the ``then`` ran and was purged meanwhile).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
import redis.asyncio as aioredis

from lifecycle.asynctask import DuplicateTaskError, FlowLimits, NewTask, Settlement, TaskState
from lifecycle.asynctask._records import NewGroup
from lifecycle.asynctask.redis import RedisBackend
from lifecycle.asynctask.testing import T0
from tests.asynctask.redis.redis_servers import OpenRedis, keys_of
from tests.asynctask.redis.test_redis_retries import lose_first_reply

pytestmark = pytest.mark.redis


def _task(task_id: str, *, group: str | None = None, name: str = "job", **changes: Any) -> NewTask:
    task = NewTask(task_id, name, "default", b"payload", 3, None, T0, T0, group_id=group)
    return replace(task, **changes) if changes else task


def _group(group_id: str, size: int, *, then: str | None = "then", **changes: Any) -> NewGroup:
    members = tuple(_task(f"{group_id}-{n}", group=group_id, **changes) for n in range(size))
    return NewGroup(group_id, members, None if then is None else _task(then), T0, meta=None)


async def _claim_all(backend: RedisBackend, now: float = T0 + 1) -> dict[str, str]:
    """Claim every due task: id -> token."""
    claimed = await backend.claim(["default"], 1000, now=now, lease_until=now + 30)
    return {c.record.id: c.token for c in claimed}


def _done(task_id: str, token: str, at: float, result: bytes | None = None) -> Settlement:
    return Settlement(task_id, token, TaskState.SUCCEEDED, at=at, result=result)


async def test_a_group_is_stored_with_its_members_and_keeps_its_then_until_it_succeeds(
    open_redis: OpenRedis,
) -> None:
    backend = await open_redis()
    assert await backend.enqueue_group(replace(_group("g", 3), meta="m")) == "g"
    group = await backend.get_group("g")
    assert group is not None
    assert group.task_ids == ("g-0", "g-1", "g-2")
    assert (group.outcome, group.results, group.then_id, group.meta) == (None, (None, None, None), None, "m")
    assert (group.created_at, group.finished_at) == (T0, None)
    assert group.counts == {TaskState.PENDING: 3}
    member = await backend.get("g-1")
    assert member is not None
    assert (member.group_id, member.state) == ("g", TaskState.PENDING)
    assert await backend.get("then") is None, "then waits in the group until every member succeeded"
    assert await backend.get_group("nope") is None


async def test_then_is_stored_with_the_last_success_and_gets_the_results_in_call_order(
    open_redis: OpenRedis,
) -> None:
    backend = await open_redis()
    await backend.enqueue_group(_group("g", 3))
    tokens = await _claim_all(backend)
    assert await backend.settle([_done("g-2", tokens["g-2"], T0 + 2, b"two")]) == set()
    assert await backend.settle([_done("g-0", tokens["g-0"], T0 + 3, b"zero")]) == set()
    group = await backend.get_group("g")
    assert group is not None
    assert (group.outcome, group.results) == (None, (b"zero", None, b"two"))
    assert group.counts == {TaskState.SUCCEEDED: 2, TaskState.ACTIVE: 1}
    assert await backend.get("then") is None
    assert await backend.settle([_done("g-1", tokens["g-1"], T0 + 4)]) == set()  # returns nothing
    group = await backend.get_group("g")
    assert group is not None
    assert (group.outcome, group.finished_at, group.then_id) == (TaskState.SUCCEEDED, T0 + 4, "then")
    assert group.results == (b"zero", None, b"two")
    assert group.counts == {TaskState.SUCCEEDED: 3}
    then = await backend.get("then")
    assert then is not None
    assert then.state is TaskState.PENDING
    assert [c.record.id for c in await backend.claim(["default"], 10, now=T0 + 5, lease_until=T0 + 35)] == [
        "then"
    ]


async def test_the_last_two_members_settled_in_one_batch_store_then_once(open_redis: OpenRedis) -> None:
    backend = await open_redis()
    await backend.enqueue_group(_group("g", 4))
    tokens = await _claim_all(backend)
    await backend.settle([_done("g-0", tokens["g-0"], T0 + 2), _done("g-3", tokens["g-3"], T0 + 2)])
    batch = [_done("g-2", tokens["g-2"], T0 + 3, b"2"), _done("g-1", tokens["g-1"], T0 + 3, b"1")]
    assert await backend.settle(batch) == set()
    assert await backend.stats() == {"default": {TaskState.SUCCEEDED: 4, TaskState.PENDING: 1}}
    group = await backend.get_group("g")
    assert group is not None
    assert (group.outcome, group.results, group.then_id) == (
        TaskState.SUCCEEDED,
        (None, b"1", b"2", None),
        "then",
    )


async def test_a_replayed_last_success_stores_then_no_second_time(open_redis: OpenRedis) -> None:
    """The reply of the last member's settlement is lost; before the retry, the ``then`` it stored is run
    and purged, so a retry that applied the success again would store it again."""
    backend = await open_redis()
    other = await open_redis()
    group = _group("g", 2)
    await backend.enqueue_group(replace(group, then=replace(_task("then"), queue="next")))
    tokens = await _claim_all(backend)
    await backend.settle([_done("g-0", tokens["g-0"], T0 + 2)])

    async def run_then_and_purge_it() -> None:
        (then,) = await other.claim(["next"], 10, now=T0 + 4, lease_until=T0 + 34)
        assert then.record.id == "then"
        assert await other.settle([_done("then", then.token, T0 + 5)]) == set()
        assert await other.purge(states={TaskState.SUCCEEDED}, queue="next") == 1

    calls = lose_first_reply(backend, "settle", between=run_then_and_purge_it)
    assert await backend.settle([_done("g-1", tokens["g-1"], T0 + 3, b"last")]) == set()
    assert len(calls) == 2, "the settlement was sent twice"
    assert await backend.get("then") is None, "the retry must not store then again"
    assert await backend.stats() == {"default": {TaskState.SUCCEEDED: 2}}
    found = await backend.get_group("g")
    assert found is not None
    assert (found.outcome, found.then_id, found.results) == (TaskState.SUCCEEDED, "then", (None, b"last"))
    assert await backend.purge(states={TaskState.SUCCEEDED}, queue="default") == 2
    found = await backend.get_group("g")
    assert found is not None
    assert found.counts == {TaskState.SUCCEEDED: 2}, "members whose records are gone count as they ended"


async def test_a_member_settled_twice_is_counted_once(open_redis: OpenRedis) -> None:
    """A member that ended dead, was requeued and then succeeded counts as one success: the group keeps its
    outcome and never stores its then."""
    backend = await open_redis()
    await backend.enqueue_group(_group("g", 2))
    tokens = await _claim_all(backend)
    dead = Settlement("g-0", tokens["g-0"], TaskState.DEAD, at=T0 + 2, error="boom")
    assert await backend.settle([dead]) == set()
    assert await backend.requeue(["g-0"], now=T0 + 3) == 1
    again = await _claim_all(backend, T0 + 4)
    await backend.settle([_done("g-0", again["g-0"], T0 + 5, b"late"), _done("g-1", tokens["g-1"], T0 + 5)])
    group = await backend.get_group("g")
    assert group is not None
    assert (group.outcome, group.finished_at, group.then_id) == (TaskState.DEAD, T0 + 2, None)
    assert group.results == (b"late", None)
    assert group.counts == {TaskState.SUCCEEDED: 2}
    assert await backend.get("then") is None


@pytest.mark.parametrize("how", ["dead", "cancelled while pending", "cancelled while running", "expired"])
async def test_a_member_that_does_not_succeed_decides_the_group(open_redis: OpenRedis, how: str) -> None:
    backend = await open_redis()
    group = _group("g", 3)
    if how == "cancelled while pending":
        group = replace(
            group, members=(group.members[0], replace(group.members[1], run_at=T0 + 100), group.members[2])
        )
    elif how == "expired":
        expiring = replace(group.members[1], run_at=T0 + 5, expires_at=T0 + 6)
        group = replace(group, members=(group.members[0], expiring, group.members[2]))
    await backend.enqueue_group(group)
    tokens = await _claim_all(backend)
    await backend.settle([_done("g-0", tokens.pop("g-0"), T0 + 2)])
    outcome = TaskState.CANCELLED
    if how == "dead":
        outcome = TaskState.DEAD
        await backend.settle([Settlement("g-1", tokens.pop("g-1"), TaskState.DEAD, at=T0 + 3, error="boom")])
    elif how == "cancelled while pending":
        assert await backend.cancel(["g-1"], now=T0 + 3) == ["g-1"]
    elif how == "cancelled while running":
        assert await backend.cancel(["g-1"], now=T0 + 3) == ["g-1"]
        asked = await backend.get_group("g")
        assert asked is not None
        assert asked.outcome is None, "asking a running member to stop ends nothing"
        cancelled = Settlement("g-1", tokens.pop("g-1"), TaskState.CANCELLED, at=T0 + 3, error="cancelled")
        assert await backend.settle([cancelled]) == set()
    else:
        assert await backend.claim(["default"], 10, now=T0 + 7, lease_until=T0 + 37) == []
    found = await backend.get_group("g")
    assert found is not None
    assert (found.outcome, found.finished_at) == (outcome, T0 + 3 if how != "expired" else T0 + 7)
    assert found.counts == {TaskState.SUCCEEDED: 1, outcome: 1, TaskState.ACTIVE: 1}
    assert await backend.settle([_done("g-2", tokens.pop("g-2"), T0 + 9)]) == set()
    found = await backend.get_group("g")
    assert found is not None
    assert found.outcome is outcome, "the first member that did not succeed decided"
    assert found.then_id is None
    assert await backend.get("then") is None


async def test_cancelling_a_pending_member_cancels_its_group_at_once(open_redis: OpenRedis) -> None:
    backend = await open_redis()
    await backend.enqueue_group(_group("g", 2))
    assert await backend.cancel(["g-1", "g-0"], now=T0 + 1) == ["g-1", "g-0"]
    group = await backend.get_group("g")
    assert group is not None
    assert (group.outcome, group.finished_at) == (TaskState.CANCELLED, T0 + 1)
    assert group.counts == {TaskState.CANCELLED: 2}


async def test_enqueue_group_is_all_or_nothing(
    open_redis: OpenRedis, redis_url: str, unique_name: str
) -> None:
    backend = await open_redis()
    await backend.enqueue_many([_task("busy")])
    members = (_task("a", group="g"), _task("busy", group="g"))
    with pytest.raises(DuplicateTaskError) as raised:
        await backend.enqueue_group(NewGroup("g", members, _task("then"), T0))
    assert raised.value.task_ids == ("busy",)
    assert await backend.get_group("g") is None
    assert await backend.get("a") is None
    assert not {key for key in await keys_of(redis_url, unique_name) if b":g" in key}
    await backend.enqueue_group(_group("g", 1))
    with pytest.raises(DuplicateTaskError) as raised:
        await backend.enqueue_group(_group("g", 1, then=None))
    assert raised.value.task_ids == ("g",), "the group id is taken"


async def test_an_enqueue_group_whose_reply_was_lost_stores_the_group_once(open_redis: OpenRedis) -> None:
    backend = await open_redis()
    calls = lose_first_reply(backend, "enqueue")
    assert await backend.enqueue_group(_group("g", 2)) == "g"
    assert len(calls) == 2
    assert await backend.stats() == {"default": {TaskState.PENDING: 2}}


async def test_a_settlement_stores_its_then_groups_atomically_and_once(open_redis: OpenRedis) -> None:
    backend = await open_redis()
    await backend.enqueue_many([_task("step")])
    tokens = await _claim_all(backend)
    verdict = replace(_done("step", tokens["step"], T0 + 2, b"r"), then_groups=(_group("g", 2),))
    calls = lose_first_reply(backend, "settle")
    assert await backend.settle([verdict]) == set()
    assert len(calls) == 2
    group = await backend.get_group("g")
    assert group is not None
    assert group.task_ids == ("g-0", "g-1")
    assert await backend.stats() == {"default": {TaskState.SUCCEEDED: 1, TaskState.PENDING: 2}}
    members = await _claim_all(backend, T0 + 3)
    await backend.settle(
        [_done(task_id, token, T0 + 4, task_id.encode()) for task_id, token in members.items()]
    )
    then = await backend.get("then")
    assert then is not None
    assert then.state is TaskState.PENDING
    # A group whose id exists is skipped (as a chain's then whose id exists).
    await backend.enqueue_many([_task("step2")])
    tokens = await _claim_all(backend, T0 + 5)
    verdict = replace(_done("step2", tokens["step2"], T0 + 6), then_groups=(_group("g", 3, then="other"),))
    assert await backend.settle([verdict]) == set()
    group = await backend.get_group("g")
    assert group is not None
    assert len(group.task_ids) == 2
    assert await backend.get("g-2") is None


async def test_an_empty_group_succeeds_at_once(open_redis: OpenRedis) -> None:
    backend = await open_redis()
    await backend.enqueue_group(NewGroup("g", (), _task("then"), T0))
    group = await backend.get_group("g")
    assert group is not None
    assert (group.outcome, group.then_id, group.counts) == (TaskState.SUCCEEDED, "then", {})
    assert await backend.get("then") is not None


async def test_purge_removes_final_groups_by_their_finished_at(
    open_redis: OpenRedis, redis_url: str, unique_name: str
) -> None:
    backend = await open_redis()
    await backend.enqueue_group(_group("early", 1, then=None))
    await backend.enqueue_group(_group("late", 1, then=None))
    await backend.enqueue_group(_group("open", 1, then=None))
    tokens = await _claim_all(backend)
    await backend.settle([_done("early-0", tokens["early-0"], T0 + 2)])
    await backend.settle([_done("late-0", tokens["late-0"], T0 + 10)])
    assert await backend.purge(states={TaskState.SUCCEEDED}, queue="default", before=T0 + 5) == 1
    assert await backend.get_group("early") is not None, "a purge limited to a queue keeps groups"
    assert await backend.purge(states={TaskState.DEAD}, before=T0 + 5) == 0
    assert await backend.get_group("early") is not None, "a purge of other states keeps groups"
    assert await backend.purge(states={TaskState.SUCCEEDED}, before=T0 + 5) == 0
    assert await backend.get_group("early") is None
    assert await backend.get_group("late") is not None
    assert await backend.purge(states=set(TaskState)) == 2
    assert await backend.get_group("late") is None
    assert await backend.get_group("open") is not None, "a group that is not final is never purged"
    group_keys = {key for key in await keys_of(redis_url, unique_name) if b"}:g" in key}
    prefix = f"{{{unique_name}}}:"
    assert group_keys == {f"{prefix}g:open".encode(), f"{prefix}gm:open".encode()}


async def test_a_member_of_a_limited_name_fans_in_across_flow_rules(open_redis: OpenRedis) -> None:
    """Members parked by max_running run one at a time; the group still fans in once."""
    backend = await open_redis()
    limits = {"capped": FlowLimits(max_running=1)}
    await backend.enqueue_group(_group("g", 3, name="capped"))
    at = T0 + 1
    for _ in range(3):
        claimed = await backend.claim(["default"], 10, now=at, lease_until=at + 30, limits=limits)
        assert len(claimed) == 1
        await backend.settle([_done(claimed[0].record.id, claimed[0].token, at)])
        at += 1
    group = await backend.get_group("g")
    assert group is not None
    assert group.outcome is TaskState.SUCCEEDED
    assert [c.record.id for c in await backend.claim(["default"], 10, now=at, lease_until=at + 30)] == [
        "then"
    ]


async def test_group_keys_are_in_the_prefix_slot(
    open_redis: OpenRedis, redis_url: str, unique_name: str
) -> None:
    from redis.crc import key_slot

    backend = await open_redis()
    await backend.enqueue_group(_group("g {x}", 2, then="t {y}"))
    tokens = await _claim_all(backend)
    await backend.settle([_done("g {x}-0", tokens["g {x}-0"], T0 + 2)])
    keys = await keys_of(redis_url, unique_name)
    assert {key_slot(key) for key in keys} == {key_slot(f"{{{unique_name}}}:seq".encode())}
    client = aioredis.Redis.from_url(redis_url)
    try:
        prefix = f"{{{unique_name}}}:"
        assert await client.hget(f"{prefix}g:g {{x}}", "ok") == b"1"
        assert await client.hgetall(f"{prefix}gr:g {{x}}") == {b"g {x}-0": b"n"}
        assert await client.llen(f"{prefix}gt:g {{x}}") == 16, "then's 16 values wait in the group"
    finally:
        await client.aclose()


async def test_members_taken_over_by_recovery_or_a_replayed_claim_still_fan_in(open_redis: OpenRedis) -> None:
    """A member's lease may come from a claim, a claim retried after its reply was lost, or recovery: every
    kind of lease settles into the group."""
    backend = await open_redis()
    await backend.enqueue_group(_group("g", 3))
    calls = lose_first_reply(backend, "claim")
    first = await backend.claim(["default"], 2, now=T0 + 1, lease_until=T0 + 2)
    assert len(calls) == 2
    assert [c.record.id for c in first] == ["g-0", "g-1"]
    await backend.settle([_done("g-0", first[0].token, T0 + 2, b"0")])
    (third,) = await backend.claim(["default"], 5, now=T0 + 3, lease_until=T0 + 40)
    (taken,) = await backend.reclaim_expired(now=T0 + 10, lease_until=T0 + 40, limit=10)
    assert taken.record.id == "g-1"
    assert await backend.settle([_done("g-1", first[1].token, T0 + 11)]) == {"g-1"}, "the old lease is gone"
    await backend.settle([_done("g-1", taken.token, T0 + 11, b"1"), _done("g-2", third.token, T0 + 11, b"2")])
    group = await backend.get_group("g")
    assert group is not None
    assert (group.outcome, group.results, group.then_id) == (TaskState.SUCCEEDED, (b"0", b"1", b"2"), "then")
