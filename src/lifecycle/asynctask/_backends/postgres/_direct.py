"""A hot statement run through libpq itself (psycopg's ``connection.pgconn``), for the single enqueue (see
:class:`DirectStatement`)."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any
from weakref import WeakKeyDictionary

import psycopg
from psycopg import pq

if TYPE_CHECKING:  # the protocols psycopg.pq's implementations follow, for the annotations only
    from psycopg.pq.abc import PGconn, PGresult

__all__ = ["DirectStatement", "numbered", "unwatch", "watched"]

Connection = psycopg.AsyncConnection[Any]

_logger = logging.getLogger("lifecycle.asynctask.postgres")

_TUPLES_OK = pq.ExecStatus.TUPLES_OK
_COMMAND_OK = pq.ExecStatus.COMMAND_OK
_IDLE = pq.TransactionStatus.IDLE
_SQLSTATE = pq.DiagnosticField.SQLSTATE
_ACTIVE = pq.TransactionStatus.ACTIVE
_OK = pq.ConnStatus.OK
# The session has no statement of that name (DEALLOCATE ALL, DISCARD ALL): it ran nothing.
_GONE = b"26000"
# The table changed under the prepared statement so that its plan would return another row type.
_STALE_PLAN = b"0A000"
_PLACEHOLDER = re.compile(rb"%(.)", re.DOTALL)


def numbered(query: bytes) -> tuple[bytes, int]:
    """``query`` written with psycopg's ``%s``/``%b`` placeholders (``%%`` a literal ``%``) as PostgreSQL's
    ``$1, $2, ...``, and how many there are. Raises ``ValueError`` for any other ``%`` sequence."""
    count = 0

    def number(match: re.Match[bytes]) -> bytes:
        nonlocal count
        kind = match.group(1)
        if kind == b"%":
            return b"%"
        if kind not in (b"s", b"b"):
            raise ValueError(f"unexpected placeholder {match.group(0)!r} in {query!r}")
        count += 1
        return b"$%d" % count

    return _PLACEHOLDER.sub(number, query), count


class DirectStatement:
    """One of the backend's statements, prepared on each of its connections that runs it and executed through
    libpq (psycopg's ``connection.pgconn``, documented as the way "to send low level commands to PostgreSQL")
    with parameters the caller has already put in PostgreSQL's binary format.

    Why: psycopg's ``cursor.execute`` spends about 45 µs of Python per call on the single enqueue's
    fourteen parameters and its machinery (the query's parse cache, the prepared-statement bookkeeping, one
    dumper per parameter, the result's row maker), as much as all the rest of the call. Here a call is one
    ``PQsendQueryPrepared``, a wait for the socket to be readable, and the reading of the result.

    What it keeps of psycopg's contract: the connection is the caller's alone for the call (a lease or a
    pooled checkout of the backend), idle and in autocommit, so the statement is a transaction of its own;
    libpq tracks the connection's state, which psycopg reads from it (``closed``, the transaction status
    the pool and the leases look at), and psycopg's notice handler on ``pgconn`` still receives the server's
    notices. What it leaves to psycopg: any error. A result that is not a success returns ``None``, and the
    caller runs the same statement again through psycopg, which raises the error as it always has (a failed
    statement in autocommit changed nothing). A connection failure raises psycopg's ``OperationalError``
    from libpq's wrapper, as psycopg does; a call interrupted while the statement runs asks the server to
    cancel it, as psycopg does (see :func:`_result`).

    The statement is prepared under ``name`` (with a digest of its text) on a connection's first call (one
    more round trip), again when the session lost it, and under a new name when its plan went stale.
    """

    def __init__(self, name: str, query: bytes, types: Sequence[int]) -> None:
        text, count = numbered(query)
        if count != len(types):
            raise ValueError(f"{name}: {count} placeholders but {len(types)} types")
        # The name carries a digest of the text: a session that has a statement of this name already (42P05:
        # prepared by this object, or by another backend object on a pooled server session, for another
        # schema) has this very text under it.
        self._name = b"%s_%s" % (name.encode(), hashlib.sha1(text).hexdigest()[:12].encode())
        self._query = text
        self._types = list(types)
        self._formats = [1] * len(types)  # every parameter in binary
        self._prepared: WeakKeyDictionary[Connection, bytes] = WeakKeyDictionary()
        self._renamed = 0  # how many times a stale plan (0A000) made a new name necessary

    def usable(self, connection: Connection) -> bool:
        """Whether ``connection`` can run the statement directly: idle, in autocommit, outside pipeline
        mode, and sending text in UTF-8 (what the caller's parameters are encoded in)."""
        pgconn = connection.pgconn
        return (
            connection.autocommit
            and pgconn.transaction_status == _IDLE
            and not pgconn.pipeline_status
            and pgconn.parameter_status(b"client_encoding") == b"UTF8"
        )

    async def run(self, connection: Connection, params: Sequence[bytes | None]) -> PGresult | None:
        """The statement's result on ``connection`` (see :meth:`usable`) with ``params`` (binary), or
        ``None`` when the server answered with an error (the caller then runs it through psycopg).

        A statement the session no longer has (26000: psycopg sends ``DEALLOCATE ALL`` after a rollback on a
        connection where it prepared statements of its own, and ``DISCARD ALL`` does the same) ran nothing:
        it is prepared again and run in the same call."""
        # Interrupted (a cancellation, a KeyboardInterrupt) while the server runs a command, the call asks the
        # server to cancel it and reads the outcome before it re-raises (see _interrupted).
        try:
            for _ in range(2):
                name = self._prepared.get(connection)
                if name is None:
                    name = self._name if not self._renamed else b"%s_%d" % (self._name, self._renamed)
                    _send(connection, connection.pgconn.send_prepare, name, self._query, self._types)
                    prepared = await _read(connection, _watch(connection))
                    if _failed(prepared, _COMMAND_OK) and _sqlstate(prepared) != b"42P05":
                        return None
                    self._prepared[connection] = name
                try:
                    connection.pgconn.send_query_prepared(name, params, self._formats)
                except BaseException:  # a failed write: libpq may have closed the socket
                    unwatch(connection)
                    raise
                result = await _read(connection, _watch(connection))
                if not _failed(result, _TUPLES_OK):
                    return result
                state = _sqlstate(result)
                if state == _GONE:
                    del self._prepared[connection]
                    continue
                if state == _STALE_PLAN:  # the table changed under the plan: a new statement, a new name
                    del self._prepared[connection]
                    self._renamed += 1
                return None
            return None
        except (asyncio.CancelledError, KeyboardInterrupt):
            await _interrupted(connection)
            raise


def _send(connection: Connection, send: Callable[..., None], *args: Any) -> None:
    try:
        send(*args)
    except BaseException:  # a failed write: libpq may have closed the socket
        unwatch(connection)
        raise


def _failed(result: PGresult | None, expected: pq.ExecStatus) -> bool:
    return result is None or result.status != expected


def _sqlstate(result: PGresult | None) -> bytes | None:
    return None if result is None else result.error_field(_SQLSTATE)


class _Watch:
    """The event loop's watch on the socket of a connection the direct statements run on, kept from one
    statement to the next (see :func:`watched`, :func:`unwatch`).

    Why: registering the socket with the event loop and removing it again for each statement (``add_reader``
    and ``remove_reader``: a selector key, an ``epoll_ctl`` each, and a ``KeyError`` raised and caught inside
    the selector) cost a single enqueue about 50 000 instructions of its client's 190 000, more than libpq's
    whole part in it. Kept, a statement costs one future.

    While a statement runs (``busy``), the socket's readiness reads what the server sent (``consume_input``)
    and wakes the waiting call once the whole result is in; the socket so never stays readable with nobody
    reading it. Between statements, the connection is idle: the server sent something unasked (it shuts down,
    or ended the session) or closed it, and the watch ends, so that the next call looks at the connection
    (:func:`watched` is false: the lease's check then reads the socket itself, and has the pool check it).

    Only one waiter on a socket: psycopg's own waits (``add_reader`` and ``remove_reader`` of the same socket)
    would take the registration over and leave it removed, so the watch is ended (:func:`unwatch`) before
    psycopg uses the connection or the connection goes back to the pool; and the watch ends whenever libpq
    may have closed the socket (a failed read or write), before anything else can reuse its number."""

    __slots__ = ("__weakref__", "busy", "fileno", "loop", "pgconn", "waiter", "watching")

    def __init__(self, pgconn: PGconn) -> None:
        self.pgconn = pgconn
        self.fileno = pgconn.socket
        self.loop = asyncio.get_running_loop()
        self.busy = False  # a statement of ours runs: what the server sends is its result
        self.waiter: asyncio.Future[None] | None = None
        self.loop.add_reader(self.fileno, self._readable)
        self.watching = True

    def stop(self) -> None:
        if self.watching:
            self.watching = False
            self.loop.remove_reader(self.fileno)

    def _readable(self) -> None:
        if not self.busy:  # idle: the server wrote unasked, or closed the connection
            self.stop()
            return
        waiter = self.waiter
        pgconn = self.pgconn
        try:
            pgconn.consume_input()
            if pgconn.is_busy():  # part of the result only: wait for the rest
                return
        except Exception as exc:  # the connection failed: libpq may have closed the socket
            self.stop()
            if waiter is not None:
                self.waiter = None
                if not waiter.done():
                    waiter.set_exception(exc)
            return
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                waiter.set_result(None)


_watches: WeakKeyDictionary[Connection, _Watch] = WeakKeyDictionary()


def watched(connection: Connection) -> bool:
    """Whether the event loop watches ``connection``'s socket for the direct statements (see :class:`_Watch`):
    then it has found nothing to read on it since the last statement, the check a lease needs before a
    call (see :func:`._leases.readable`)."""
    watch = _watches.get(connection)
    return watch is not None and watch.watching


def unwatch(connection: Connection) -> None:
    """End the event loop's watch on ``connection``'s socket, if any: before psycopg waits on it, or before
    the connection leaves the backend's hands (back to the pool)."""
    watch = _watches.pop(connection, None)
    if watch is not None:
        watch.stop()


def _watch(connection: Connection) -> _Watch:
    watch = _watches.get(connection)
    if watch is None or not watch.watching:
        watch = _watches[connection] = _Watch(connection.pgconn)
    return watch


def _forget_watches() -> None:
    # A forked child has other event loops, and no business with its parent's connections.
    _watches.clear()


if hasattr(os, "register_at_fork"):  # not on Windows, which has no fork()
    os.register_at_fork(after_in_child=_forget_watches)


async def _interrupted(connection: Connection) -> None:
    """After an interruption (a cancellation, a ``KeyboardInterrupt``) while the server runs a command on
    ``connection``: ask the server to cancel it and read the outcome, as psycopg's own wait does. The
    statement then usually rolls back rather than committing behind a caller that gave up on it, and the
    connection stays usable. Should that fail too, the connection stays active and the pool closes it."""
    if connection.pgconn.transaction_status == _ACTIVE:
        try:
            await _cancel(connection)
            await _read(connection, _watch(connection))
        except Exception as exc:  # the interruption is what the caller must see
            _logger.debug("could not cancel an interrupted statement (%s: %s)", type(exc).__name__, exc)


async def _cancel(connection: Connection) -> None:
    cancel_safe = getattr(connection, "cancel_safe", None)  # psycopg 3.2+; 3.1 has the blocking cancel()
    if cancel_safe is not None:
        await cancel_safe(timeout=5.0)
    else:
        await asyncio.to_thread(connection.cancel)


async def _read(connection: Connection, watch: _Watch) -> PGresult | None:
    """The first result of the command just sent on ``connection`` (the others read and dropped: a statement
    sends one), once all of them are in."""
    pgconn = watch.pgconn
    watch.busy = True
    try:
        while pgconn.flush():  # the socket's buffer is full (never for a short statement): wait for it
            await _writable(watch.loop, watch.fileno)
        first = None
        while True:
            # is_busy() parses what libpq has read already, without a system call: get_result() would block
            # the event loop while it is true. The reply is normally not in yet, so the first look at the
            # socket is a wait (the watch reads the reply) rather than a read that finds nothing.
            while pgconn.is_busy():
                if not watch.watching:  # ended by a failed read: the socket again (libpq raises without one)
                    watch.busy = False
                    watch = _watch(connection)
                    watch.busy = True
                waiter = watch.waiter = watch.loop.create_future()
                await waiter
            result = pgconn.get_result()
            if result is None:
                return first
            if first is None:
                first = result
    finally:
        watch.busy = False
        if pgconn.status != _OK:  # libpq may have closed the socket: never leave it registered
            unwatch(connection)


async def _writable(loop: asyncio.AbstractEventLoop, socket: int) -> None:
    """Wait until ``socket`` is writable."""
    ready = loop.create_future()
    loop.add_writer(socket, _wake, ready)
    try:
        await ready
    finally:
        loop.remove_writer(socket)


def _wake(ready: asyncio.Future[None]) -> None:
    # The socket may be reported again before the waiting coroutine resumes and stops watching it.
    if not ready.done():
        ready.set_result(None)
