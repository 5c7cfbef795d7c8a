"""``wait_for_work`` for the Redis backend: idle workers block on the server, on a connection of their own.

One script drops stale wake-up tokens and reads the first due time of the queues, atomically; then, unless
work is due already, a BLPOP on the queues' wake-up lists blocks until an enqueue, a release or a retry
pushes a token, or until the first delayed task is due. Redis ends a blocking command only on its next cron
tick (up to 100 ms late), so for an exact wake-up the waiter pushes to its own alarm list when the time is
up, which ends its BLPOP at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, cast

import anyio
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from ...._redact import library_logger
from ._conn import RETRYABLE, ScriptRunner, close_clients

__all__ = ["Waiter"]

_log = library_logger("lifecycle.asynctask.redis")

LONGEST_WAIT = 3600.0
"""A longer ``wait_for_work`` timeout returns after this (returning early is allowed)."""


class Waiter:
    """Waits for work for one backend object: its blocking connection, its alarm key, and the due task it
    reported last (so a caller that cannot claim it does not spin)."""

    def __init__(
        self,
        runner: ScriptRunner,
        client: aioredis.Redis,
        *,
        nonce: str,
        clock: Callable[[], float],
        socket_timeout: float,
    ) -> None:
        self._runner = runner
        self._client = client
        self._prefix = runner.prefix
        self._alarm = f"{runner.prefix}u:{nonce}"
        self._clock = clock
        self._socket_timeout = socket_timeout
        self._reported: tuple[tuple[str, ...], bytes, bytes] | None = None

    def claimed(self) -> None:
        """The backend leased tasks: due work seen from now on is news again."""
        self._reported = None

    async def wait(self, queues: Sequence[str], timeout: float) -> None:
        """See :meth:`RedisBackend.wait_for_work`."""
        names = tuple(dict.fromkeys(queues))
        pause = min(float(timeout), LONGEST_WAIT)
        if not names:
            await anyio.sleep(max(0.0, pause))
            return
        first = await self._runner.run("prepare_wait", [self._alarm, *names])
        if first is not None:
            due_in = float(first[0]) - self._clock()
            if due_in <= 0:
                head = (names, first[0], first[1])
                if self._reported != head:
                    self._reported = head
                    return
            else:
                pause = min(pause, due_in)
        if not pause > 0:  # also NaN
            return
        keys = [*(f"{self._prefix}w:{name}" for name in names), self._alarm]
        try:
            await self.block(keys, pause)
        except RETRYABLE as exc:
            # The connection dropped (a restart?): the next claim reconnects; do not spin meanwhile.
            _log.debug("wait_for_work: Redis connection lost (%s)", exc)
            await anyio.sleep(min(pause, 0.25))

    async def block(self, keys: list[str], pause: float) -> None:
        """BLPOP ``keys`` for ``pause`` seconds; at the end of ``pause`` ring the alarm (one of ``keys``)."""
        blocking = cast("Coroutine[Any, Any, Any]", self._client.blpop(keys, timeout=pause + 1.0))
        blpop: asyncio.Task[Any] = asyncio.get_running_loop().create_task(blocking)
        try:
            done, _ = await asyncio.wait((blpop,), timeout=pause)
            if not done:
                runner = self._runner
                await runner.once(lambda: runner.client.lpush(self._alarm, b"1"))
                done, _ = await asyncio.wait((blpop,), timeout=self._socket_timeout)
            if done:
                blpop.result()
        finally:
            if not blpop.done():
                await self._end(blpop)
            if not blpop.cancelled():
                blpop.exception()  # retrieved: an error was raised above or does not matter any more

    async def _end(self, blpop: asyncio.Task[Any]) -> None:
        """End a BLPOP early (the wait was cancelled: the engine woke up for a reason of its own). Ringing
        the alarm ends it cleanly and keeps its connection; cancelling it would make redis-py drop the
        connection (a reconnect per wake-up). Cancel only when the server does not answer."""
        with anyio.CancelScope(shield=True):
            with anyio.move_on_after(1.0):
                try:
                    await self._runner.client.lpush(self._alarm, b"1")
                    await asyncio.wait((blpop,))
                except (RedisError, OSError):
                    pass
            if not blpop.done():
                blpop.cancel()  # redis-py drops the connection; the pool opens a new one next time
                await asyncio.wait((blpop,))

    async def close(self) -> None:
        """Remove the alarm (best effort: one rung just after its BLPOP had returned is left over) and close
        the blocking connection."""
        with anyio.CancelScope(shield=True):
            with anyio.move_on_after(1.0):
                try:
                    await self._runner.client.delete(self._alarm)
                except (RedisError, OSError):
                    pass
        await close_clients(self._client)
