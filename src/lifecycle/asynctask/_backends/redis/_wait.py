"""``wait_for_work`` for the Redis backend: idle workers block on the server, on a connection of their own.

One script drops stale wake-up tokens and reads the first due time of the queues, atomically; then, unless
work is due already, a BLPOP on the queues' wake-up lists blocks until an enqueue, a release or a retry
pushes a token, or until the first delayed task is due. Redis ends a blocking command only on its next cron
tick (up to 100 ms late), so for an exact wake-up the waiter pushes to its own alarm list when the time is
up, which ends its BLPOP at once.

A worker that claims as soon as the wait ends sends its claim script behind the BLPOP, in the same write
(:meth:`Waiter.wait_then_claim`): the server runs it the moment the BLPOP returns, so the task that woke the
worker comes back in the wait's own round trip instead of one more. The claim measures the time since the
wait began on the server's clock (see the claim script), so its ``now`` is the caller's clock then, never
ahead of it, or the ``run_at`` of a ready task it takes, if later (by at most ``WAKE_GRACE``): the time a
clock read before that task was made ready.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, cast

import anyio
import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import NoScriptError, RedisError, ResponseError

from ...._redact import library_logger
from ._codec import time_text
from ._conn import RETRYABLE, ScriptRunner, close_clients, ready_for_reuse, unread_check

__all__ = ["Settling", "Waiter", "until_set"]

_log = library_logger("lifecycle.asynctask.redis")

LONGEST_WAIT = 3600.0
"""A longer ``wait_for_work`` timeout returns after this (returning early is allowed)."""


class Settling:
    """A settle script call written ahead of a wait with a claim behind it (see
    :meth:`RedisBackend.settle_wait_and_claim`): its arguments, and ``report``, told its reply once (the lost
    ids) or ``None`` when the server refused it; never told when no reply was read (its outcome unknown)."""

    __slots__ = ("args", "read", "report")

    def __init__(self, args: list[str | bytes], report: Callable[[Any], None]) -> None:
        self.args = args
        self.report = report
        self.read = False  # its outcome was reported

    def done(self, reply: Any) -> None:
        """Report ``reply`` (``None``: refused), the first time only."""
        if not self.read:
            self.read = True
            self.report(reply)


class Waiter:
    """Waits for work for one backend object: its blocking connection, its alarm key, and the due task it
    reported last (so a caller that cannot claim it does not spin).

    The connection a wait with a claim behind it used is kept leased from the blocking client's pool (which
    has no size limit) for the next one, and checked as the pool checks a connection it hands out: an idle
    worker waits once per task, and redis-py's pool takes a lock and runs its metrics hooks on every lease
    and release, about as much client CPU as writing the wait itself."""

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
        self._reported: tuple[bytes, bytes] | None = None
        # Ringer tasks still running: the event loop keeps only a weak reference to a task, and a ringer may
        # outlive its call (it ends once its LPUSH is answered).
        self._ringers: set[asyncio.Task[None]] = set()
        self._kept: AbstractConnection | None = None  # leased from the pool, clean, not in use
        self._primitives: tuple[Callable[..., anyio.CancelScope], Callable[[], float]] | None = None
        pool = getattr(client, "connection_pool", None)
        self._has_unread = unread_check(pool.connection_class) if pool is not None else None

    def claimed(self) -> None:
        """The backend leased tasks: due work seen from now on is news again."""
        self._reported = None

    @property
    def writes_claims(self) -> bool:
        """Whether :meth:`wait_then_claim` writes its claim (and a settle call) with the wait: not on a Redis
        Cluster client, which has no connection of its own to write them on."""
        return isinstance(self._client, aioredis.Redis)

    @property
    def began(self) -> str:
        """What a claim sent behind this waiter's wait takes in place of its sortable ``now``: ``@`` and the
        key where the wait's prepare_wait stores the server's time when the wait began."""
        return f"@{self._alarm}:t"

    async def wait(self, queues: Sequence[str], timeout: float) -> None:
        """See :meth:`RedisBackend.wait_for_work`."""
        names = tuple(dict.fromkeys(queues))
        pause = min(float(timeout), LONGEST_WAIT)
        if not names:
            await anyio.sleep(max(0.0, pause))
            return
        first = await self._runner.run("prepare_wait", [self._alarm, "", "", "", "", *names])
        if first is not None:
            due_in = float(first[0]) - self._clock()
            if due_in <= 0:
                head = (first[0], first[1])
                if self._reported != head:
                    self._reported = head
                    return
            else:
                pause = min(pause, due_in)
        if not pause > 0:  # also NaN
            return
        try:
            await self.block(self._keys(names), pause)
        except RETRYABLE as exc:
            # The connection dropped (a restart?): the next claim reconnects; do not spin meanwhile.
            _log.debug("wait_for_work: Redis connection lost (%s)", exc)
            await anyio.sleep(min(pause, 0.25))

    async def wait_then_claim(
        self,
        queues: Sequence[str],
        timeout: float,
        woken: anyio.Event,
        now: float,
        claim_args: Callable[[float], list[str]],
        call: str,
        settling: Settling | None = None,
    ) -> Any:
        """:meth:`wait`, ended early when ``woken`` is set, written in one go with its BLPOP and the claim
        script behind it, on one connection: the server runs prepare_wait, blocks, and runs the claim as soon
        as the BLPOP returns; when work is due by ``now`` already, prepare_wait rings the alarm and the BLPOP
        returns at once. One round trip. ``claim_args(later)`` gives the claim's arguments (its sortable
        ``now`` is :attr:`began`) with the caller's ``now`` and ``lease_until`` moved ``later`` seconds: the
        time this call took before its write (real time, as the server then measures the rest), so the
        claim's now is as close behind the real time as it can be. ``call`` is the claim's call id:
        prepare_wait stores it with the wait's start, and only the claim of that call measures from it.

        Returns the claim script's reply, also when ``woken`` ended the wait (the claim has run by then), or
        ``None`` when no claim was sent: ``woken`` was set before, no queues, a Redis Cluster client. After a
        lost connection the claim is sent again with the same arguments, through the runner (its call log
        makes a repeat of a claim that ran return what it leased).

        With ``settling``, its settle call is written first, ahead of prepare_wait, and its reply reported as
        soon as it is read; when nothing is written, it runs on its own first. After a lost connection it is
        sent again with the same arguments (its call marker makes a repeat of a call that ran count its
        settlements as applied), unless its reply was read; when that repeat fails too, nothing is reported:
        its outcome is unknown (the caller names the call in the next settle call of those leases)."""
        started = time.monotonic()
        names = tuple(dict.fromkeys(queues))
        pause = min(float(timeout), LONGEST_WAIT)
        if settling is not None and (not names or not self.writes_claims or woken.is_set()):
            settling.done(await self._runner.run("settle", settling.args))
            settling = None
        if not names or not isinstance(self._client, aioredis.Redis):
            # Nothing to send a claim behind (a cluster client has no connection of its own to write it all
            # on): wait as wait() does, until woken.
            await until_set(woken, self.wait(names, pause))
            return None
        if woken.is_set():
            return None
        runner = self._runner
        skip = self._reported or ("", "")
        keys = self._keys(names)
        sent: list[list[str]] = []

        def commands() -> tuple[float, tuple[tuple[str | bytes | int | float, ...], ...]]:
            later = time.monotonic() - started
            args = claim_args(later)
            sent.append(args)
            waiting: tuple[tuple[str | bytes | int | float, ...], ...] = (
                runner.command("prepare_wait", [self._alarm, time_text(now + later), *skip, call, *names]),
                ("BLPOP", *keys, pause + 1.0),
                runner.command("claim", args),
            )
            if settling is None:
                return now + later, waiting
            return now + later, (runner.command("settle", settling.args), *waiting)

        try:
            return await self._send_all(commands, skip, pause, woken, settling)
        except (*RETRYABLE, NoScriptError) as exc:
            if not sent:
                raise  # nothing was written: no claim ran (nor the settle call)
            # Whether the claim ran is unknown (or it did not: its script was not loaded): send it again.
            _log.debug("wait_for_work: the claim behind the wait failed (%s); repeating it", exc)
            if isinstance(exc, NoScriptError):
                await runner.load("prepare_wait")
            reply = await runner.run("claim", sent[0])
            if settling is not None and not settling.read:
                # Whether it ran is unknown too: send it again (after the claim, whose reply is not to be lost
                # to a failure of this one). When that fails too, it stays unread: its outcome is unknown.
                try:
                    settling.done(await runner.run("settle", settling.args))
                except Exception as again:
                    _log.debug("wait_for_work: the settle call before the wait failed (%s)", again)
            return reply

    def _keys(self, names: tuple[str, ...]) -> list[str]:
        """The lists a BLPOP for ``names`` waits on: their wake-up lists and this waiter's alarm."""
        return [*(f"{self._prefix}w:{name}" for name in names), self._alarm]

    async def _send_all(
        self,
        commands: Callable[[], tuple[float, tuple[tuple[str | bytes | int | float, ...], ...]]],
        skip: tuple[bytes, bytes] | tuple[str, str],
        pause: float,
        woken: anyio.Event,
        settling: Settling | None = None,
    ) -> Any:
        """Write prepare_wait, the BLPOP and the claim at once on one connection of the blocking pool (with
        ``settling``, its settle call first: its reply is read and reported first, an error reply as a
        refusal), then
        read the three replies in this task (so the task that ended the wait is returned without a hop between
        tasks), while a ringer task (started once the read waits) rings the alarm at the end of the wait or
        when ``woken`` is set. Returns
        the claim's reply. An error reply to prepare_wait ends the BLPOP at once and the claim's reply is read
        still: what it leased is returned, or, when it leased nothing, the error is raised. On any other
        exception before all three replies are read the connection is closed, so the server drops a claim
        still queued behind the BLPOP and no later use of the connection reads a stale reply."""
        pool = self._client.connection_pool
        connection = await self._lease(pool)
        ringer: _Ringer | None = None
        start: asyncio.Handle | None = None
        owed = 0  # replies written for and not read yet
        try:
            now, written = commands()
            owed = len(written)
            await connection.send_packed_command(connection.pack_commands(written), check_health=False)
            rang = unloaded = False
            refused: ResponseError | None = None
            # One cancel scope for the three reads. First with a deadline: no ringer yet and no socket timeout
            # on this client, so without one a connection gone half-open would hold this read (and the
            # worker's stop) for hours (the TimeoutError raised below is retried); it stands when the BLPOP
            # returns at once, so all three replies are due within socket_timeout of the write. Otherwise the
            # ringer cancels it when no reply came after it rang. (The running loop's own scope class and
            # clock, looked up once: anyio.CancelScope() and anyio.current_time() find the running library
            # anew on every call.)
            new_scope, loop_time = self._primitives or self._look_up_primitives()
            reading = new_scope(deadline=loop_time() + self._socket_timeout)
            with reading:
                if settling is not None:
                    try:
                        settled = await connection.read_response()
                    except ResponseError as exc:  # refused (an error reply is read whole): the rest runs
                        _log.debug("wait_for_work: the settle call before the wait failed (%s)", exc)
                        settled = None
                    owed -= 1
                    settling.done(settled)
                try:
                    first = await connection.read_response()
                except NoScriptError:
                    # prepare_wait did not run (a restarted server): end the BLPOP now, read on, load it
                    # after.
                    first, pause, unloaded = None, 0.0, True
                except ResponseError as exc:
                    # prepare_wait refused (out of memory, a wrong type, a script error): the BLPOP and the
                    # claim still run, so end the BLPOP now and read on, leaving nothing unread on the
                    # connection and returning whatever the claim leased.
                    first, pause, refused = None, 0.0, exc
                owed -= 1
                if first is not None:
                    if len(first) > 2:  # prepare_wait rang the alarm: the BLPOP returns at once
                        rang = True
                        self._reported = (first[0], first[1])
                    elif (due_in := float(first[0]) - now) > 0:
                        pause = min(pause, due_in)
                if not rang:
                    reading.deadline = math.inf
                    ringer = _Ringer(self._runner, self._alarm, self._socket_timeout, reading)
                    # Started on the event loop's next turn, so only when the read below waits: when the
                    # BLPOP's reply came in with prepare_wait's (the wait ended at once: an enqueue got in
                    # just before it), the reads take the replies without yielding and no ringer task is
                    # made, started and cancelled (about as much CPU as decoding the claimed task).
                    start = asyncio.get_running_loop().call_soon(self._start_ringer, ringer, woken, pause)
                try:
                    await connection.read_response()
                except ResponseError as exc:  # a BLPOP refused (not connection trouble): the claim still ran
                    _log.debug("wait_for_work: BLPOP failed (%s)", exc)
                owed -= 1
                try:
                    reply = await connection.read_response()
                except ResponseError:
                    owed = 0  # an error reply is read whole: the claim did not lease
                    raise
                owed = 0
                if unloaded:
                    raise NoScriptError("prepare_wait was not loaded")
                if refused is not None:
                    _log.debug("wait_for_work: prepare_wait failed (%s)", refused)
                    if len(reply) <= 1:  # the claim leased nothing: the error stands (no spinning caller)
                        raise refused
                return reply
        finally:
            if owed:
                # Replies left unread (a timeout, a cancellation, an error): the BLPOP may still block with
                # the claim queued behind it. Closing the connection makes the server drop a claim that has
                # not run, and no later use of the connection reads these replies as its own.
                with anyio.CancelScope(shield=True):
                    await connection.disconnect()
                await pool.release(connection)
            elif self._kept is None:
                self._kept = connection  # every reply read: clean, for the next wait
            else:
                await pool.release(connection)
            if ringer is not None:
                ringer.replied.set()
                if start is not None:
                    start.cancel()  # no effect once it has run
                if ringer.task is not None and not ringer.ringing:
                    # (A ringing one ends once its LPUSH is answered: cancelling it would drop a connection.)
                    ringer.task.cancel()
        # Reached only when a reply did not come in time: the connection is dropped, the caller repeats.
        raise TimeoutError(
            f"no reply from Redis within {self._socket_timeout} s to a wait with a claim behind it"
        )

    def _look_up_primitives(self) -> tuple[Callable[..., anyio.CancelScope], Callable[[], float]]:
        """The running loop's cancel scope class and clock (anyio's asyncio deadlines are the loop's time),
        kept for the next waits: this waiter serves one event loop."""
        primitives = self._primitives = (type(anyio.CancelScope()), asyncio.get_running_loop().time)
        return primitives

    def _start_ringer(self, ringer: _Ringer, woken: anyio.Event, pause: float) -> None:
        """Start ``ringer``'s task (held here until it ends: the loop keeps only a weak reference)."""
        task = ringer.task = asyncio.get_running_loop().create_task(ringer.ring(woken, pause))
        self._ringers.add(task)
        task.add_done_callback(self._ringers.discard)

    async def _lease(self, pool: aioredis.ConnectionPool) -> AbstractConnection:
        """The kept connection, made ready for reuse (see :func:`ready_for_reuse`), or a connection from the
        pool when none is kept (the first wait, or another one in progress)."""
        connection, self._kept = self._kept, None
        if connection is None:
            return cast("AbstractConnection", await pool.get_connection())  # type: ignore[no-untyped-call]
        try:
            await ready_for_reuse(pool, connection, self._has_unread)
        except BaseException:
            with anyio.CancelScope(shield=True):  # back to the pool also when cancelled
                await pool.release(connection)
            raise
        return connection

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
        """Remove the alarm and the last wait's start time (best effort: an alarm rung just after its BLPOP
        had returned is left over) and close the blocking connection."""
        with anyio.CancelScope(shield=True):
            with anyio.move_on_after(1.0):
                try:
                    await self._runner.client.delete(self._alarm, f"{self._alarm}:t")
                except (RedisError, OSError):
                    pass
        kept, self._kept = self._kept, None
        if kept is not None:
            with anyio.CancelScope(shield=True):
                await self._client.connection_pool.release(kept)
        await close_clients(self._client)


class _Ringer:
    """Ends a BLPOP with a claim behind it: rings the alarm at the end of the wait or when woken, which ends
    the BLPOP (and so runs the claim); cancels ``reading`` when no reply came ``socket_timeout`` later.
    Ringing keeps the connection, where cancelling the read would make redis-py drop it (a reconnect per
    wake-up)."""

    def __init__(
        self, runner: ScriptRunner, alarm: str, socket_timeout: float, reading: anyio.CancelScope
    ) -> None:
        self._runner = runner
        self._alarm = alarm
        self._socket_timeout = socket_timeout
        self.reading = reading
        self.replied = asyncio.Event()  # the waiter runs on asyncio: no anyio look-up of the running library
        self.ringing = False
        self.task: asyncio.Task[None] | None = None  # once started

    async def ring(self, woken: anyio.Event, pause: float) -> None:
        """Wait ``pause`` seconds or for ``woken``; then ring, and give the reply ``socket_timeout``."""
        with anyio.move_on_after(pause):
            await woken.wait()
        if self.replied.is_set():
            return
        self.ringing = True
        runner = self._runner
        try:
            await runner.once(lambda: runner.client.lpush(self._alarm, b"1"))
        except (RedisError, OSError) as exc:
            _log.debug("wait_for_work: could not ring the alarm (%s)", exc)
        with anyio.move_on_after(self._socket_timeout):
            await self.replied.wait()
        if not self.replied.is_set():
            self.reading.cancel()


async def until_set(event: anyio.Event, waiting: Awaitable[None]) -> None:
    """Await ``waiting``; cancel it when ``event`` is set first."""

    async def cancel_when_set(scope: anyio.CancelScope) -> None:
        await event.wait()
        scope.cancel()

    async with anyio.create_task_group() as group:
        group.start_soon(cancel_when_set, group.cancel_scope)
        await waiting
        group.cancel_scope.cancel()
