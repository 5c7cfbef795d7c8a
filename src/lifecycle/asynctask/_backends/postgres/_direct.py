"""A hot statement run through libpq itself (psycopg's ``connection.pgconn``), for the single enqueue (see
:class:`DirectStatement`)."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any
from weakref import WeakKeyDictionary

import psycopg
from psycopg import pq

if TYPE_CHECKING:  # the protocols psycopg.pq's implementations follow, for the annotations only
    from psycopg.pq.abc import PGconn, PGresult

__all__ = ["DirectStatement", "numbered"]

Connection = psycopg.AsyncConnection[Any]

_logger = logging.getLogger("lifecycle.asynctask.postgres")

_TUPLES_OK = pq.ExecStatus.TUPLES_OK
_COMMAND_OK = pq.ExecStatus.COMMAND_OK
_IDLE = pq.TransactionStatus.IDLE
_SQLSTATE = pq.DiagnosticField.SQLSTATE
_ACTIVE = pq.TransactionStatus.ACTIVE
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
        for _ in range(2):
            name = self._prepared.get(connection)
            if name is None:
                name = self._name if not self._renamed else b"%s_%d" % (self._name, self._renamed)
                pgconn = connection.pgconn
                pgconn.send_prepare(name, self._query, self._types)
                prepared = await _result(connection)
                if _failed(prepared, _COMMAND_OK) and _sqlstate(prepared) != b"42P05":
                    return None
                self._prepared[connection] = name
            connection.pgconn.send_query_prepared(name, params, self._formats)
            result = await _result(connection)
            if not _failed(result, _TUPLES_OK):
                return result
            state = _sqlstate(result)
            if state == _GONE:
                del self._prepared[connection]
                continue
            if state == _STALE_PLAN:  # the table changed under the plan: a new statement, under a new name
                del self._prepared[connection]
                self._renamed += 1
            return None
        return None


def _failed(result: PGresult | None, expected: pq.ExecStatus) -> bool:
    return result is None or result.status != expected


def _sqlstate(result: PGresult | None) -> bytes | None:
    return None if result is None else result.error_field(_SQLSTATE)


async def _result(connection: Connection) -> PGresult | None:
    """The first result of the command just sent on ``connection`` (the others read and dropped: a statement
    sends one), once all of them are in.

    Interrupted (a cancellation, a ``KeyboardInterrupt``) while the server runs the command, it asks the
    server to cancel it and reads the outcome before it re-raises, as psycopg's own wait does: the statement
    then usually rolls back rather than committing behind a caller that gave up on it, and the connection
    stays usable. Should that fail too, the connection stays active and the pool closes it."""
    pgconn = connection.pgconn
    try:
        return await _read(pgconn)
    except (asyncio.CancelledError, KeyboardInterrupt):
        if pgconn.transaction_status == _ACTIVE:
            try:
                await _cancel(connection)
                await _read(pgconn)
            except Exception as exc:  # the interruption is what the caller must see
                _logger.debug("could not cancel an interrupted statement (%s: %s)", type(exc).__name__, exc)
        raise


async def _cancel(connection: Connection) -> None:
    cancel_safe = getattr(connection, "cancel_safe", None)  # psycopg 3.2+; 3.1 has the blocking cancel()
    if cancel_safe is not None:
        await cancel_safe(timeout=5.0)
    else:
        await asyncio.to_thread(connection.cancel)


async def _read(pgconn: PGconn) -> PGresult | None:
    socket = pgconn.socket
    while pgconn.flush():  # the socket's buffer is full (never for a short statement): wait until it drains
        await _ready(socket, write=True)
    first = None
    while True:
        # is_busy() parses what libpq has read already, without a system call: get_result() would block the
        # event loop while it is true. The reply is normally not in yet, so the first look at the socket is
        # a wait rather than a read that finds nothing.
        while pgconn.is_busy():
            await _ready(socket)
            pgconn.consume_input()
        result = pgconn.get_result()
        if result is None:
            return first
        if first is None:
            first = result


async def _ready(socket: int, *, write: bool = False) -> None:
    """Wait until ``socket`` is readable (or writable)."""
    loop = asyncio.get_running_loop()
    ready = loop.create_future()
    if write:
        loop.add_writer(socket, _wake, ready)
    else:
        loop.add_reader(socket, _wake, ready)
    try:
        await ready
    finally:
        if write:
            loop.remove_writer(socket)
        else:
            loop.remove_reader(socket)


def _wake(ready: asyncio.Future[None]) -> None:
    # The socket may be reported again before the waiting coroutine resumes and stops watching it.
    if not ready.done():
        ready.set_result(None)
