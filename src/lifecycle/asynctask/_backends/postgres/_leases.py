"""Connections the backend keeps out of its pool for its own statements (see :class:`ConnectionLeases`)."""

from __future__ import annotations

import select
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import psycopg
from psycopg.pq import TransactionStatus
from psycopg.rows import TupleRow, tuple_row
from psycopg_pool import AsyncConnectionPool

from ._direct import unwatch, watched

__all__ = ["RENEW_AFTER", "Checkout", "ConnectionLeases", "readable"]

Connection = psycopg.AsyncConnection[Any]
Cursor = psycopg.AsyncCursor[TupleRow]

# A leased connection goes back to the pool at its first release after this many seconds, so that the pool's
# own policies (max_lifetime, drain) reach it, a minute late at most.
RENEW_AFTER = 60.0
_IDLE = TransactionStatus.IDLE


class ConnectionLeases:
    """Up to ``keep`` pooled connections held by the backend between its calls, handed out without the pool.

    A pool checkout costs a single enqueue a good share of its client CPU: psycopg_pool's lock and
    condition, its check callback, and the task ``take`` runs ``getconn`` in (so that a cancelled caller
    cannot make the pool lose a connection). A leased connection is taken from a plain list instead, checked
    as the pool's check would (:func:`readable`: nothing to do unless the server sent something or closed
    it; a lease whose socket the event loop watches for the single enqueue, see :func:`._direct.watched`,
    has been checked by the loop itself), and kept at its release only when it is clean: open, and idle
    outside any transaction. Anything else (a connection the server closed, a statement interrupted by
    cancellation, a caller's error inside a transaction) goes back to the pool, which resets or replaces it,
    as after a server restart before.
    Each lease keeps one cursor too, reused by the calls that take it (a new cursor, with its fresh
    adaptation context, costs a single enqueue about 10 µs).

    The leases are the first connections the backend's calls take; calls made while every lease is in use
    take a connection from the pool as before (``take(wait)``) and return it there. ``keep`` stays below the
    pool's size, so those calls always have a pooled connection to wait for: a lease never sits idle while a
    caller waits in the pool for a connection only a lease could give back. A lease goes back to the pool at
    its first release after ``renew_after`` seconds (default :data:`RENEW_AFTER`; so the pool's
    ``max_lifetime`` still applies).
    """

    def __init__(
        self,
        pool: AsyncConnectionPool[Connection],
        *,
        keep: int,
        take: Callable[[float | None], Awaitable[Connection]],
        renew_after: float | None = None,
    ) -> None:
        self._pool = pool
        self._keep = keep
        self._take = take
        self._renew_after = RENEW_AFTER if renew_after is None else renew_after
        self._idle: list[Connection] = []
        self._leased_at: dict[Connection, float] = {}  # every leased connection, idle or in use
        self._cursors: dict[Connection, Cursor] = {}  # the leases' cursors
        self._closed = False

    def connection(
        self,
        wait: float | None,
        *,
        first: Callable[[], Awaitable[None]] | None = None,
        direct: bool = False,
    ) -> Checkout:
        """``async with leases.connection(wait) as connection:`` a lease, or a pooled connection waited for
        at most ``wait`` seconds (``None``: the pool's timeout); ``first`` is awaited before one is taken.
        ``direct``: the caller runs the direct statements (see :mod:`._direct`), and ends the event loop's
        watch on the connection's socket itself before psycopg uses it; otherwise it is ended here."""
        return Checkout(self, wait, first, direct)

    def cursor(self, connection: Connection) -> Cursor:
        """A cursor of ``connection`` reading tuples: a lease's own (reused), or a new one."""
        cursor = self._cursors.get(connection)
        if cursor is None:
            cursor = connection.cursor(row_factory=tuple_row)
            if connection in self._leased_at:
                self._cursors[connection] = cursor
        return cursor

    def take_idle(self) -> Connection | None:
        """An idle lease whose socket the event loop watches (see :func:`._direct.watched`: the check is
        done), without awaiting anything; ``None``: :meth:`take` finds a connection, and checks it.

        The single enqueue's way to a connection (with :meth:`keep` and :meth:`give_back` at its end): the
        checkout's coroutines (``__aenter__``, :meth:`take`, ``__aexit__``) cost it a few thousand
        instructions for nothing to wait for."""
        idle = self._idle
        if idle and watched(idle[-1]) and not idle[-1].closed:
            return idle.pop()
        return None

    async def take(self, wait: float | None) -> Connection:
        """An idle lease that passes the check, or else a pooled connection (leased when fewer than ``keep``
        are)."""
        idle = self._idle
        while idle:
            connection = idle.pop()
            # A socket the event loop watches (see _direct.watched) had nothing to read at its last look.
            if not connection.closed and (watched(connection) or not readable(connection.pgconn.socket)):
                return connection
            # The server wrote to or closed it (a restart?): the pool checks it, and replaces it if broken.
            self._end(connection)
            await self.give_back(connection)
        connection = await self._take(wait)
        if not self._closed and len(self._leased_at) < self._keep:
            self._leased_at[connection] = time.monotonic()
        return connection

    def keep(self, connection: Connection) -> bool:
        """Keep ``connection`` for the next call if it is a clean lease; false: return it to the pool."""
        leased_at = self._leased_at.get(connection)
        if leased_at is None:
            return False
        if (
            not self._closed
            and connection.pgconn.transaction_status == _IDLE  # also false for a closed connection
            and time.monotonic() - leased_at < self._renew_after
        ):
            self._idle.append(connection)
            return True
        self._end(connection)
        return False

    def _end(self, connection: Connection) -> None:
        del self._leased_at[connection]
        self._cursors.pop(connection, None)

    async def give_back(self, connection: Connection) -> None:
        """Return ``connection`` to the pool (shielded: it must not be lost to a cancellation)."""
        unwatch(connection)  # the pool waits on it through psycopg
        with anyio.CancelScope(shield=True):
            await self._pool.putconn(connection)

    async def close(self) -> None:
        """Return the idle leases to the pool; the leases in use go back to it at their release."""
        self._closed = True
        idle, self._idle = self._idle, []
        for connection in idle:
            self._end(connection)
            await self.give_back(connection)


class Checkout:
    """What :meth:`ConnectionLeases.connection` returns: takes a connection on entry and keeps or returns it
    on exit (a plain class: a generator-based context manager costs a single enqueue a few microseconds)."""

    __slots__ = ("_connection", "_direct", "_first", "_leases", "_wait")

    def __init__(
        self,
        leases: ConnectionLeases,
        wait: float | None,
        first: Callable[[], Awaitable[None]] | None,
        direct: bool = False,
    ) -> None:
        self._leases = leases
        self._wait = wait
        self._first = first
        self._direct = direct

    async def __aenter__(self) -> Connection:
        if self._first is not None:
            await self._first()
        self._connection = connection = await self._leases.take(self._wait)
        if not self._direct:
            unwatch(connection)  # psycopg waits on it: the direct statements' watch must not be in its way
        return connection

    @property
    def cursor(self) -> Cursor:
        """A cursor of the connection taken (see :meth:`ConnectionLeases.cursor`)."""
        return self._leases.cursor(self._connection)

    async def __aexit__(self, *exc_info: object) -> None:
        connection = self._connection
        if not self._leases.keep(connection):
            await self._leases.give_back(connection)


def readable(fileno: int) -> bool:
    """Whether the socket ``fileno`` has data or an end of stream to read, without waiting."""
    if hasattr(select, "poll"):  # any descriptor number (select() is limited to FD_SETSIZE)
        poller = select.poll()
        poller.register(fileno, select.POLLIN)
        return bool(poller.poll(0))
    readable_now, _, _ = select.select([fileno], [], [], 0)  # Windows: sockets only, no FD_SETSIZE limit
    return bool(readable_now)
