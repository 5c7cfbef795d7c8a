"""Reconnects: every call retried after a lost reply or a dropped connection applies exactly once.

A lost reply is the hard case: the script ran on the server, but the client saw the connection drop and
runs it again. The tests make the first reply of one script go missing (the call reaches the server, then
the client gets ``ConnectionError``) and check that the retry neither repeats nor loses anything.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

import anyio
import pytest
import redis.asyncio as aioredis
import redis.exceptions

from lifecycle.asynctask import DuplicateTaskError, FlowLimits, NewTask, Settlement, TaskState
from lifecycle.asynctask._backends.redis._conn import SCRIPTS
from lifecycle.asynctask.redis import RedisBackend
from lifecycle.asynctask.testing import T0
from tests.asynctask.redis.redis_servers import OpenRedis, RedisServer, settle_replies_lost, until_blocked

pytestmark = pytest.mark.redis


def _task(task_id: str, *, queue: str = "default") -> NewTask:
    return NewTask(task_id, "job", queue, b"payload", 3, None, T0, T0)


def lose_first_reply(
    backend: RedisBackend, script: str, between: Callable[[], Awaitable[None]] | None = None
) -> list[int]:
    """Make the next call of ``script`` run on the server but fail on the client as if the connection had
    dropped before the reply arrived (``between`` runs in that gap). Returns a list counting the calls."""
    runner = backend._run()
    real = runner.evalsha
    sha = SCRIPTS[script].sha
    calls: list[int] = []

    async def evalsha(called: str, *args: Any) -> Any:
        reply = await real(called, *args)
        if called == sha:
            calls.append(1)
            if len(calls) == 1:
                if between is not None:
                    await between()
                raise redis.exceptions.ConnectionError("Connection closed by server. (simulated)")
        return reply

    runner.evalsha = evalsha  # type: ignore[method-assign, assignment]
    return calls


async def test_an_enqueue_whose_reply_was_lost_is_stored_once_and_reported_stored(
    open_redis: OpenRedis,
) -> None:
    backend = await open_redis()
    calls = lose_first_reply(backend, "enqueue")
    assert await backend.enqueue_many([_task("a"), _task("b")]) == ["a", "b"]
    assert len(calls) == 2, "the enqueue must have been sent twice"
    assert await backend.stats() == {"default": {TaskState.PENDING: 2}}


async def test_a_retried_enqueue_does_not_replace_a_task_that_finished_in_between(
    open_redis: OpenRedis,
) -> None:
    backend = await open_redis()
    other = await open_redis()

    async def run_it() -> None:
        (claimed,) = await other.claim(["default"], 1, now=T0 + 1, lease_until=T0 + 31)
        done = Settlement("a", claimed.token, TaskState.SUCCEEDED, at=T0 + 2, result=b"r")
        assert await other.settle([done]) == set()

    lose_first_reply(backend, "enqueue", between=run_it)
    assert await backend.enqueue_many([_task("a")]) == ["a"]
    record = await backend.get("a")
    assert record is not None
    # Replacing the finished record (allowed for a *new* enqueue of that id) would run the task again.
    assert (record.state, record.result, record.attempts) == (TaskState.SUCCEEDED, b"r", 1)


async def test_a_retried_skip_enqueue_reports_what_it_stored(open_redis: OpenRedis) -> None:
    backend = await open_redis()
    assert await backend.enqueue_many([_task("old")]) == ["old"]
    lose_first_reply(backend, "enqueue")
    batch = [_task("new"), _task("old"), _task("new")]
    assert await backend.enqueue_many(batch, if_exists="skip") == ["new"]


async def test_a_claim_whose_reply_was_lost_returns_the_same_leases_and_takes_no_more(
    open_redis: OpenRedis,
) -> None:
    backend = await open_redis()
    await backend.enqueue_many([_task(f"t{n}") for n in range(5)])
    calls = lose_first_reply(backend, "claim")
    claimed = await backend.claim(["default"], 3, now=T0 + 1, lease_until=T0 + 31)
    assert len(calls) == 2
    assert [c.record.id for c in claimed] == ["t0", "t1", "t2"]
    assert await backend.stats() == {"default": {TaskState.ACTIVE: 3, TaskState.PENDING: 2}}
    # The returned tokens are the live ones: the leases can be settled.
    verdicts = [Settlement(c.record.id, c.token, TaskState.SUCCEEDED, at=T0 + 2) for c in claimed]
    assert await backend.settle(verdicts) == set()
    rest = await backend.claim(["default"], 10, now=T0 + 3, lease_until=T0 + 33)
    assert [c.record.id for c in rest] == ["t3", "t4"]


async def test_a_lost_claim_reply_is_replayed_for_ids_of_any_text(open_redis: OpenRedis) -> None:
    """The call's log holds each id with its length first: ids with colons, digits, spaces and non-ASCII
    text come back whole and in order."""
    backend = await open_redis()
    ids = ["3:ab", "a:1", "12", "x y", "\u00e9t\u00e9:", ":"]
    await backend.enqueue_many([_task(task_id) for task_id in ids])
    calls = lose_first_reply(backend, "claim")
    claimed = await backend.claim(["default"], 10, now=T0 + 1, lease_until=T0 + 31)
    assert len(calls) == 2
    assert [c.record.id for c in claimed] == ids
    verdicts = [Settlement(c.record.id, c.token, TaskState.SUCCEEDED, at=T0 + 2) for c in claimed]
    assert await backend.settle(verdicts) == set()


async def test_a_reclaim_whose_reply_was_lost_returns_the_same_leases(open_redis: OpenRedis) -> None:
    backend = await open_redis()
    await backend.enqueue_many([_task(f"t{n}") for n in range(3)])
    assert len(await backend.claim(["default"], 3, now=T0 + 1, lease_until=T0 + 2)) == 3
    lose_first_reply(backend, "reclaim")
    taken = await backend.reclaim_expired(now=T0 + 10, lease_until=T0 + 40, limit=2)
    assert len(taken) == 2
    assert await backend.extend_leases([(c.record.id, c.token) for c in taken], lease_until=T0 + 50) == set()
    again = await backend.reclaim_expired(now=T0 + 10, lease_until=T0 + 40, limit=10)
    assert len(again) == 1, "only the one lease the first call did not take is left to reclaim"


async def test_a_settlement_whose_reply_was_lost_counts_as_applied(open_redis: OpenRedis) -> None:
    backend = await open_redis()
    await backend.enqueue_many([_task("done"), _task("retry")])
    claimed = {c.record.id: c for c in await backend.claim(["default"], 2, now=T0, lease_until=T0 + 30)}
    follow_up = _task("next", queue="later")
    verdicts = [
        Settlement("done", claimed["done"].token, TaskState.SUCCEEDED, at=T0 + 1, then=(follow_up,)),
        Settlement("retry", claimed["retry"].token, TaskState.PENDING, at=T0 + 1, run_at=T0 + 5, error="e"),
    ]
    calls = lose_first_reply(backend, "settle")
    assert await backend.settle(verdicts) == set(), "a repeated settlement is not a lost lease"
    assert len(calls) == 2
    assert await backend.stats() == {
        "default": {TaskState.SUCCEEDED: 1, TaskState.PENDING: 1},
        "later": {TaskState.PENDING: 1},
    }
    retry = await backend.get("retry")
    assert retry is not None
    assert (retry.attempts, retry.run_at, retry.last_error) == (1, T0 + 5, "e")


async def test_cancel_and_requeue_whose_replies_were_lost_report_what_they_did(
    open_redis: OpenRedis,
) -> None:
    backend = await open_redis()
    await backend.enqueue_many([_task("a"), _task("b")])
    lose_first_reply(backend, "cancel")
    assert sorted(await backend.cancel(["a", "b", "ghost"], now=T0 + 1)) == ["a", "b"]
    lose_first_reply(backend, "requeue_ids")
    assert await backend.requeue(["a", "b"], now=T0 + 2) == 2
    assert await backend.stats() == {"default": {TaskState.PENDING: 2}}


async def test_a_script_the_server_forgot_is_loaded_again(own_redis: RedisServer) -> None:
    backend = RedisBackend(own_redis.url, prefix="noscript")
    admin = aioredis.Redis.from_url(own_redis.url)
    await backend.open()
    try:
        await backend.enqueue_many([_task("a")])
        await admin.script_flush()  # what a restart without persistence of the script cache does
        claimed = await backend.claim(["default"], 1, now=T0, lease_until=T0 + 30)
        assert [c.record.id for c in claimed] == ["a"]
        runner = backend._run()
        assert runner._alarmed  # the next call takes a kept connection, under the alarm
        assert runner._idle
        await admin.script_flush()
        fresh = replace(_task("b"), generated_id=True)  # the single enqueue's lean script
        assert await backend.enqueue_many([fresh]) == ["b"]
        assert (await backend.stats())["default"][TaskState.PENDING] == 1
    finally:
        await admin.aclose()
        await backend.close()


async def test_killed_connections_are_replaced_without_losing_work(own_redis: RedisServer) -> None:
    backend = RedisBackend(own_redis.url, prefix="kill")
    admin = aioredis.Redis.from_url(own_redis.url)
    await backend.open()
    try:
        await backend.enqueue_many([_task(f"t{n}") for n in range(4)])
        returned = anyio.Event()

        async def wait() -> None:
            await backend.wait_for_work(["idle"], timeout=60)
            returned.set()

        with anyio.fail_after(20):
            async with anyio.create_task_group() as group:
                group.start_soon(wait)
                await until_blocked(admin, 1)
                # Kill every client connection but this one: the blocked waiter's and the pooled ones.
                await admin.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")  # type: ignore[no-untyped-call]
                await returned.wait()  # a dropped wait returns early instead of hanging for 60 s
            claimed = await backend.claim(["default"], 10, now=T0, lease_until=T0 + 30)
        assert len(claimed) == 4
        verdicts = [Settlement(c.record.id, c.token, TaskState.SUCCEEDED, at=T0 + 1) for c in claimed]
        await admin.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")  # type: ignore[no-untyped-call]
        assert await backend.settle(verdicts) == set()
        assert await backend.stats() == {"default": {TaskState.SUCCEEDED: 4}}
    finally:
        await admin.aclose()
        await backend.close()


async def test_calls_give_up_after_reconnect_timeout_when_the_server_stays_down(
    own_redis: RedisServer,
) -> None:
    backend = RedisBackend(own_redis.url, prefix="down", reconnect_timeout=0.5, connect_timeout=0.5)
    await backend.open()
    try:
        await backend.enqueue_many([_task("a")])
        await anyio.to_thread.run_sync(own_redis.kill)
        with anyio.fail_after(20), pytest.raises(redis.exceptions.ConnectionError):
            await backend.claim(["default"], 1, now=T0, lease_until=T0 + 30)
    finally:
        await backend.close()


async def test_more_concurrent_calls_than_connections_wait_for_a_free_one(
    open_redis: OpenRedis, caplog: pytest.LogCaptureFixture
) -> None:
    backend = await open_redis(max_connections=2)
    with anyio.fail_after(30):
        async with anyio.create_task_group() as group:
            for n in range(100):
                group.start_soon(backend.enqueue_many, [_task(f"t{n}")])
    assert await backend.stats() == {"default": {TaskState.PENDING: 100}}
    assert not [r for r in caplog.records if "connection lost" in r.getMessage()], "no call may have failed"


async def test_an_enqueue_that_opened_a_window_and_lost_its_reply_is_not_refused_by_its_own_window(
    open_redis: OpenRedis,
) -> None:
    backend = await open_redis()
    lose_first_reply(backend, "enqueue")
    windowed = NewTask("w", "job", "default", b"", 3, None, T0, T0, unique_key="report", unique_until=T0 + 60)
    assert await backend.enqueue_many([windowed]) == ["w"]
    assert await backend.stats() == {"default": {TaskState.PENDING: 1}}
    again = NewTask(
        "w2", "job", "default", b"", 3, None, T0 + 1, T0 + 1, unique_key="report", unique_until=T0 + 9
    )
    with pytest.raises(DuplicateTaskError):
        await backend.enqueue_many([again])


async def test_a_debounce_whose_reply_was_lost_applies_once_in_batch_order(open_redis: OpenRedis) -> None:
    backend = await open_redis()
    calls = lose_first_reply(backend, "enqueue")
    batch = [
        NewTask("d", "job", "default", b"one", 3, None, T0, T0 + 5),
        NewTask("d", "job", "default", b"two", 3, None, T0 + 1, T0 + 6),
    ]
    assert await backend.enqueue_many(batch, if_exists="debounce") == ["d", "d"]
    assert len(calls) == 2
    record = await backend.get("d")
    assert record is not None
    assert (record.payload, record.run_at, record.enqueued_at, record.attempts) == (b"two", T0 + 6, T0, 0)
    assert await backend.stats() == {"default": {TaskState.PENDING: 1}}
    assert await backend.claim(["default"], 5, now=T0 + 5.5, lease_until=T0 + 30) == []
    assert len(await backend.claim(["default"], 5, now=T0 + 6, lease_until=T0 + 30)) == 1


async def test_a_settlement_that_started_a_follow_up_and_lost_its_reply_counts_as_applied(
    open_redis: OpenRedis,
) -> None:
    backend = await open_redis()
    await backend.enqueue_many([_task("d")])
    (running,) = await backend.claim(["default"], 1, now=T0, lease_until=T0 + 30)
    follow_up = NewTask("d", "job", "default", b"again", 3, None, T0 + 1, T0 + 1)
    assert await backend.enqueue_many([follow_up], if_exists="debounce") == ["d"]
    calls = lose_first_reply(backend, "settle")
    done = Settlement("d", running.token, TaskState.SUCCEEDED, at=T0 + 2, result=b"r")
    assert await backend.settle([done]) == set(), "the retry finds its verdict applied, not a lost lease"
    assert len(calls) == 2
    record = await backend.get("d")
    assert record is not None
    assert (record.state, record.payload, record.attempts) == (TaskState.PENDING, b"again", 0)


@pytest.mark.parametrize("verdict", ["retry", "follow-up"])
async def test_a_settlement_that_left_its_task_pending_counts_as_applied_after_a_new_lease_in_between(
    open_redis: OpenRedis, verdict: str
) -> None:
    """The lost reply's settlement made the task PENDING (a retry, or a debounce follow-up's next period), and
    another worker leased it before the repeat, so its token changed: the repeat finds the settlement in its
    call's list, not a lost lease."""
    backend = await open_redis()
    other = await open_redis()
    await backend.enqueue_many([_task("r")])
    (running,) = await backend.claim(["default"], 1, now=T0, lease_until=T0 + 30)
    if verdict == "retry":
        settlement = Settlement("r", running.token, TaskState.PENDING, at=T0 + 1, run_at=T0 + 1, error="e")
    else:
        follow_up = NewTask("r", "job", "default", b"again", 3, None, T0 + 1, T0 + 1)
        assert await backend.enqueue_many([follow_up], if_exists="debounce") == ["r"]
        settlement = Settlement("r", running.token, TaskState.SUCCEEDED, at=T0 + 1)
    taken: list[str] = []

    async def lease_it_again() -> None:
        taken.extend(c.token for c in await other.claim(["default"], 1, now=T0 + 2, lease_until=T0 + 30))

    calls = lose_first_reply(backend, "settle", between=lease_it_again)
    assert await backend.settle([settlement]) == set(), "applied by the first execution, not a lost lease"
    assert len(calls) == 2
    assert len(taken) == 1
    assert taken[0] != running.token
    record = await backend.get("r")
    assert record is not None
    assert record.state is TaskState.ACTIVE  # the other worker's lease stands
    # A settlement with that token in any other call finds the lease gone.
    assert await backend.settle([settlement]) == {"r"}


async def test_a_settle_call_that_gave_up_is_named_by_the_next_settle_call_of_its_leases(
    open_redis: OpenRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server applied the call but no reply came back before reconnect_timeout passed, so the call
    raised: the next settle call of the same leases (the worker's settler retrying them) names it, and counts
    what it applied as applied instead of reporting lost leases."""
    backend = await open_redis(reconnect_timeout=0.05)
    await backend.enqueue_many([_task("done"), _task("retry"), _task("later")])
    claimed = {c.record.id: c for c in await backend.claim(["default"], 3, now=T0, lease_until=T0 + 30)}
    verdicts = [
        Settlement("done", claimed["done"].token, TaskState.SUCCEEDED, at=T0 + 1, result=b"r"),
        Settlement("retry", claimed["retry"].token, TaskState.PENDING, at=T0 + 1, run_at=T0 + 1, error="e"),
    ]
    ran = settle_replies_lost(monkeypatch, backend)
    with anyio.fail_after(10), pytest.raises(redis.exceptions.ConnectionError):
        await backend.settle(verdicts)
    assert ran  # it ran on the server, maybe more than once (the repeats have its call id)
    monkeypatch.undo()
    # The retry verdict's task is leased again before the settler's next call (its token changes).
    (again,) = await backend.claim(["default"], 1, now=T0 + 2, lease_until=T0 + 30)
    assert again.record.id == "retry"
    later = Settlement("later", claimed["later"].token, TaskState.SUCCEEDED, at=T0 + 3)
    assert await backend.settle([*verdicts, later]) == set()
    assert await backend.stats() == {"default": {TaskState.SUCCEEDED: 2, TaskState.ACTIVE: 1}}
    # Named once: a later call of the same leases is a new call, which finds them gone.
    assert await backend.settle(verdicts[:1]) == {"done"}


async def test_the_call_that_applied_a_settlement_is_named_after_many_calls_that_gave_up(
    open_redis: OpenRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Of a lease's calls that gave up, the first applied it and the others found it applied, changing
    nothing (no marker of their own): however many there were, the next call names the first."""
    backend = await open_redis(reconnect_timeout=0.02)
    await backend.enqueue_many([_task("done")])
    (running,) = await backend.claim(["default"], 1, now=T0, lease_until=T0 + 30)
    verdict = Settlement("done", running.token, TaskState.SUCCEEDED, at=T0 + 1, result=b"r")
    settle_replies_lost(monkeypatch, backend)
    for _ in range(8):
        with anyio.fail_after(10), pytest.raises(redis.exceptions.ConnectionError):
            await backend.settle([verdict])
    monkeypatch.undo()
    assert await backend.settle([verdict]) == set()


async def test_a_listed_settlement_counts_as_applied_only_for_its_own_verdict(
    open_redis: OpenRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A retry applied by a call that gave up, then another verdict of the same lease (the settler's
    fallback when a verdict keeps failing): not applied, so reported as a lost lease."""
    backend = await open_redis(reconnect_timeout=0.02)
    await backend.enqueue_many([_task("x")])
    (running,) = await backend.claim(["default"], 1, now=T0, lease_until=T0 + 30)
    retry = Settlement("x", running.token, TaskState.PENDING, at=T0 + 1, run_at=T0 + 1, error="e")
    settle_replies_lost(monkeypatch, backend)
    with anyio.fail_after(10), pytest.raises(redis.exceptions.ConnectionError):
        await backend.settle([retry])
    monkeypatch.undo()
    await backend.claim(["default"], 1, now=T0 + 2, lease_until=T0 + 30)  # leased again: a new token
    dead = Settlement("x", running.token, TaskState.DEAD, at=T0 + 2, error="fallback")
    assert await backend.settle([dead]) == {"x"}
    record = await backend.get("x")
    assert record is not None
    assert record.state is TaskState.ACTIVE


async def test_a_rate_limited_claim_whose_reply_was_lost_takes_its_tokens_once(open_redis: OpenRedis) -> None:
    backend = await open_redis()
    limits = {"job": FlowLimits(rate=3, per=60.0)}
    await backend.enqueue_many([_task(f"t{n}") for n in range(5)])
    calls = lose_first_reply(backend, "claim")
    claimed = await backend.claim(["default"], 2, now=T0, lease_until=T0 + 30, limits=limits)
    assert len(calls) == 2
    assert [c.record.id for c in claimed] == ["t0", "t1"]
    state = await backend.flow_state("job", None, now=T0, limits=limits["job"])
    assert (state.running, state.tokens) == (2, 1.0)
    rest = await backend.claim(["default"], 5, now=T0, lease_until=T0 + 30, limits=limits)
    assert [c.record.id for c in rest] == ["t2"]
