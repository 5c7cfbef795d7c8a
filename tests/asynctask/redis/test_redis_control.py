"""Control of running work on Redis: cancelling an ACTIVE task is a stored request (its slots kept until its
worker settles it), progress is lease-checked, and notices (``"cancel"``, ``"settled"``) reach every
process subscribed to the prefix through pub/sub, on one connection per backend that comes back after it
drops.
"""

from __future__ import annotations

from typing import Any

import anyio
import pytest
import redis.asyncio as aioredis

from lifecycle.asynctask import FlowLimits, NewTask, Settlement, TaskState
from lifecycle.asynctask._backends.redis._notices import Listener
from lifecycle.asynctask._records import Notice, ProgressUpdate
from lifecycle.asynctask.redis import RedisBackend
from lifecycle.asynctask.testing import T0
from tests.asynctask.redis.redis_servers import OpenRedis
from tests.asynctask.redis.test_redis_retries import lose_first_reply

pytestmark = pytest.mark.redis

_LIMITS = {"capped": FlowLimits(max_running=1)}


def _task(task_id: str, *, name: str = "capped", run_at: float = T0) -> NewTask:
    return NewTask(task_id, name, "default", b"payload", 3, None, T0, run_at)


async def _running(backend: RedisBackend, *task_ids: str, now: float = T0 + 1) -> dict[str, str]:
    await backend.enqueue_many([_task(task_id, name="job") for task_id in task_ids])
    claimed = await backend.claim(["default"], 100, now=now, lease_until=now + 30)
    return {c.record.id: c.token for c in claimed}


async def test_cancelling_a_running_task_asks_it_to_stop_and_keeps_its_slot(open_redis: OpenRedis) -> None:
    backend = await open_redis()
    await backend.enqueue_many([_task("a"), _task("b")])
    (claimed,) = await backend.claim(["default"], 10, now=T0 + 1, lease_until=T0 + 31, limits=_LIMITS)
    assert await backend.cancel(["a", "ghost"], now=T0 + 2) == ["a"]
    record = await backend.get("a")
    assert record is not None
    assert (record.state, record.cancel_requested, record.finished_at) == (TaskState.ACTIVE, True, None)
    assert await backend.cancel_requests(["a", "b", "ghost"]) == {"a"}
    assert await backend.cancel(["a"], now=T0 + 3) == ["a"], "asking again is harmless"
    assert await backend.claim(["default"], 10, now=T0 + 4, lease_until=T0 + 34, limits=_LIMITS) == [], (
        "the running task holds its max_running slot until it is settled"
    )
    assert await backend.extend_leases([("a", claimed.token)], lease_until=T0 + 60) == set()
    stopped = Settlement("a", claimed.token, TaskState.CANCELLED, at=T0 + 5, error="cancelled while running")
    assert await backend.settle([stopped]) == set()
    record = await backend.get("a")
    assert record is not None
    assert (record.state, record.finished_at, record.last_error) == (
        TaskState.CANCELLED,
        T0 + 5,
        "cancelled while running",
    )
    assert await backend.cancel_requests(["a"]) == set(), "only ACTIVE tasks are reported"
    assert [c.record.id for c in await backend.claim(["default"], 10, now=T0 + 6, lease_until=T0 + 36)] == [
        "b"
    ]
    assert await backend.cancel(["a"], now=T0 + 7) == [], "a final task is left as it is"


async def test_a_reclaimed_task_keeps_its_cancellation_and_requeue_clears_it(open_redis: OpenRedis) -> None:
    backend = await open_redis()
    await _running(backend, "a")
    await backend.cancel(["a"], now=T0 + 2)
    (taken,) = await backend.reclaim_expired(now=T0 + 100, lease_until=T0 + 130, limit=10)
    assert (taken.record.id, taken.record.cancel_requested) == ("a", True)
    await backend.settle([Settlement("a", taken.token, TaskState.CANCELLED, at=T0 + 101)])
    assert await backend.requeue(["a"], now=T0 + 102) == 1
    record = await backend.get("a")
    assert record is not None
    assert (record.state, record.cancel_requested, record.attempts) == (TaskState.PENDING, False, 0)
    (again,) = await backend.claim(["default"], 10, now=T0 + 103, lease_until=T0 + 133)
    assert again.record.cancel_requested is False


async def test_cancelling_a_running_task_drops_its_debounce_follow_up(open_redis: OpenRedis) -> None:
    backend = await open_redis()
    tokens = await _running(backend, "a")
    follow_up = NewTask("a", "job", "default", b"again", 3, None, T0 + 2, T0 + 2)
    assert await backend.enqueue_many([follow_up], if_exists="debounce") == ["a"]
    assert await backend.cancel(["a"], now=T0 + 3) == ["a"]
    await backend.settle([Settlement("a", tokens["a"], TaskState.CANCELLED, at=T0 + 4)])
    record = await backend.get("a")
    assert record is not None
    assert record.state is TaskState.CANCELLED, "the follow-up went with the cancellation"
    assert await backend.claim(["default"], 10, now=T0 + 5, lease_until=T0 + 35) == []


async def test_a_cancel_whose_reply_was_lost_reports_the_running_task(open_redis: OpenRedis) -> None:
    backend = await open_redis()
    await _running(backend, "a")
    await backend.enqueue_many([_task("p", run_at=T0 + 100)])
    calls = lose_first_reply(backend, "cancel")
    assert await backend.cancel(["a", "p"], now=T0 + 2) == ["a", "p"]
    assert len(calls) == 2


async def test_progress_is_stored_while_the_lease_is_held(open_redis: OpenRedis) -> None:
    backend = await open_redis()
    tokens = await _running(backend, "a", "b")
    updates = [
        ProgressUpdate("a", tokens["a"], 3.0, 10.0, "copying"),
        ProgressUpdate("b", "stale-token", 1.0, None, None),
    ]
    assert await backend.save_progress(updates) == {"b"}
    record = await backend.get("a")
    assert record is not None
    assert (record.progress_done, record.progress_total, record.progress_message) == (3.0, 10.0, "copying")
    other = await backend.get("b")
    assert other is not None
    assert (other.progress_done, other.progress_total, other.progress_message) == (None, None, None)
    assert await backend.save_progress([ProgressUpdate("a", tokens["a"], 0.5, None, None)]) == set()
    record = await backend.get("a")
    assert record is not None
    assert (record.progress_done, record.progress_total, record.progress_message) == (0.5, None, None), (
        "None values are stored as given"
    )
    await backend.settle([Settlement("a", tokens["a"], TaskState.SUCCEEDED, at=T0 + 3)])
    assert await backend.save_progress([ProgressUpdate("a", tokens["a"], 1.0, 1.0, "late")]) == {"a"}
    record = await backend.get("a")
    assert record is not None
    assert record.progress_done == 0.5, "kept after the task ended; a late update is refused"


async def _collect(backend: RedisBackend, count: int) -> list[Notice]:
    """The next ``count`` notices (more if they came in the same call); fails after 10 s."""
    found: list[Notice] = []
    with anyio.fail_after(10):
        while len(found) < count:
            found += await backend.wait_for_notices(timeout=10)
    return found


async def test_notices_of_cancellations_and_settlements_reach_another_backend(open_redis: OpenRedis) -> None:
    worker = await open_redis()
    waiter = await open_redis()
    assert await waiter.wait_for_notices(timeout=0) == []  # subscribes
    tokens = await _running(worker, "a", "b")
    await worker.enqueue_many([_task("later", run_at=T0 + 100)])
    assert await worker.cancel(["a", "later"], now=T0 + 2) == ["a", "later"]
    assert set(await _collect(waiter, 2)) == {Notice("cancel", "a"), Notice("settled", "later")}
    verdicts = [
        Settlement("b", tokens["b"], TaskState.SUCCEEDED, at=T0 + 3),
        Settlement("a", tokens["a"], TaskState.CANCELLED, at=T0 + 3),
    ]
    assert await worker.settle(verdicts) == set()
    assert await _collect(waiter, 2) == [Notice("settled", "b"), Notice("settled", "a")]
    retry = [Settlement("b", tokens["b"], TaskState.PENDING, at=T0 + 4, run_at=T0 + 5)]
    assert await worker.settle(retry) == {"b"}, "a lost lease settles nothing"
    assert await waiter.wait_for_notices(timeout=0.05) == [], "and publishes nothing"
    assert await worker.wait_for_notices(timeout=0) == [], (
        "a backend hears only what came after its first call"
    )


async def test_a_backend_is_not_told_of_its_own_settlements_but_of_everything_else(
    open_redis: OpenRedis,
) -> None:
    """Its engine saw its own verdicts; a cancel it made, or what another object settled, it hears of."""
    backend = await open_redis()
    other = await open_redis()
    await backend.wait_for_notices(timeout=0)
    tokens = await _running(backend, "mine", "asked")
    await backend.settle([Settlement("mine", tokens["mine"], TaskState.SUCCEEDED, at=T0 + 2)])
    await backend.cancel(["asked"], now=T0 + 3)
    taken = await other.reclaim_expired(now=T0 + 100, lease_until=T0 + 130, limit=10)
    await other.settle([Settlement(c.record.id, c.token, TaskState.CANCELLED, at=T0 + 101) for c in taken])
    assert await _collect(backend, 2) == [Notice("cancel", "asked"), Notice("settled", "asked")]


async def test_a_settlement_sends_no_notice_when_the_settling_backend_is_the_only_subscriber(
    open_redis: OpenRedis, redis_url: str, unique_name: str
) -> None:
    """The settling object skips its own settled notice, so while its subscription is the channel's only one
    the script does not send it (a pattern subscriber, which the server does not count among the channel's,
    sees what is sent); once another object subscribes, it does."""
    backend = await open_redis()
    other = await open_redis()
    await backend.wait_for_notices(timeout=0)  # subscribes: the channel's only subscriber
    tokens = await _running(backend, "alone", "heard")
    admin = aioredis.Redis.from_url(redis_url)
    watcher = admin.pubsub(ignore_subscribe_messages=True)
    try:
        await watcher.psubscribe(f"{{{unique_name}}}:notices")
        await backend.settle([Settlement("alone", tokens["alone"], TaskState.SUCCEEDED, at=T0 + 2)])
        await other.wait_for_notices(timeout=0)  # a second subscriber
        await backend.settle([Settlement("heard", tokens["heard"], TaskState.SUCCEEDED, at=T0 + 3)])
        with anyio.fail_after(10):
            while (message := await watcher.get_message(timeout=10)) is None:
                pass
        assert message["data"].split(b"\0")[1:] == [b"heard"], "the first notice sent is the second one"
        assert await _collect(other, 1) == [Notice("settled", "heard")]
    finally:
        await watcher.aclose()
        await admin.aclose()


async def test_a_claim_that_expires_tasks_publishes_them_settled(open_redis: OpenRedis) -> None:
    backend = await open_redis()
    await backend.wait_for_notices(timeout=0)
    expiring = NewTask("x", "job", "default", b"", 0, None, T0, T0, expires_at=T0 + 1)
    await backend.enqueue_many([expiring])
    assert await backend.claim(["default"], 10, now=T0 + 2, lease_until=T0 + 32) == []
    assert await _collect(backend, 1) == [Notice("settled", "x")]


async def test_a_wait_for_notices_cancelled_by_its_caller_loses_nothing(open_redis: OpenRedis) -> None:
    backend = await open_redis()
    await backend.wait_for_notices(timeout=0)
    with anyio.move_on_after(0.01):
        await backend.wait_for_notices(timeout=5)
    await _running(backend, "a")
    await backend.cancel(["a"], now=T0 + 2)
    assert await _collect(backend, 1) == [Notice("cancel", "a")]


async def test_the_notices_subscription_comes_back_after_its_connection_drops(
    open_redis: OpenRedis, redis_url: str, unique_name: str
) -> None:
    backend = await open_redis(client_options={"client_name": unique_name})
    await backend.wait_for_notices(timeout=0)
    channel = f"{{{unique_name}}}:notices"
    admin = aioredis.Redis.from_url(redis_url)
    try:
        mine = [c for c in await admin.client_list() if c.get("name") == unique_name and c.get("sub") == "1"]
        assert len(mine) == 1, "one subscriber connection per backend"
        await admin.client_kill_filter(_id=mine[0]["id"])
        with anyio.fail_after(10):  # the reconnect has no event to wait on: ask the server
            while dict(await admin.pubsub_numsub(channel)).get(channel.encode()) != 1 or any(
                c["id"] == mine[0]["id"] for c in await admin.client_list()
            ):
                await anyio.sleep(0.01)
    finally:
        await admin.aclose()
    await _running(backend, "a")
    await backend.cancel(["a"], now=T0 + 2)
    assert await _collect(backend, 1) == [Notice("cancel", "a")]


class _SilentCount:
    """A client whose ``PUBSUB NUMSUB`` never gets an answer (a half-open connection); all else as given."""

    def __init__(self, client: Any) -> None:
        self._client = client  # redis-py's execute_command is untyped

    def pubsub(self) -> Any:
        return self._client.pubsub()

    async def execute_command(self, *args: Any) -> Any:
        if args[:2] == ("PUBSUB", "NUMSUB"):
            await anyio.sleep_forever()
        return await self._client.execute_command(*args)


async def test_notices_are_read_when_the_subscriber_count_gets_no_answer(
    redis_url: str, unique_name: str
) -> None:
    """Asking whether the channel's subscribers may be counted gives up after the timeouts (not now, asked
    again at the next subscription): the notices are read all the same."""
    channel = f"{{{unique_name}}}:notices"
    client = aioredis.Redis.from_url(redis_url)
    listener = Listener(_SilentCount(client), channel, nonce="n", socket_timeout=0.2, connect_timeout=0.2)
    try:
        assert await listener.wait(timeout=0) == []  # subscribes; the count's question times out
        assert not listener.live
        await client.publish(channel, b"s\0task1")
        with anyio.fail_after(10):
            assert await listener.wait(timeout=10) == [Notice("settled", "task1")]
    finally:
        await listener.close()
        await client.aclose()
