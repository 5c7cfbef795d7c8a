"""A hot statement run through libpq itself (psycopg's ``connection.pgconn``), for the single enqueue (see
:class:`DirectStatement`)."""

from __future__ import annotations

import asyncio
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

_TUPLES_OK = pq.ExecStatus.TUPLES_OK
_COMMAND_OK = pq.ExecStatus.COMMAND_OK
_IDLE = pq.TransactionStatus.IDLE
_SQLSTATE = pq.DiagnosticField.SQLSTATE
# The errors that say the prepared statement itself is gone or stale: it was deallocated (DEALLOCATE ALL,
# DISCARD ALL), or the table changed under it so that its plan would return another row type.
_STALE = (b"26000", b"0A000")
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
    from libpq's wrapper, as psycopg does; a call interrupted while the statement runs leaves the connection
    active, and the backend's checkout then returns it to the pool, which closes it.

    The statement is prepared under ``name`` on a connection's first call (one more round trip), and again
    under a new name after an error saying that the server no longer has it or that it is stale.
    """

    def __init__(self, name: str, query: bytes, types: Sequence[int]) -> None:
        text, count = numbered(query)
        if count != len(types):
            raise ValueError(f"{name}: {count} placeholders but {len(types)} types")
        self._name = name.encode()
        self._query = text
        self._types = list(types)
        self._formats = [1] * len(types)  # every parameter in binary
        self._prepared: WeakKeyDictionary[Connection, bytes] = WeakKeyDictionary()
        self._renamed = 0  # how many times a stale statement made a new name necessary

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
        ``None`` when the server answered with an error (the caller then runs it through psycopg)."""
        pgconn = connection.pgconn
        name = self._prepared.get(connection)
        if name is None:
            name = self._name if not self._renamed else b"%s_%d" % (self._name, self._renamed)
            pgconn.send_prepare(name, self._query, self._types)
            prepared = await _result(pgconn)
            # A statement of that name on the session already (42P05) is this one: only this object names
            # its statements so on the backend's connections.
            if _failed(prepared, _COMMAND_OK) and _sqlstate(prepared) != b"42P05":
                return None
            self._prepared[connection] = name
        pgconn.send_query_prepared(name, params, self._formats)
        result = await _result(pgconn)
        if _failed(result, _TUPLES_OK):
            if _sqlstate(result) in _STALE:
                del self._prepared[connection]  # the next call prepares it again, under a new name
                self._renamed += 1
            return None
        return result


def _failed(result: PGresult | None, expected: pq.ExecStatus) -> bool:
    return result is None or result.status != expected


def _sqlstate(result: PGresult | None) -> bytes | None:
    return None if result is None else result.error_field(_SQLSTATE)


async def _result(pgconn: PGconn) -> PGresult | None:
    """The first result of the command sent on ``pgconn`` (the others read and dropped: a statement sends
    one), once all of them are in."""
    socket = pgconn.socket
    while pgconn.flush():  # the socket's buffer is full (never for a short statement): wait until it drains
        await _ready(socket, write=True)
    # is_busy() parses what libpq has read already, without a system call: the reply is normally not in yet,
    # so the first look at the socket is a wait rather than a read that finds nothing.
    while pgconn.is_busy():
        await _ready(socket)
        pgconn.consume_input()
    first = pgconn.get_result()
    while pgconn.get_result() is not None:
        pass
    return first


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
