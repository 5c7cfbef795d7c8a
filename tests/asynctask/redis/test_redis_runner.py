"""The ScriptRunner's kept connections: script calls go straight to connections leased from the client's
pool, and a call cancelled before its reply is read never leaves that reply for the next call."""

from __future__ import annotations

import anyio
import pytest

from tests.asynctask.redis.redis_servers import OpenRedis

pytestmark = pytest.mark.redis

ECHO = "return ARGV[1]"


async def test_a_call_cancelled_before_its_reply_leaves_nothing_for_the_next_call(
    open_redis: OpenRedis,
) -> None:
    backend = await open_redis(max_connections=2)
    runner = backend._run()
    sha = await runner.client.script_load(ECHO)
    assert await runner.evalsha(sha, 0, "warm") == b"warm"
    kept = list(runner._idle)
    assert len(kept) == 1  # the connection the call used is kept for the next one
    with anyio.CancelScope() as scope:
        scope.cancel()  # lands while the reply is awaited: the command has been sent
        await runner.evalsha(sha, 0, "lost")
    assert scope.cancelled_caught
    assert runner._idle == kept  # kept, but dropped by redis-py: it reconnects rather than read "lost"
    for word in ("one", "two", "three"):
        assert await runner.evalsha(sha, 0, word) == word.encode()


async def test_the_runner_keeps_at_most_half_the_pool_and_concurrent_calls_all_answer(
    open_redis: OpenRedis,
) -> None:
    backend = await open_redis(max_connections=4)
    runner = backend._run()
    sha = await runner.client.script_load(ECHO)
    replies: dict[int, bytes] = {}

    async def call(index: int) -> None:
        replies[index] = await runner.evalsha(sha, 0, str(index))

    with anyio.fail_after(30):
        async with anyio.create_task_group() as group:
            for index in range(50):
                group.start_soon(call, index)
    assert replies == {index: str(index).encode() for index in range(50)}
    assert len(runner._idle) == 2
    # The client's own commands still find a free connection in the pool.
    assert await runner.client.ping()
