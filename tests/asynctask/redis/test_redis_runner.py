"""The ScriptRunner's kept connections: script calls go straight to connections leased from the client's
pool, and a call cancelled before its reply is read never leaves that reply for the next call."""

from __future__ import annotations

import asyncio
from typing import Any

import anyio
import pytest
import redis.asyncio as aioredis
from redis.asyncio.connection import Connection
from redis.exceptions import ConnectionError as RedisConnectionError

from lifecycle.asynctask._backends.redis._conn import SCRIPTS, ScriptRunner, unread_check
from lifecycle.asynctask._backends.redis._lua import LuaScript
from lifecycle.asynctask.redis import RedisBackend
from tests.asynctask.redis.redis_servers import OpenRedis, RedisServer

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


async def test_a_clean_kept_connection_skips_the_pools_reconnect_check_and_a_dirty_one_takes_it(
    open_redis: OpenRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = await open_redis(max_connections=2)
    runner = backend._run()
    sha = await runner.client.script_load(ECHO)
    assert await runner.evalsha(sha, 0, "warm") == b"warm"
    pool = runner.client.connection_pool
    real = pool.ensure_connection
    checked: list[Any] = []

    async def counted(connection: Any) -> None:
        checked.append(connection)
        await real(connection)

    monkeypatch.setattr(pool, "ensure_connection", counted)
    for word in ("one", "two"):
        assert await runner.evalsha(sha, 0, word) == word.encode()
    assert checked == []  # connected, nothing unread: no connect() through redis-py's retry helper
    (kept,) = runner._idle
    await kept.send_command("PING")  # its reply left unread: the next call must not read it as its own
    with anyio.fail_after(10):
        while not await kept.can_read():  # until the reply is in (the check sees only what has arrived)
            await anyio.sleep(0.001)
    assert await runner.evalsha(sha, 0, "three") == b"three"
    assert checked == [kept]
    await runner.client.client_kill_filter(_id=str(await _client_id(kept)))  # closed by the server
    await _until_closed(kept)
    checked.clear()  # the client's own command above took a pool connection through the check
    assert await runner.evalsha(sha, 0, "four") == b"four"
    assert checked == [kept]


async def _until_closed(connection: Any) -> None:
    """Wait until ``connection`` has seen that the server closed it: its check then raises (redis-py 8.2), or
    says there is something to read (8.1: the end of the stream; nothing else is unread here)."""
    with anyio.fail_after(10):
        while True:
            try:
                if await connection.can_read():
                    return
            except RedisConnectionError:
                return
            await anyio.sleep(0.001)


async def _client_id(connection: Any) -> int:
    await connection.send_command("CLIENT", "ID")
    return int(await connection.read_response())


# Holds the server for its last argument's seconds (by its own clock): a late reply, on a private server.
SLOW = """
local t = redis.call('TIME')
local stop = tonumber(t[1]) + tonumber(t[2]) / 1e6 + tonumber(ARGV[#ARGV])
repeat
  t = redis.call('TIME')
until tonumber(t[1]) + tonumber(t[2]) / 1e6 >= stop
return 'late'
"""


async def test_a_kept_connection_call_without_a_reply_in_socket_timeout_raises_and_the_next_one_answers(
    own_redis: RedisServer,
) -> None:
    backend = RedisBackend(own_redis.url, prefix="alarm", socket_timeout=0.2, reconnect_timeout=0.01)
    await backend.open()
    try:
        runner = backend._run()
        sha = await runner.client.script_load(ECHO)
        slow = await runner.client.script_load(SLOW)
        assert await runner.evalsha(sha, 0, "warm") == b"warm"
        assert runner._idle  # the next call takes a kept connection, under the runner's alarm
        with anyio.fail_after(10):  # the test's own guard, far beyond the 0.2 s reply timeout
            with pytest.raises(TimeoutError):
                await runner.evalsha(slow, 0, "1.5")
            assert runner._deadlines == {}
            assert not runner._late
            assert await runner.client.ping()  # answered once the slow script has ended
            # The aborted connection is kept and reconnects; its late reply is never read as this one's.
            for word in ("one", "two"):
                assert await runner.evalsha(sha, 0, word) == word.encode()
    finally:
        await backend.close()


async def test_a_script_call_on_a_kept_connection_times_out_through_run(own_redis: RedisServer) -> None:
    backend = RedisBackend(own_redis.url, prefix="alarm", socket_timeout=0.2, reconnect_timeout=0.01)
    await backend.open()
    try:
        runner = backend._run()
        SCRIPTS["slow_for_test"] = LuaScript("slow_for_test", SLOW)
        await runner.client.script_load(SLOW)
        assert await runner.run("stats", []) is not None
        assert runner._idle
        with anyio.fail_after(10):
            with pytest.raises(TimeoutError):
                await runner.run("slow_for_test", ["1.5"])
            assert await runner.client.ping()  # answered once the slow script has ended
            assert await runner.run("stats", []) is not None
    finally:
        SCRIPTS.pop("slow_for_test", None)
        await backend.close()


class _Transport:
    def __init__(self) -> None:
        self.aborted = 0

    def abort(self) -> None:
        self.aborted += 1


class _Writer:
    def __init__(self) -> None:
        self.transport = _Transport()


class _Connection:
    _writer: _Writer | None = None


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_the_alarm_aborts_a_late_call_once_its_connection_has_a_socket() -> None:
    runner = ScriptRunner(object(), prefix="p:", socket_timeout=30.0, reconnect_timeout=1.0)  # type: ignore[arg-type]
    opening: Any = _Connection()
    open_: Any = _Connection()
    open_._writer = _Writer()
    now = asyncio.get_running_loop().time()
    runner._deadlines.update({opening: now - 1, open_: now - 1})
    runner._expire()
    assert open_._writer.transport.aborted == 1
    assert runner._late == {opening, open_}
    assert list(runner._deadlines) == [opening]  # looked at again shortly, while it opens its socket
    assert runner._alarm is not None
    runner._alarm.cancel()
    opening._writer = _Writer()
    runner._deadlines[opening] = now - 1
    runner._expire()
    assert opening._writer.transport.aborted == 1
    assert runner._deadlines == {}
    assert runner._alarm is None


class _Absent:
    """A class attribute that reads as missing, on the class and on its instances (``__get__`` raises)."""

    def __get__(self, instance: object, owner: type | None = None) -> Any:
        raise AttributeError("can_read")


class _Redis7Connection(Connection):
    """A connection as redis-py 5 to 7 have it: ``can_read_destructive`` only, no ``can_read``."""

    can_read = _Absent()

    async def can_read_destructive(self) -> bool:
        # redis-py 8 deprecates its own (the tests make the warning an error); this is the same check.
        return await Connection.can_read(self)


class _Redis7Pool(aioredis.ConnectionPool):
    """A pool as redis-py 5 to 7 have it: ``ensure_connection`` checks with ``can_read_destructive``."""

    async def ensure_connection(self, connection: Any) -> None:
        await connection.connect()
        try:
            if await connection.can_read_destructive():
                raise RedisConnectionError("Connection has data") from None
        except (RedisConnectionError, OSError):
            await connection.disconnect()
            await connection.connect()
            if await connection.can_read_destructive():
                raise RedisConnectionError("Connection not ready") from None


def test_the_kept_connection_check_falls_back_to_can_read_destructive() -> None:
    assert not hasattr(_Redis7Connection, "can_read")
    assert unread_check(_Redis7Connection) is _Redis7Connection.can_read_destructive
    assert unread_check(Connection) is Connection.can_read  # redis-py 8: what its ensure_connection calls


async def test_kept_connections_are_reused_on_a_connection_class_without_can_read(redis_url: str) -> None:
    """redis-py 5 to 7: reusing a kept connection checks it with ``can_read_destructive``; a dirty one still
    goes through the pool's reconnect check."""
    pool = _Redis7Pool.from_url(redis_url, connection_class=_Redis7Connection, max_connections=2)
    client = aioredis.Redis(connection_pool=pool)
    runner = ScriptRunner(client, prefix="unused:", socket_timeout=10.0, reconnect_timeout=0.0)
    try:
        sha = await client.script_load(ECHO)
        with anyio.fail_after(10):
            for word in ("one", "two", "three"):
                assert await runner.evalsha(sha, 0, word) == word.encode()
            (kept,) = runner._idle
            await kept.send_command(
                "PING"
            )  # its reply left unread: the next call must not read it as its own
            while not await kept.can_read_destructive():
                await anyio.sleep(0.001)
            assert await runner.evalsha(sha, 0, "four") == b"four"
    finally:
        await client.aclose()
        await pool.disconnect()
