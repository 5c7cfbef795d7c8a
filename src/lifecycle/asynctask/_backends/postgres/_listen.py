"""The LISTEN side of PostgresBackend's wake-ups and notices: one dedicated connection per backend object.

Writers call ``pg_notify(channel, queue)`` inside the transaction that made work claimable, so the
notification is delivered exactly when (and only if) that transaction commits. The :class:`Listener` keeps a
counter per queue; ``wait_for_work`` remembers the counters of its queues and sleeps until they change. When
the connection drops (a server restart), the listener reconnects with backoff and bumps every counter, since
notifications sent meanwhile are lost: waiters then look at the table again. The connection is opened only
when wake-ups are first needed (the first ``wait_for_work`` or ``wait_for_notices``), so a process that only
enqueues holds no LISTEN connection and reads no notification, its own included.

Notices (``wait_for_notices``: cancel requests and settlements, for workers and waiters) travel on a channel
of their own, which the connection listens to only from the first :meth:`Listener.listen_notices` on, so a
process that never asks for them (one that only enqueues) is not sent them. Each payload is a kind letter
(``c`` cancel, ``s`` settled) then a JSON array of task ids (see ``_functions.notice_query``). They are kept
in a bounded buffer until read; notices sent while the connection is down are lost (they are best effort:
the engine polls too).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from collections import deque
from collections.abc import Iterable
from typing import Any

import anyio
import psycopg
from psycopg import sql

from ...._redact import library_logger
from ..._records import Notice, new_notice

__all__ = ["Listener"]

_log = library_logger("lifecycle.asynctask.postgres")

#: A payload that wakes the waiters of every queue.
WAKE_ALL = "*"

_RECONNECT_FIRST = 0.05  # seconds: the ceiling of the first reconnect delay, doubled per failure
_RECONNECT_CAP = 2.0  # seconds: the longest reconnect delay (idle workers poll meanwhile)
_NOTICES_KEPT = 16_384  # notices kept until read (the oldest are dropped beyond: they are best effort)
_NOTICE_BATCH = 4096  # the most notices one next_notices() call returns
_KINDS = {"c": "cancel", "s": "settled"}


class Listener:
    """Holds a LISTEN connection on ``channel`` and counts notifications per queue (payload = queue name);
    from the first :meth:`listen_notices` on, it also listens on ``notice_channel`` and keeps the notices.

    Create it (it connects nothing yet), ``await start(timeout)`` when wake-ups are first needed, then read
    :meth:`generation` and wait on :meth:`changed`. ``close()`` stops the reader and closes the connection.
    """

    def __init__(
        self,
        conninfo: str,
        channel: str,
        *,
        connect_kwargs: dict[str, Any],
        notice_channel: str | None = None,
    ) -> None:
        self._conninfo = conninfo
        self._channel = channel
        self._notice_channel = notice_channel
        self._connect_kwargs = connect_kwargs
        self._per_queue: dict[str, int] = {}
        self._all = 0
        self._changed = anyio.Event()
        self._connection: psycopg.AsyncConnection[Any] | None = None
        self._reader: asyncio.Task[None] | None = None
        self._closed = False
        self._waiting: asyncio.Future[None] | None = None  # the reader's wait for the socket
        self._notices_wanted = False  # listen_notices() was called: LISTEN on the notice channel
        self._notices_on = False  # the current connection LISTENs on the notice channel
        self._notices: deque[Notice] = deque(maxlen=_NOTICES_KEPT)
        self._noticed = anyio.Event()  # set when notices arrive, the notice LISTEN starts, or on close
        self._attempted = anyio.Event()  # set once the reader's first attempt to connect ended (or on close)

    @property
    def connected(self) -> bool:
        """Whether the LISTEN connection is up (it is re-established in the background when it drops)."""
        connection = self._connection
        return connection is not None and not connection.closed

    def generation(self, queues: Iterable[str]) -> int:
        """A number that grows whenever work may have appeared in one of ``queues``."""
        return self._all + sum(self._per_queue.get(queue, 0) for queue in queues)

    def changed(self) -> anyio.Event:
        """An event set at the next notification of any queue (or reconnect); read it before checking."""
        return self._changed

    async def listen_notices(self, timeout: float) -> bool:
        """Listen on the notice channel from now on (the first call asks the reader to ``LISTEN``), waiting up
        to ``timeout`` seconds until it does; whether it does. While the connection is down this is false
        (the reader listens again once it is back)."""
        if self._notice_channel is None:
            return False
        if not self._notices_wanted:
            self._notices_wanted = True
            self._kick()
        with anyio.move_on_after(max(0.0, timeout)):
            while not self._notices_on and not self._closed:
                await self._noticed.wait()
        return self._notices_on

    async def next_notices(self, timeout: float) -> list[Notice]:
        """The notices received since the last call (oldest first, at most a few thousand), waiting up to
        ``timeout`` seconds for a first one; ``[]`` after the timeout."""
        with anyio.move_on_after(max(0.0, timeout)):
            while not self._notices and not self._closed:
                await self._noticed.wait()
        batch: list[Notice] = []
        while self._notices and len(batch) < _NOTICE_BATCH:
            batch.append(self._notices.popleft())
        return batch

    async def start(self, timeout: float) -> None:
        """Connect and LISTEN from now on (the first call starts the background reader, which connects and
        reconnects), waiting up to ``timeout`` seconds for its first attempt to connect. A failure is not
        raised: the reader keeps trying, and its first success wakes every waiter (see :meth:`changed`)."""
        if self._reader is None and not self._closed:
            self._reader = asyncio.get_running_loop().create_task(
                self._read(), name=f"LISTEN {self._channel}"
            )
        with anyio.move_on_after(max(0.0, timeout)):
            await self._attempted.wait()

    async def close(self) -> None:
        """Stop reading and close the connection. Idempotent."""
        self._closed = True
        self._set_noticed()
        self._attempted.set()
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
        connection, self._connection = self._connection, None
        if connection is not None:
            with contextlib.suppress(Exception):
                await connection.close()
        self._wake_all()

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        connection = await psycopg.AsyncConnection.connect(
            self._conninfo, autocommit=True, **self._connect_kwargs
        )
        # What psycopg reads while a statement runs on this connection (the LISTENs) comes through here.
        connection.add_notify_handler(lambda notify: self._dispatch(notify.channel, notify.payload))
        try:
            await connection.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self._channel)))
            if self._notices_wanted:
                await self._listen_to_notices(connection)
        except BaseException:
            await connection.close()
            raise
        return connection

    async def _listen_to_notices(self, connection: psycopg.AsyncConnection[Any]) -> None:
        assert self._notice_channel is not None
        await connection.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self._notice_channel)))
        self._notices_on = True
        self._set_noticed()

    def _kick(self) -> None:
        """Interrupt the reader's wait for the socket (it has something to do: a LISTEN)."""
        waiting = self._waiting
        if waiting is not None and not waiting.done():
            waiting.set_result(None)

    def _dispatch(self, channel: str, payload: str) -> None:
        if channel == self._channel:
            self._notified(payload)
        elif channel == self._notice_channel:
            self._received(payload)

    def _received(self, payload: str) -> None:
        """Keep the notices of one payload: a kind letter, then a JSON array of task ids."""
        kind = _KINDS.get(payload[:1])
        try:
            ids = json.loads(payload[1:])
        except ValueError:
            ids = None
        if kind is None or not isinstance(ids, list):
            _log.debug("ignored a notice payload that is not ours: %r", payload[:200])
            return
        notices = self._notices
        for task_id in ids:
            if type(task_id) is str:  # json.loads makes plain str
                notices.append(new_notice(kind, task_id))
        self._set_noticed()

    def _set_noticed(self) -> None:
        noticed, self._noticed = self._noticed, anyio.Event()
        noticed.set()

    def _notified(self, queue: str) -> None:
        if queue == WAKE_ALL:
            self._all += 1
        else:
            self._per_queue[queue] = self._per_queue.get(queue, 0) + 1
        self._set_changed()

    def _wake_all(self) -> None:
        self._all += 1
        self._set_changed()

    def _set_changed(self) -> None:
        changed, self._changed = self._changed, anyio.Event()
        changed.set()

    async def _read(self) -> None:
        failures = 0
        while not self._closed:
            connection = self._connection
            try:
                if connection is None:
                    connection = self._connection = await self._connect()
                    if self._attempted.is_set():
                        _log.info(
                            "LISTEN connection for %r is back after %d failed attempts",
                            self._channel,
                            failures,
                        )
                    failures = 0
                    self._wake_all()  # notifications sent while we were away are lost: look again
                    self._attempted.set()
                while True:
                    if self._notices_wanted and not self._notices_on:
                        await self._listen_to_notices(connection)
                    for channel, payload in await self._next_notifications(connection):
                        self._dispatch(channel, payload)
            except Exception as exc:
                failures += 1
                if failures == 1:
                    # A psycopg.Error is the expected case (server restart, network); anything else is a bug
                    # worth a traceback. Either way keep going: waiters fall back to polling meanwhile.
                    _log.warning(
                        "LISTEN connection for %r failed (%s); reconnecting in the background, idle workers "
                        "poll meanwhile",
                        self._channel,
                        exc,
                        exc_info=not isinstance(exc, psycopg.Error),
                    )
                self._notices_on = False
                if connection is not None:
                    self._connection = None
                    with contextlib.suppress(Exception):
                        await connection.close()
                self._wake_all()
                self._attempted.set()
                await asyncio.sleep(reconnect_delay(failures))

    async def _next_notifications(self, connection: psycopg.AsyncConnection[Any]) -> list[tuple[str, str]]:
        """Wait for the next notifications on a connection used for nothing else; return their ``(channel,
        payload)``, or nothing when :meth:`_kick` interrupted the wait.

        Lower level than ``connection.notifies()`` on purpose: psycopg's waits wake every 100 ms to poll,
        which would wake every idle worker ten times a second (and keeps ``anyio.wait_all_tasks_blocked`` from
        ever seeing it blocked). Here the task sleeps until the socket is readable. Raises
        :class:`psycopg.OperationalError` when the connection is lost.
        """
        pgconn = connection.pgconn
        encoding = connection.info.encoding
        loop = asyncio.get_running_loop()
        while True:
            pgconn.consume_input()
            notifications: list[tuple[str, str]] = []
            while (notify := pgconn.notifies()) is not None:
                notifications.append(
                    (notify.relname.decode(encoding, "replace"), notify.extra.decode(encoding, "replace"))
                )
            if notifications:
                return notifications
            if self._notices_wanted and not self._notices_on:
                return []  # a LISTEN to run first
            readable: asyncio.Future[None] = loop.create_future()
            fileno = pgconn.socket
            loop.add_reader(fileno, _set_once, readable)
            self._waiting = readable
            try:
                await readable
            finally:
                self._waiting = None
                loop.remove_reader(fileno)


def reconnect_delay(failures: int) -> float:
    """The pause before reconnect attempt ``failures`` (1-based): exponential with full jitter, capped at
    :data:`_RECONNECT_CAP`, so listeners of many workers do not reconnect in step after a server restart."""
    ceiling = min(_RECONNECT_CAP, _RECONNECT_FIRST * 2.0 ** min(max(failures, 1) - 1, 32))
    return random.uniform(0.0, ceiling)


def _set_once(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
