"""Idle workers block on the server (no polling), wake for new, released and delayed work, and wake each other
when one claim cannot take everything that is due."""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any, cast

import anyio
import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from lifecycle.asynctask import NewTask, TaskState
from lifecycle.asynctask._backends.redis._codec import claimed_tasks, limits_args, time_text
from lifecycle.asynctask._backends.redis._conn import RETRYABLE, SCRIPTS, unread_check
from lifecycle.asynctask._backends.redis._lua import PRELUDE
from lifecycle.asynctask._backends.redis._lua_claim import PREPARE_WAIT_PRELUDE, WAKE_GRACE
from lifecycle.asynctask._backends.redis._wait import Waiter, _Ringer
from lifecycle.asynctask.redis import RedisBackend
from tests.asynctask.redis.redis_servers import OpenRedis, RedisServer, delete_prefix, until_blocked

pytestmark = pytest.mark.redis

PROMPT = 10.0
"""How long something that should happen at once may take on a busy machine before the test fails."""


def _task(task_id: str, *, now: float, delay: float = 0.0, queue: str = "default") -> NewTask:
    return NewTask(task_id, "job", queue, b"", 3, None, now, now + delay)


async def test_an_idle_wait_sends_a_handful_of_commands_not_a_poll(own_redis: RedisServer) -> None:
    backend = RedisBackend(own_redis.url, prefix="idle")
    admin = aioredis.Redis.from_url(own_redis.url)
    await backend.open()
    try:
        await backend.wait_for_work(["default"], timeout=0.01)  # connections made, scripts loaded
        before = (await admin.info("stats"))["total_commands_processed"]
        started = time.monotonic()
        await backend.wait_for_work(["default"], timeout=1.0)
        waited = time.monotonic() - started
        after = (await admin.info("stats"))["total_commands_processed"]
    finally:
        await admin.aclose()
        await backend.close()
    assert waited >= 0.95, f"the wait returned after {waited:.3f} s although nothing happened"
    # INFO, the script that reads the queue heads (3 commands inside it), BLPOP, the alarm's LPUSH: 7 in one
    # idle second, where even a 100 ms poll would need dozens.
    assert after - before <= 10, f"an idle one-second wait made the server run {after - before - 1} commands"


async def test_a_delayed_task_enqueued_while_a_worker_waits_starts_on_time(open_redis: OpenRedis) -> None:
    worker = await open_redis()
    producer = await open_redis()
    claimed_at: list[float] = []

    async def work() -> None:
        while True:
            now = time.time()
            claimed = await worker.claim(["default"], 1, now=now, lease_until=now + 30)
            if claimed:
                claimed_at.append(now)
                return
            await worker.wait_for_work(["default"], timeout=120)

    with anyio.fail_after(PROMPT):
        async with anyio.create_task_group() as group:
            group.start_soon(work)
            await anyio.wait_all_tasks_blocked()
            now = time.time()
            await producer.enqueue_many([_task("later", now=now, delay=0.3)])
    run_at = now + 0.3
    assert claimed_at[0] >= run_at
    # Redis alone would end the blocking command up to 100 ms late; the backend's own alarm is prompt.
    assert claimed_at[0] - run_at < 2.0


async def test_a_worker_that_cannot_take_everything_wakes_another(
    open_redis: OpenRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    waiters = [await open_redis(), await open_redis()]
    producer = await open_redis()
    blocking = [anyio.Event(), anyio.Event()]
    taken: list[list[str]] = [[], []]

    for number, backend in enumerate(waiters):
        real_block = backend._waiting.block  # type: ignore[union-attr]

        async def block(*args: object, number: int = number, real_block: object = real_block) -> None:
            blocking[number].set()  # past the check for due work: only a wake-up can end this wait early
            await real_block(*args)  # type: ignore[operator]

        monkeypatch.setattr(backend._waiting, "block", block)

    async def waiter(number: int) -> None:
        backend = waiters[number]
        await backend.wait_for_work(["default"], timeout=120)
        now = time.time()
        taken[number] = [
            c.record.id for c in await backend.claim(["default"], 3, now=now, lease_until=now + 30)
        ]

    with anyio.fail_after(PROMPT):
        async with anyio.create_task_group() as group:
            group.start_soon(waiter, 0)
            group.start_soon(waiter, 1)
            await blocking[0].wait()
            await blocking[1].wait()
            now = time.time()
            await producer.enqueue_many([_task(f"t{n}", now=now) for n in range(6)])
    assert sorted(taken[0] + taken[1]) == [f"t{n}" for n in range(6)]
    assert len(taken[0]) == len(taken[1]) == 3


async def test_due_work_the_caller_does_not_claim_is_reported_once(open_redis: OpenRedis) -> None:
    """When the caller's clock disagrees with the backend's (or it cannot claim), a wait must not spin."""
    backend = await open_redis(clock=lambda: time.time() + 3600)
    now = time.time()
    await backend.enqueue_many([_task("due-by-the-backends-clock", now=now, delay=60)])
    with anyio.fail_after(PROMPT):
        started = time.monotonic()
        await backend.wait_for_work(["default"], timeout=60)
        assert time.monotonic() - started < 5, "due work must be reported at once the first time"
        started = time.monotonic()
        await backend.wait_for_work(["default"], timeout=0.3)
        assert time.monotonic() - started >= 0.25, "the same due task must not end every wait at once"
        claimed = await backend.claim(["default"], 1, now=now + 120, lease_until=now + 150)
        assert len(claimed) == 1
        await backend.enqueue_many([_task("another", now=now, delay=60)])
        started = time.monotonic()
        await backend.wait_for_work(["default"], timeout=60)
        assert time.monotonic() - started < 5, "new due work is reported again"


async def test_waiting_on_no_queue_just_waits_for_the_timeout(open_redis: OpenRedis) -> None:
    backend = await open_redis()
    with anyio.fail_after(PROMPT):
        started = time.monotonic()
        await backend.wait_for_work([], timeout=0.2)
    assert time.monotonic() - started >= 0.15


async def test_a_cancelled_wait_ends_its_blpop_and_keeps_its_connection(own_redis: RedisServer) -> None:
    """The engine cancels a wait whenever it wakes up for its own reasons (a local enqueue, a free slot):
    that must end the server-side BLPOP at once and must not cost a reconnect."""
    backend = RedisBackend(own_redis.url, prefix="cancel")
    admin = aioredis.Redis.from_url(own_redis.url)
    await backend.open()
    try:
        await backend.wait_for_work(["default"], timeout=0.01)  # connections made
        connections = (await admin.info("stats"))["total_connections_received"]
        with anyio.fail_after(PROMPT):
            for _ in range(3):
                async with anyio.create_task_group() as group:
                    group.start_soon(lambda: backend.wait_for_work(["default"], timeout=120))
                    await until_blocked(admin, 1)
                    group.cancel_scope.cancel()
                assert (await admin.info("clients"))["blocked_clients"] == 0
            now = time.time()
            assert await backend.enqueue_many([_task("after", now=now)]) == ["after"]
            await backend.wait_for_work(["default"], timeout=120)  # due at once: returns
        assert (await admin.info("stats"))["total_connections_received"] == connections
    finally:
        await admin.aclose()
        await backend.close()


async def test_a_full_claim_wakes_a_worker_for_a_lower_priority_queue_it_did_not_reach(
    own_redis: RedisServer,
) -> None:
    admin = aioredis.Redis.from_url(own_redis.url)
    backends = [RedisBackend(own_redis.url, prefix="chain") for _ in range(4)]
    busy, producer, thief, idle = backends
    for backend in backends:
        await backend.open()
    try:
        now = time.time()
        await producer.enqueue_many([_task("high", now=now, queue="high")])
        returned = {"thief": anyio.Event(), "idle": anyio.Event()}

        async def wait(backend: RedisBackend, name: str) -> None:
            await backend.wait_for_work(["low"], timeout=120)
            returned[name].set()

        with anyio.fail_after(PROMPT):
            async with anyio.create_task_group() as group:
                group.start_soon(wait, thief, "thief")
                await until_blocked(admin, 1)
                group.start_soon(wait, idle, "idle")
                await until_blocked(admin, 2)
                await producer.enqueue_many([_task("low", now=now, queue="low")])
                await returned["thief"].wait()  # BLPOP serves the longest waiter: the thief took the wake-up
                assert not returned["idle"].is_set()
                # One task (the limit) from "high"; "low" is never looked at, but due: wake a worker for it.
                claimed = await busy.claim(["high", "low"], 1, now=now, lease_until=now + 30)
                assert [c.record.id for c in claimed] == ["high"]
                await returned["idle"].wait()
        assert [c.record.id for c in await idle.claim(["low"], 1, now=now, lease_until=now + 30)] == ["low"]
    finally:
        for backend in backends:
            await backend.close()
        await admin.aclose()


async def test_a_task_enqueued_during_wait_and_claim_comes_back_in_its_one_round_trip(
    own_redis: RedisServer,
) -> None:
    """The claim rides behind the BLPOP: the task that ends the wait is leased by the same call, and no claim
    script runs after the wait ends (the server counts one EVALSHA for the claim, none more)."""
    backend = RedisBackend(own_redis.url, prefix="ride")
    producer = RedisBackend(own_redis.url, prefix="ride")
    admin = aioredis.Redis.from_url(own_redis.url)
    await backend.open()
    await producer.open()
    try:
        await backend.wait_for_work(["default"], timeout=0.01)  # connections made, scripts loaded
        got: list[list[str]] = []

        async def wait() -> None:
            now = time.time()
            claimed = await backend.wait_and_claim(
                ["default"], 5, now=now, lease_until=now + 30, timeout=120, woken=anyio.Event()
            )
            assert claimed is not None
            got.append([c.record.id for c in claimed])

        with anyio.fail_after(PROMPT):
            async with anyio.create_task_group() as group:
                group.start_soon(wait)
                await until_blocked(admin, 1)
                evalsha = await _calls(admin, "evalsha")
                # Due since a second ago: whether a task due at its enqueue is due by the claim's now (which
                # stays behind the real time) depends on the two clients' timing, not on this rule.
                assert await producer.enqueue_many([_task("woke", now=time.time() - 1)]) == ["woke"]
        assert got == [["woke"]]
        # The enqueue's script and the claim that was written with the BLPOP: nothing else.
        assert await _calls(admin, "evalsha") - evalsha == 2
        record = await backend.get("woke")
        assert record is not None
        assert record.state is TaskState.ACTIVE
    finally:
        await admin.aclose()
        await producer.close()
        await backend.close()


async def test_wait_and_claim_keeps_its_connection_and_replaces_one_left_dirty_or_closed(
    open_redis: OpenRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Consecutive waits with a claim behind them use one connection kept out of the pool (no lease and
    release per wait); a kept connection found with a reply unread is cleaned and one closed by the server
    is reconnected, so no wait reads a reply that is not its own."""
    backend = await open_redis()
    producer = await open_redis()
    waiter = backend._waiting
    assert waiter is not None
    pool = waiter._client.connection_pool
    real = pool.get_connection
    leased: list[object] = []

    async def counted(*args: Any, **kwargs: Any) -> Any:
        connection = await real(*args, **kwargs)  # type: ignore[no-untyped-call]
        leased.append(connection)
        return connection

    monkeypatch.setattr(pool, "get_connection", counted)

    async def claim(task_id: str) -> None:
        now = time.time()
        assert await producer.enqueue_many([_task(task_id, now=now - 1)]) == [task_id]
        with anyio.fail_after(PROMPT):
            claimed = await backend.wait_and_claim(
                ["default"], 5, now=now, lease_until=now + 30, timeout=120, woken=anyio.Event()
            )
        assert claimed is not None
        assert [c.record.id for c in claimed] == [task_id]

    for task_id in ("one", "two", "three"):
        await claim(task_id)
    assert len(leased) == 1  # the first wait leased it; the others found it kept
    kept = waiter._kept
    assert kept is not None
    assert kept is leased[0]
    await kept.send_command("PING")  # a reply left unread: the next wait must not take it for its own
    has_unread = unread_check(type(kept))  # can_read() on redis-py 8, can_read_destructive() before
    with anyio.fail_after(PROMPT):
        while not await has_unread(kept):
            await anyio.sleep(0.001)
    await claim("four")
    assert waiter._kept is kept
    await kept.send_command("CLIENT", "ID")
    client_id = int(await kept.read_response())
    admin = aioredis.Redis.from_url(backend._url)
    try:
        await admin.client_kill_filter(_id=str(client_id))  # closed by the server
    finally:
        await admin.aclose()
    await claim("five")
    assert len(leased) == 1  # reconnected in place, not replaced from the pool


async def test_wait_and_claim_advances_now_by_the_time_the_server_waited(open_redis: OpenRedis) -> None:
    """A delayed task that falls due during the wait is leased when the wait ends: the claim's now is the
    caller's, advanced by the server-measured wait, and the lease moves with it (never ahead of real time)."""
    backend = await open_redis()
    now = time.time()
    assert await backend.enqueue_many([_task("soon", now=now, delay=0.2)]) == ["soon"]
    with anyio.fail_after(PROMPT):
        before = time.time()
        claimed = await backend.wait_and_claim(
            ["default"], 5, now=before, lease_until=before + 30, timeout=120, woken=anyio.Event()
        )
        after = time.time()
    assert claimed is not None
    assert [c.record.id for c in claimed] == ["soon"]
    started = claimed[0].record.started_at
    assert started is not None
    assert now + 0.2 <= started <= after
    assert claimed[0].record.lease_until == pytest.approx(started + 30, abs=1e-6)


async def test_a_claim_behind_a_wait_takes_a_task_its_enqueuer_found_due_by_a_later_clock(
    own_redis: RedisServer,
) -> None:
    """The enqueue that ends the wait read its clock later than the waiting caller read its own (here half a
    second later, as if that caller's clock lagged; in real runs a few microseconds): the task is due at its
    enqueue, so in a ready set, and the claim behind the wait takes it at once, with ``started_at`` its
    ``run_at``, instead of finding it not due by its own now. The lease is not moved by that."""
    backend = RedisBackend(own_redis.url, prefix="ahead")
    producer = RedisBackend(own_redis.url, prefix="ahead")
    admin = aioredis.Redis.from_url(own_redis.url)
    await backend.open()
    await producer.open()
    await backend.wait_for_work(["default"], timeout=0.01)  # connections made, scripts loaded
    before = time.time()
    got: list[Any] = []

    async def wait() -> None:
        got.append(
            await backend.wait_and_claim(
                ["default"], 5, now=before, lease_until=before + 30, timeout=120, woken=anyio.Event()
            )
        )

    try:
        with anyio.fail_after(PROMPT):
            async with anyio.create_task_group() as group:
                group.start_soon(wait)
                await until_blocked(admin, 1)
                assert await producer.enqueue_many([_task("ahead", now=before + 0.5)]) == ["ahead"]
        after = time.time()
    finally:
        await admin.aclose()
        await producer.close()
        await backend.close()
    [claimed] = got
    assert claimed is not None
    assert [c.record.id for c in claimed] == ["ahead"]
    assert claimed[0].record.started_at == claimed[0].record.run_at == before + 0.5
    lease_until = claimed[0].record.lease_until
    assert lease_until is not None
    assert lease_until <= after + 30


async def test_a_wait_with_a_claim_behind_it_ends_at_once_for_a_ready_task_a_little_ahead(
    open_redis: OpenRedis,
) -> None:
    """A task due at its enqueue whose run_at is ahead of the waiting caller's now (by less than
    ``WAKE_GRACE``) makes prepare_wait ring: the claim behind takes it at once, ``started_at`` its
    ``run_at`` (it was not left until the caller's clock caught up)."""
    backend = await open_redis()
    now = time.time()
    assert await backend.enqueue_many([_task("ahead", now=now + 0.5)]) == ["ahead"]
    with anyio.fail_after(PROMPT):
        claimed = await backend.wait_and_claim(
            ["default"], 5, now=now, lease_until=now + 30, timeout=120, woken=anyio.Event()
        )
    assert claimed is not None
    assert [c.record.id for c in claimed] == ["ahead"]
    assert claimed[0].record.started_at == now + 0.5
    waiting = backend._waiting
    assert waiting is not None
    assert not waiting._ringers  # none was started: the reply came in at once


async def test_a_claim_behind_a_wait_leaves_a_ready_task_further_ahead_than_the_grace(
    own_redis: RedisServer,
) -> None:
    """A ready task whose run_at is more than ``WAKE_GRACE`` ahead of the caller's now (a clock skewed that
    much) neither ends the wait nor is taken by the claim behind it."""
    backend = RedisBackend(own_redis.url, prefix="grace")
    admin = aioredis.Redis.from_url(own_redis.url)
    await backend.open()
    try:
        now = time.time()
        assert WAKE_GRACE < 30
        assert await backend.enqueue_many([_task("far", now=now + 30)]) == ["far"]
        woken = anyio.Event()
        got: list[Any] = []

        async def wait() -> None:
            got.append(
                await backend.wait_and_claim(
                    ["default"], 5, now=now, lease_until=now + 30, timeout=120, woken=woken
                )
            )

        with anyio.fail_after(PROMPT):
            async with anyio.create_task_group() as group:
                group.start_soon(wait)
                await until_blocked(admin, 1)
                woken.set()
        assert got == [[]]
        record = await backend.get("far")
        assert record is not None
        assert record.state is TaskState.PENDING
    finally:
        await admin.aclose()
        await backend.close()


async def test_woken_ends_wait_and_claim_at_once_and_keeps_its_connection(own_redis: RedisServer) -> None:
    """Setting ``woken`` ends the BLPOP (the claim behind it then runs: its reply is returned, nothing lost),
    without a reconnect."""
    backend = RedisBackend(own_redis.url, prefix="woken")
    admin = aioredis.Redis.from_url(own_redis.url)
    await backend.open()
    try:
        await backend.wait_for_work(["default"], timeout=0.01)  # connections made
        connections = (await admin.info("stats"))["total_connections_received"]
        with anyio.fail_after(PROMPT):
            for _ in range(3):
                woken = anyio.Event()
                now = time.time()
                results: list[object] = []

                async def wait(woken: anyio.Event = woken, now: float = now) -> None:
                    results.append(
                        await backend.wait_and_claim(
                            ["default"], 5, now=now, lease_until=now + 30, timeout=120, woken=woken
                        )
                    )

                async with anyio.create_task_group() as group:
                    group.start_soon(wait)
                    await until_blocked(admin, 1)
                    woken.set()
                assert results == [[]]
                assert (await admin.info("clients"))["blocked_clients"] == 0
        assert (await admin.info("stats"))["total_connections_received"] == connections
    finally:
        await admin.aclose()
        await backend.close()


async def test_a_claim_behind_a_wait_whose_reply_is_lost_is_repeated_and_returns_its_tasks(
    open_redis: OpenRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The connection drops after the claim ran: the repeat (the same call id) returns the tasks it leased,
    from the claim's call log, instead of leasing nothing or leasing them twice."""
    backend = await open_redis()
    producer = await open_redis()
    now = time.time()
    assert await producer.enqueue_many([_task("kept", now=now, delay=0.1)]) == ["kept"]
    original = Waiter._send_all
    replies: list[object] = []

    async def lose_the_reply(self: Waiter, *args: object) -> object:
        replies.append(await original(self, *args))  # type: ignore[arg-type]
        raise RedisConnectionError("connection lost after the claim ran")

    monkeypatch.setattr(Waiter, "_send_all", lose_the_reply)
    with anyio.fail_after(PROMPT):
        claimed = await backend.wait_and_claim(
            ["default"], 5, now=now, lease_until=now + 30, timeout=120, woken=anyio.Event()
        )
    assert len(replies) == 1
    assert claimed is not None
    assert [c.record.id for c in claimed] == ["kept"]
    record = await backend.get("kept")
    assert record is not None
    assert record.state is TaskState.ACTIVE
    assert record.attempts == 1
    assert claimed[0].token == await _token(backend, "kept")


async def _calls(admin: aioredis.Redis, command: str) -> int:
    stats = await admin.info("commandstats")
    return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))


async def _token(backend: RedisBackend, task_id: str) -> str:
    runner = backend._run()
    token = await runner.client.hget(f"{backend.key_prefix}t:{task_id}", "k")
    assert isinstance(token, bytes)
    return token.decode()


class _Proxy:
    """A loopback TCP proxy to a Redis server that can be frozen: bytes then stop flowing both ways and no
    connection closes (a network partition, a half-open connection)."""

    def __init__(self, target: int) -> None:
        self._target = target
        self.flowing = asyncio.Event()
        self.flowing.set()
        self._writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None

    async def start(self) -> str:
        """Listen on a free loopback port; return the URL of the server through it."""
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"redis://127.0.0.1:{port}/0"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self._target)
        self._writers += (writer, upstream_writer)
        await asyncio.gather(self._pipe(reader, upstream_writer), self._pipe(upstream_reader, writer))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                await self.flowing.wait()
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        """Close every connection through the proxy and stop listening."""
        self.flowing.set()
        for writer in self._writers:
            writer.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


async def test_wait_and_claim_on_a_connection_gone_half_open_raises_within_its_timeouts(
    redis_url: str, unique_name: str
) -> None:
    """No reply to prepare_wait (bytes stop flowing, nothing closes): its read gives up after
    ``socket_timeout`` and the repeat of the claim after ``reconnect_timeout``, instead of waiting for ever
    (which held the worker's stop too)."""
    proxy = _Proxy(int(redis_url.split(":")[2].split("/")[0]))
    backend = RedisBackend(await proxy.start(), prefix=unique_name, socket_timeout=0.3, reconnect_timeout=0.3)
    await backend.open()
    try:
        await backend.wait_for_work(["default"], timeout=0.01)  # the blocking connection made
        proxy.flowing.clear()
        now = time.time()
        with anyio.fail_after(PROMPT), pytest.raises(RETRYABLE):
            await backend.wait_and_claim(
                ["default"], 1, now=now, lease_until=now + 30, timeout=120, woken=anyio.Event()
            )
    finally:
        proxy.flowing.set()
        with anyio.fail_after(PROMPT):
            await backend.close()
        await proxy.close()
        await delete_prefix(redis_url, unique_name)


async def test_an_error_reply_to_prepare_wait_leaves_no_blpop_or_claim_behind(own_redis: RedisServer) -> None:
    """prepare_wait refused (here WRONGTYPE; out of memory alike): the call raises once the claim behind it
    has answered too, so no BLPOP is left blocked with a claim queued on a pooled connection (which leased
    the next task for nobody and desynchronised the next call's replies)."""
    backend = RedisBackend(own_redis.url, prefix="refused")
    admin = aioredis.Redis.from_url(own_redis.url)
    await backend.open()
    try:
        await admin.set(f"{backend.key_prefix}paused", "not a set")  # prepare_wait and the claim: WRONGTYPE
        now = time.time()
        with anyio.fail_after(PROMPT), pytest.raises(ResponseError, match="WRONGTYPE"):
            await backend.wait_and_claim(
                ["default"], 1, now=now, lease_until=now + 30, timeout=120, woken=anyio.Event()
            )
        assert (await admin.info("clients"))["blocked_clients"] == 0
        await admin.delete(f"{backend.key_prefix}paused")
        now = time.time()
        assert await backend.enqueue_many([_task("next", now=now - 1)]) == ["next"]
        record = await backend.get("next")
        assert record is not None
        assert record.state is TaskState.PENDING  # no claim left behind leased it
        now = time.time()
        with anyio.fail_after(PROMPT):
            claimed = await backend.wait_and_claim(
                ["default"], 1, now=now, lease_until=now + 30, timeout=120, woken=anyio.Event()
            )
        assert claimed is not None
        assert [c.record.id for c in claimed] == ["next"]
        assert claimed[0].token == await _token(backend, "next")
    finally:
        await admin.aclose()
        await backend.close()


async def test_a_wait_skipping_the_reported_task_keeps_its_ringer_when_the_report_ends_meanwhile(
    own_redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """prepare_wait was sent the due task to skip (reported before), so it did not ring the alarm; when the
    report ends meanwhile (a claim elsewhere), the reply is still judged against what was sent: the ringer
    runs and ``woken`` ends the wait at once, without waiting ``socket_timeout`` and reconnecting."""
    backend = RedisBackend(own_redis.url, prefix="skip", socket_timeout=60)
    admin = aioredis.Redis.from_url(own_redis.url)
    await backend.open()
    original = Waiter.wait_then_claim

    async def report_ends_meanwhile(
        self: Waiter, queues: Any, timeout: float, woken: anyio.Event, now: float, claim_args: Any, call: str
    ) -> Any:
        def args(later: float) -> list[str]:
            self.claimed()  # written after skip was read, before the reply to prepare_wait is
            return cast("list[str]", claim_args(later))

        return await original(self, queues, timeout, woken, now, args, call)

    try:
        await backend.wait_for_work(["default"], timeout=0.01)  # connections made (the alarm rung once)
        now = time.time()
        assert await backend.enqueue_many([_task("due", now=now - 1)]) == ["due"]
        with anyio.fail_after(PROMPT):
            await backend.wait_for_work(["default"], timeout=120)  # due: reported, returns at once
        connections = (await admin.info("stats"))["total_connections_received"]
        monkeypatch.setattr(Waiter, "wait_then_claim", report_ends_meanwhile)
        woken = anyio.Event()
        results: list[object] = []

        async def wait() -> None:
            now = time.time()
            claimed = await backend.wait_and_claim(
                ["default"], 1, now=now, lease_until=now + 30, timeout=120, woken=woken
            )
            results.append([c.record.id for c in claimed or ()])

        with anyio.fail_after(PROMPT):
            async with anyio.create_task_group() as group:
                group.start_soon(wait)
                await until_blocked(admin, 1)  # prepare_wait skipped the due task: no ring
                woken.set()
        assert results == [["due"]]
        assert (await admin.info("stats"))["total_connections_received"] == connections
    finally:
        await admin.aclose()
        await backend.close()


async def test_the_waiter_holds_its_ringer_task_while_it_runs(open_redis: OpenRedis) -> None:
    """The event loop keeps only weak references to tasks: the waiter holds each ringer until it ends."""
    backend = await open_redis()
    waiting = backend._waiting
    woken = anyio.Event()
    seen: list[int] = []

    async def wait() -> None:
        now = time.time()
        await backend.wait_and_claim(["default"], 1, now=now, lease_until=now + 30, timeout=120, woken=woken)

    assert waiting is None or not waiting._ringers
    with anyio.fail_after(PROMPT):
        async with anyio.create_task_group() as group:
            group.start_soon(wait)
            while backend._waiting is None or not backend._waiting._ringers:
                await anyio.sleep(0)  # until the wait has started its ringer (no server state to ask)
            assert backend._waiting is not None
            seen.append(len(backend._waiting._ringers))
            woken.set()
        assert backend._waiting is not None
        while backend._waiting._ringers:  # discarded once done
            await anyio.sleep(0)
    assert seen == [1]


@pytest.mark.parametrize(("queues", "limit"), [([], 1), (["default"], 0)])
async def test_woken_ends_a_wait_and_claim_that_has_nothing_to_claim(
    open_redis: OpenRedis, queues: list[str], limit: int
) -> None:
    """No queues or no room to claim: a plain wait, still ended at once by ``woken`` (the worker's stop)."""
    backend = await open_redis()
    woken = anyio.Event()
    results: list[object] = []

    async def wait() -> None:
        now = time.time()
        results.append(
            await backend.wait_and_claim(
                queues, limit, now=now, lease_until=now + 30, timeout=120, woken=woken
            )
        )

    with anyio.fail_after(PROMPT):
        async with anyio.create_task_group() as group:
            group.start_soon(wait)
            await anyio.wait_all_tasks_blocked()  # the wait has begun
            woken.set()
    assert results == [None]


@pytest.mark.parametrize("stale", ["{seconds} 0", "{seconds} 0 another-call"])
async def test_a_claim_behind_a_wait_measures_only_from_the_start_stored_for_its_own_call(
    open_redis: OpenRedis, stale: str
) -> None:
    """A wait's start left over (an older layout of it, or another call's, e.g. kept across a restart while
    its claim never ran) does not advance a later claim's now and lease_until: they stay the caller's."""
    backend = await open_redis()
    runner = backend._run()
    waiting = backend._waiting
    assert waiting is not None
    now = time.time()
    assert await backend.enqueue_many([_task("due", now=now - 1)]) == ["due"]
    began = waiting.began
    await runner.client.set(began[1:], stale.format(seconds=int(now) - 3600))  # an hour before
    call = backend._call_id()
    args = [time_text(now), began, time_text(now + 30), "1", call, "", *limits_args(None), "default"]
    reply = await runner.run("claim", args)
    claimed = claimed_tasks(reply[1:])
    assert [c.record.id for c in claimed] == ["due"]
    assert claimed[0].record.started_at == pytest.approx(now, abs=1e-6)
    assert claimed[0].record.lease_until == pytest.approx(now + 30, abs=1e-6)
    assert not await runner.client.exists(began[1:])  # used once (here: dropped)


def _lua_names(source: str) -> set[str]:
    """The identifiers of Lua ``source``, its comments and string literals left out."""
    source = re.sub(r"--[^\n]*", "", source)
    source = re.sub(r"'(?:[^'\\\n]|\\.)*'|\"(?:[^\"\\\n]|\\.)*\"", "''", source)
    return set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", source))


def test_prepare_wait_carries_the_lines_of_the_prelude_it_uses_and_not_the_rest() -> None:
    """prepare_wait runs before every wait: it is sent with the few prelude lines it uses (copied verbatim,
    so its keys are the other scripts' keys), not the whole prelude, whose definitions cost the server about
    as much time per call as the script itself."""
    source = SCRIPTS["prepare_wait"].source
    assert PRELUDE not in source
    assert source.startswith(PREPARE_WAIT_PRELUDE)
    prelude_lines = PRELUDE.splitlines()
    for line in PREPARE_WAIT_PRELUDE.strip().splitlines():
        assert line in prelude_lines
    defined = set(re.findall(r"^local function (\w+)", PRELUDE, re.MULTILINE))
    for names in re.findall(r"^local ([\w, ]+?) =", PRELUDE, re.MULTILINE):
        defined.update(name.strip() for name in names.split(","))
    carried = set(re.findall(r"^local function (\w+)", PREPARE_WAIT_PRELUDE, re.MULTILINE)) | {"P"}
    body = source.removeprefix(PREPARE_WAIT_PRELUDE)
    assert (_lua_names(body) & defined) <= carried
    assert _lua_names(body) & defined  # the check above looked at the names it should


async def test_a_wait_whose_blpop_reply_comes_with_prepare_waits_starts_no_ringer(
    open_redis: OpenRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """prepare_wait found nothing due, but the BLPOP returned at once (here: a list it waits on holds an item;
    in a worker, an enqueue that got in between): its reply and the claim's come with prepare_wait's, so no
    ringer task is made, started and cancelled for a wait that never blocks. A BLPOP that blocks still gets
    its ringer (the tests above: its timeout and ``woken`` ring the alarm)."""
    backend = await open_redis()
    waiter = backend._waiting
    assert waiter is not None
    extra = f"{backend.key_prefix}extra"
    keys = Waiter._keys
    monkeypatch.setattr(Waiter, "_keys", lambda self, names: [extra, *keys(self, names)])
    started: list[float] = []
    ring = _Ringer.ring

    def counted(self: _Ringer, woken: anyio.Event, pause: float) -> Any:
        started.append(pause)
        return ring(self, woken, pause)

    monkeypatch.setattr(_Ringer, "ring", counted)
    runner = backend._run()
    for _ in range(3):
        await runner.client.rpush(extra, b"x")
        now = time.time()
        with anyio.fail_after(PROMPT):
            claimed = await backend.wait_and_claim(
                ["default"], 5, now=now, lease_until=now + 30, timeout=120, woken=anyio.Event()
            )
        assert claimed == []
        assert await runner.client.llen(extra) == 0  # the BLPOP took the item: it returned at once
    assert started == []
    assert not waiter._ringers
