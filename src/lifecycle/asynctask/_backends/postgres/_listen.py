"""The LISTEN side of PostgresBackend's wake-ups: one dedicated connection per backend object.

Writers call ``pg_notify(channel, queue)`` inside the transaction that made work claimable, so the
notification is delivered exactly when (and only if) that transaction commits. The :class:`Listener` keeps a
counter per queue; ``wait_for_work`` remembers the counters of its queues and sleeps until they change. When
the connection drops (a server restart), the listener reconnects with backoff and bumps every counter, since
notifications sent meanwhile are lost: waiters then look at the table again.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Iterable
from typing import Any

import anyio
import psycopg
from psycopg import sql

from ...._redact import library_logger

__all__ = ["Listener"]

_log = library_logger("lifecycle.asynctask.postgres")

#: A payload that wakes the waiters of every queue.
WAKE_ALL = "*"

_RECONNECT_FIRST = 0.05  # seconds: the ceiling of the first reconnect delay, doubled per failure
_RECONNECT_CAP = 2.0  # seconds: the longest reconnect delay (idle workers poll meanwhile)


class Listener:
    """Holds a LISTEN connection on ``channel`` and counts notifications per queue (payload = queue name).

    Create it, ``await start()`` (raises the connection error when the first connect fails), then read
    :meth:`generation` and wait on :meth:`changed`. ``close()`` stops the reader and closes the connection.
    """

    def __init__(
        self,
        conninfo: str,
        channel: str,
        *,
        connect_kwargs: dict[str, Any],
    ) -> None:
        self._conninfo = conninfo
        self._channel = channel
        self._connect_kwargs = connect_kwargs
        self._per_queue: dict[str, int] = {}
        self._all = 0
        self._changed = anyio.Event()
        self._connection: psycopg.AsyncConnection[Any] | None = None
        self._reader: asyncio.Task[None] | None = None
        self._closed = False

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

    async def start(self) -> None:
        """Connect and LISTEN, then keep reading in a background task. Raises :class:`psycopg.Error`."""
        self._connection = await self._connect()
        self._reader = asyncio.get_running_loop().create_task(self._read(), name=f"LISTEN {self._channel}")

    async def close(self) -> None:
        """Stop reading and close the connection. Idempotent."""
        self._closed = True
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
        try:
            await connection.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self._channel)))
        except BaseException:
            await connection.close()
            raise
        return connection

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
                    _log.info(
                        "LISTEN connection for %r is back after %d failed attempts", self._channel, failures
                    )
                    failures = 0
                    self._wake_all()  # notifications sent while we were away are lost: look again
                while True:
                    for queue in await _next_notifications(connection):
                        self._notified(queue)
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
                if connection is not None:
                    self._connection = None
                    with contextlib.suppress(Exception):
                        await connection.close()
                self._wake_all()
                await asyncio.sleep(reconnect_delay(failures))


def reconnect_delay(failures: int) -> float:
    """The pause before reconnect attempt ``failures`` (1-based): exponential with full jitter, capped at
    :data:`_RECONNECT_CAP`, so listeners of many workers do not reconnect in step after a server restart."""
    ceiling = min(_RECONNECT_CAP, _RECONNECT_FIRST * 2.0 ** min(max(failures, 1) - 1, 32))
    return random.uniform(0.0, ceiling)


async def _next_notifications(connection: psycopg.AsyncConnection[Any]) -> list[str]:
    """Wait for the next notifications on a connection used for nothing else; return their payloads.

    Lower level than ``connection.notifies()`` on purpose: psycopg's waits wake every 100 ms to poll, which
    would wake every idle worker ten times a second (and keeps ``anyio.wait_all_tasks_blocked`` from ever
    seeing it blocked). Here the task sleeps until the socket is readable. Raises
    :class:`psycopg.OperationalError` when the connection is lost.
    """
    pgconn = connection.pgconn
    encoding = connection.info.encoding
    loop = asyncio.get_running_loop()
    while True:
        pgconn.consume_input()
        payloads: list[str] = []
        while (notify := pgconn.notifies()) is not None:
            payloads.append(notify.extra.decode(encoding, "replace"))
        if payloads:
            return payloads
        readable: asyncio.Future[None] = loop.create_future()
        fileno = pgconn.socket
        loop.add_reader(fileno, _set_once, readable)
        try:
            await readable
        finally:
            loop.remove_reader(fileno)


def _set_once(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
