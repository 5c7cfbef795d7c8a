"""PostgresBackend: durable tasks in a PostgreSQL database you already operate (extra ``postgres``).

Install with ``pip install "anyio-lifecycle[postgres]"`` (psycopg 3 and psycopg-pool). asyncio only.
"""

from __future__ import annotations

import asyncio
import functools
import math
import time
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from datetime import timedelta
from typing import Any, Literal, TypeVar

import anyio

from ..._extras import raise_missing_extra

try:
    import psycopg
    import psycopg.conninfo
    import psycopg.errors
    import psycopg_pool
    from psycopg.adapt import PyFormat
    from psycopg.pq import TransactionStatus
    from psycopg.types.array import ListBinaryDumper
    from psycopg_pool import AsyncConnectionPool
except ModuleNotFoundError as exc:  # the extra is not installed: say which, and how to install it
    raise_missing_extra(exc, "postgres")

from ...._checks import check_count, check_name, check_seconds
from ...._redact import library_logger, redact
from ..._backend import Create, check_create
from ..._errors import BackendError, StoreNotFoundError
from ..._records import (
    ClaimedTask,
    FlowLimits,
    FlowState,
    GroupRecord,
    NewGroup,
    NewTask,
    Notice,
    ProgressUpdate,
    Settlement,
    TaskRecord,
    TaskState,
)
from .._asyncio_only import require_asyncio
from . import _ops as ops
from ._arrays import register as register_arrays
from ._direct import DirectStatement
from ._leases import Checkout, ConnectionLeases, readable
from ._listen import Listener
from ._schema import MAX_IDENTIFIER, ensure_schema
from ._sql import INSERT_ONE_TYPES, Statements

__all__ = ["PostgresBackend"]

_log = library_logger("lifecycle.asynctask.postgres")

_T = TypeVar("_T")

_CLAIM_WAIT = 1.0  # seconds a claim waits for a pooled connection
_LEASES = 4  # connections kept leased (ConnectionLeases): a worker's claims, settlements, heartbeats, wait
_APPLICATION_NAME = "lifecycle-asynctask"


def _safe_dsn(dsn: str) -> str:
    """The DSN as given with its passwords masked, for messages, logs and ``repr``."""
    return redact(dsn, dsn) or "(libpq defaults)"


class PostgresBackend:
    """Stores tasks in PostgreSQL through psycopg 3 (asyncio), with a connection pool.

    Any number of worker processes, on any number of hosts, may share one database and schema (each with its
    own ``PostgresBackend``). Claims lock rows with ``FOR UPDATE SKIP LOCKED``, so concurrent workers never
    take the same task and never wait for each other; an enqueue wakes idle workers at once through
    ``LISTEN``/``NOTIFY``. Every state change is one transaction: a task is stored once
    :meth:`enqueue_many` returns, and survives any crash of the server with PostgreSQL's usual durability
    (``synchronous_commit`` and replication settings of your server apply). Flow control (priorities,
    paused queues, rate and concurrency limits, expiry, uniqueness windows, debounce) is enforced in the
    claim's and the enqueue's transaction, so it holds across every process; the claims are PL/pgSQL
    functions the schema migration creates (see docs/backends.md).

    It is a :class:`~lifecycle.asynctask.NotifyingBackend`: ``cancel()`` of a running task and every
    settlement send a notice by ``NOTIFY`` when they commit, so a cancelled task stops, and ``wait()`` in
    another process wakes, within milliseconds. A group's ``then`` is stored exactly once, by the transaction
    of its last member's success, under the group's row lock (see :meth:`settle`).

    Args:
        dsn: a libpq connection string or URL, such as ``"postgresql://app@db.internal:5432/app"`` or
            ``"host=db.internal dbname=app user=app"`` (passwords, TLS and the rest as libpq accepts them,
            including ``PGPASSWORD``/``~/.pgpass``).
        schema: the PostgreSQL schema that holds the backend's tables (created when missing, see
            :meth:`open`). Use one schema per application; two applications on one database keep apart by
            schema.
        pool_size: the most pooled connections this object opens (one more is kept for ``LISTEN``). A worker
            uses up to four at once: claims, settlements, heartbeats and its wait. Up to four of them (never
            all: at most ``pool_size - 1``) stay leased between calls, so that a call does not go through the
            pool's checkout.
        connect_timeout: how long :meth:`open`, and any call that needs a new connection, waits for the
            server before giving up (seconds). A claim waits at most 1 s for a pooled connection: the
            worker claims again anyway, and a worker asked to stop is not held up.
        poll_interval: how long an idle worker waits at most before it looks at the table again, in case a
            notification was missed (seconds). Notifications normally wake it at once.

    The schema is created and migrated by :meth:`open` (versioned; a schema written by a newer version is
    refused; ``open(create=...)`` says whether it may create it). After a server restart the pool replaces
    broken connections and the ``LISTEN`` connection reconnects in the background; calls made while the
    server is down raise :class:`psycopg.OperationalError`.

    :meth:`enqueue_many_in` joins a transaction of your own connection (the transactional outbox).

    Raises :class:`BackendError` from :meth:`open` under trio (psycopg's async support needs asyncio), when
    the server cannot be reached, or when the schema holds a newer or foreign layout.

    Example::

        backend = PostgresBackend("postgresql://app@127.0.0.1/app", schema="app_tasks")
        tasks = AsyncTasks(backend)
    """

    def __init__(
        self,
        dsn: str,
        *,
        schema: str = "lifecycle",
        pool_size: int = 5,
        connect_timeout: float | timedelta = 10.0,
        poll_interval: float | timedelta = 1.0,
    ) -> None:
        if not isinstance(dsn, str):
            raise TypeError(f"PostgresBackend(dsn) takes a connection string, got {type(dsn).__name__}")
        try:
            params = psycopg.conninfo.conninfo_to_dict(dsn)
        except psycopg.ProgrammingError as exc:
            raise ValueError(
                f"PostgresBackend: cannot parse the connection string {_safe_dsn(dsn)!r}: "
                f"{redact(str(exc).strip(), dsn)}; give a URL such as "
                '"postgresql://user@host:5432/dbname" (percent-encode special characters such as @ : / [ ] '
                'in the user name and password) or "host=... dbname=... user=..." (put a value with spaces '
                "in single quotes)"
            ) from None
        check_name(schema, "PostgresBackend(schema=...)")
        if len(schema.encode()) > MAX_IDENTIFIER:
            raise ValueError(
                f"schema {schema!r} is longer than PostgreSQL's {MAX_IDENTIFIER}-byte limit for names; "
                "choose a shorter schema name"
            )
        self._dsn = dsn
        self._schema = schema
        self._pool_size = check_count(pool_size, "PostgresBackend(pool_size=...)", minimum=1)
        self._connect_timeout = check_seconds(connect_timeout, "PostgresBackend(connect_timeout=...)")
        self._poll_interval = check_seconds(poll_interval, "PostgresBackend(poll_interval=...)")
        self._connect_kwargs: dict[str, Any] = {}
        if "application_name" not in params:
            self._connect_kwargs["application_name"] = _APPLICATION_NAME
        if "connect_timeout" not in params:  # libpq's own limit for each connection attempt
            self._connect_kwargs["connect_timeout"] = max(2, math.ceil(self._connect_timeout))
        self._statements = Statements.for_schema(schema)
        # The single enqueue's statement, run through libpq on the backend's own connections (see _direct);
        # none for a schema whose name has a "%" psycopg would read as a placeholder (its path fails then).
        try:
            self._insert_one: DirectStatement | None = DirectStatement(
                "lifecycle_insert_one", self._statements.insert_one, INSERT_ONE_TYPES
            )
            self._insert_one_new: DirectStatement | None = DirectStatement(
                "lifecycle_insert_one_new", self._statements.insert_one_new, INSERT_ONE_TYPES
            )
        except ValueError:
            self._insert_one = self._insert_one_new = None
        self._pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]] | None = None
        self._leases: ConnectionLeases | None = None
        self._listener: Listener | None = None
        self._reported: tuple[object, ...] | None = None  # what wait_for_work last returned for
        self._abandoned: set[asyncio.Future[Any]] = set()  # connection waits a cancelled caller left
        self._absent = False  # open, but no tables yet: opened with create="on_enqueue"
        # The names the last claim limited by max_running or max_running_per_key: a settlement of one of their
        # tasks notifies its queue, since the slot it frees may let a task held back elsewhere start.
        self._slot_names: tuple[str, ...] = ()

    @property
    def schema(self) -> str:
        """The PostgreSQL schema holding this backend's tables."""
        return self._schema

    @property
    def channel(self) -> str:
        """The ``NOTIFY`` channel writers signal new work on (payload: the queue name)."""
        return self._statements.channel

    @property
    def notice_channel(self) -> str:
        """The ``NOTIFY`` channel of the notices (cancel requests and settlements, see
        :meth:`wait_for_notices`; payload: ``c`` or ``s`` then a JSON array of task ids)."""
        return self._statements.notice_channel

    @property
    def listening(self) -> bool:
        """Whether the ``LISTEN`` connection is up. It is opened by the first :meth:`wait_for_work` or
        :meth:`wait_for_notices` (false until then: an enqueue-only process does not listen). While it is
        down (a server restart), it reconnects in the background and idle workers look at the table every
        ``poll_interval``."""
        listener = self._listener
        return listener is not None and listener.connected

    @property
    def poll_interval(self) -> float:
        """The longest an idle worker waits before looking at the table again (seconds)."""
        return self._poll_interval

    def __repr__(self) -> str:
        return f"PostgresBackend({_safe_dsn(self._dsn)!r}, schema={self._schema!r})"

    # -- connection ---------------------------------------------------------------------------------------

    async def open(self, *, create: Create = True) -> None:
        """Connect, create or migrate the schema. Calling it again does nothing. The ``LISTEN`` connection is
        opened later, by the first call that waits for wake-ups or notices (:meth:`wait_for_work`,
        :meth:`wait_for_notices`): a process that only enqueues opens none.

        ``create=False`` creates nothing: it raises :class:`BackendError` when the schema holds no task
        tables (what the ``lifecycle tasks`` commands use). ``create="on_enqueue"`` (what
        ``AsyncTasks(..., execution=False)`` uses) leaves missing tables missing until the first enqueue
        (or claim) creates them; until then reads find no tasks and ``cancel``/``requeue``/``purge`` change
        nothing.

        Raises :class:`BackendError` under trio, when the server cannot be reached within
        ``connect_timeout``, or for a schema written by a newer version.
        """
        create = check_create(create)
        if self._pool is not None:
            return
        require_asyncio("PostgresBackend", "psycopg's async support is asyncio-only")
        listener = Listener(
            self._dsn,
            self.channel,
            connect_kwargs=self._connect_kwargs,
            notice_channel=self._statements.notice_channel,
        )
        pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]] = AsyncConnectionPool(
            self._dsn,
            kwargs={"autocommit": True, **self._connect_kwargs},
            min_size=1,
            max_size=self._pool_size,
            open=False,
            # A liveness check when a connection leaves the pool, so that after a server restart the broken
            # idle connections are replaced instead of failing the caller; a round trip only when the
            # socket says the server sent or closed something (see _check_if_signalled).
            check=_check_if_signalled,
            timeout=self._connect_timeout,
            name=f"lifecycle-{self._schema}",
            configure=_configure,
        )
        try:
            with anyio.fail_after(self._connect_timeout):
                # A connection of its own first, so that a bad DSN or missing rights fail here, clearly.
                stored = await self._prepare_schema(create=create is True)
                if not stored and create is False:
                    raise StoreNotFoundError(
                        f"there are no task tables in PostgreSQL schema {self._schema!r} at "
                        f"{_safe_dsn(self._dsn)}; check the schema name (?schema=NAME in a URL) and the "
                        "database, or start a worker, which creates them"
                    )
                await pool.open(wait=True, timeout=self._connect_timeout)
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                await listener.close()
                await pool.close()
            if isinstance(exc, (TimeoutError, psycopg_pool.PoolTimeout)):
                raise BackendError(
                    f"cannot connect to PostgreSQL at {_safe_dsn(self._dsn)} within {self._connect_timeout} "
                    "s; check that the server runs and accepts connections, or raise connect_timeout"
                ) from None
            if isinstance(exc, psycopg.OperationalError):
                raise BackendError(
                    f"cannot connect to PostgreSQL at {_safe_dsn(self._dsn)}: "
                    f"{redact(str(exc).strip(), self._dsn)}; check the host, port, database name, user and "
                    "password of the DSN"
                ) from exc
            if isinstance(exc, psycopg.Error):
                raise BackendError(
                    f"cannot create or migrate the task tables in schema {self._schema!r}: "
                    f"{redact(str(exc).strip(), self._dsn)}; grant this user the right to create the schema "
                    "and its tables, or open the backend once as a user who has it"
                ) from exc
            raise
        self._pool, self._listener = pool, listener
        # Fewer leases than pooled connections: a call that finds every lease in use waits for the pool.
        self._leases = ConnectionLeases(
            pool, keep=min(_LEASES, self._pool_size - 1), take=functools.partial(self._take, pool)
        )
        self._absent = not stored

    async def _prepare_schema(self, *, create: bool) -> int:
        """Check (and with ``create``, create or migrate) the tables; their layout version, 0 if none."""
        connection = await psycopg.AsyncConnection.connect(self._dsn, autocommit=True, **self._connect_kwargs)
        try:
            return await ensure_schema(connection, self._schema, create=create)
        finally:
            await connection.close()

    async def _create_tables(self) -> None:
        """Create the tables of a backend opened with ``create="on_enqueue"`` (its first write)."""
        try:
            with anyio.fail_after(self._connect_timeout):
                await self._prepare_schema(create=True)
        except TimeoutError:
            raise psycopg.OperationalError(
                f"cannot connect to PostgreSQL at {_safe_dsn(self._dsn)} within {self._connect_timeout} s "
                f"to create the task tables in schema {self._schema!r}"
            ) from None
        except psycopg.OperationalError:
            raise
        except psycopg.Error as exc:
            raise BackendError(
                f"cannot create the task tables in schema {self._schema!r}: {str(exc).strip()}; grant this "
                "user the right to create the schema and its tables, or start a worker as a user who has it"
            ) from exc
        self._absent = False

    async def close(self) -> None:
        """Stop listening and close every connection. Idempotent."""
        self._absent = False
        pool, self._pool = self._pool, None
        leases, self._leases = self._leases, None
        listener, self._listener = self._listener, None
        with anyio.CancelScope(shield=True):
            if listener is not None:
                await listener.close()
            if leases is not None:
                await leases.close()
            if pool is not None:
                await pool.close()
            # Connection waits abandoned by cancelled callers end once the pool is closed: let them (a
            # connection check stuck on a silent server is left behind after connect_timeout).
            with anyio.move_on_after(self._connect_timeout):
                while self._abandoned:
                    await asyncio.gather(*self._abandoned, return_exceptions=True)

    def _connection(
        self, *, wait: float | None = None, create: bool = True, direct: bool = False
    ) -> Checkout:
        """``async with`` a leased or pooled connection (see :class:`ConnectionLeases`); ``wait`` bounds the
        wait for a pooled one (default: ``connect_timeout``). Tables that do not exist yet (opened with
        ``create="on_enqueue"``) are created first, unless ``create`` is false (inspection and operator
        actions, see :meth:`_inspect`)."""
        leases = self._leases
        if leases is None:
            raise BackendError(
                f"{self!r} is not open: call `await backend.open()` first (AsyncTasks does it in initialize)"
            )
        if self._absent and create:
            return leases.connection(wait, first=self._create_tables, direct=direct)
        return leases.connection(wait, direct=direct)

    async def _take(
        self, pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]], wait: float | None
    ) -> psycopg.AsyncConnection[Any]:
        """A connection from ``pool``, waiting at most ``wait`` seconds; the wait is cancellable.

        psycopg_pool is not written for anyio's cancel scopes, which cancel every await until the scope is
        left: interrupted in its connection check it can lose track of a connection, so the pool shrinks
        for good. So ``getconn`` runs to its end in a task of its own, and a caller cancelled meanwhile
        (a shutdown that stops waiting for a server that is down) leaves at once: the connection, when it
        comes, goes back to the pool.
        """
        taking = asyncio.ensure_future(pool.getconn(timeout=wait))
        try:
            return await asyncio.shield(taking)
        except BaseException:
            self._abandoned.add(taking)
            taking.add_done_callback(functools.partial(self._give_back, pool))
            raise

    def _give_back(
        self,
        pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]],
        taking: asyncio.Future[psycopg.AsyncConnection[Any]],
    ) -> None:
        """Return the connection of an abandoned :meth:`_take` to ``pool`` (or drop its error)."""
        self._abandoned.discard(taking)
        if taking.cancelled() or taking.exception() is not None:
            return  # the pool timed out or closed: nothing was taken
        returning = asyncio.ensure_future(pool.putconn(taking.result()))
        self._abandoned.add(returning)
        returning.add_done_callback(self._returned)

    def _returned(self, returning: asyncio.Future[None]) -> None:
        self._abandoned.discard(returning)
        if not returning.cancelled() and returning.exception() is not None:
            _log.debug("could not return a connection to the pool: %s", returning.exception())

    # -- the Backend protocol -----------------------------------------------------------------------------

    async def enqueue_many(
        self, tasks: Sequence[NewTask], *, if_exists: Literal["error", "skip", "debounce"] = "error"
    ) -> list[str]:
        """Store ``tasks`` in one committed transaction and notify waiting workers; see
        :meth:`Backend.enqueue_many` (uniqueness windows and debounce included: the records and windows
        concerned are locked in that transaction)."""
        _check_if_exists(if_exists)
        if not tasks:
            return []
        leases = self._leases
        # A lease the last enqueue left watched, taken as the checkout would, without its coroutines.
        connection = leases.take_idle() if leases is not None and not self._absent else None
        if connection is not None:
            assert leases is not None
            try:
                return await ops.enqueue(
                    connection,
                    self._statements,
                    tasks,
                    if_exists,
                    pooled=True,
                    cursor=leases.cursor(connection),
                    insert_one=self._insert_one,
                    insert_one_new=self._insert_one_new,
                )
            finally:
                if not leases.keep(connection):
                    await leases.give_back(connection)
        checkout = self._connection(direct=True)  # ops.enqueue ends the socket's watch before psycopg's use
        async with checkout as connection:
            return await ops.enqueue(
                connection,
                self._statements,
                tasks,
                if_exists,
                pooled=True,
                cursor=checkout.cursor,
                insert_one=self._insert_one,
                insert_one_new=self._insert_one_new,
            )

    async def enqueue_many_in(
        self,
        connection: object,
        tasks: Sequence[NewTask],
        *,
        if_exists: Literal["error", "skip", "debounce"] = "error",
    ) -> list[str]:
        """Store ``tasks`` inside the caller's transaction on ``connection`` (the transactional outbox).

        ``connection`` is your ``psycopg.AsyncConnection`` to the same database. On a connection that is
        not in autocommit mode (psycopg's default) the call joins the open transaction, or starts it as any
        statement would; inside ``async with conn.transaction():`` it joins that block. The tasks are written
        in a savepoint of that transaction and become visible, and wake workers, only when it commits; a
        rollback removes them. On a connection in autocommit mode outside a transaction block there is no
        transaction to join: the tasks are committed at once. Raises :class:`DuplicateTaskError` like
        :meth:`enqueue_many` (your transaction stays usable: only the savepoint is rolled back), and
        :class:`BackendError` when the backend's tables do not exist yet (open a ``PostgresBackend`` over
        this database once first). This backend object need not be open.

        Example::

            async with await psycopg.AsyncConnection.connect(dsn) as conn:
                async with conn.transaction():
                    await conn.execute("INSERT INTO orders ...")
                    await backend.enqueue_many_in(conn, [task])
        """
        _check_if_exists(if_exists)
        joined = await self._join(connection, "enqueue_many_in", start=bool(tasks))
        if not tasks:
            return []
        return await self._in_callers_transaction(
            lambda: ops.enqueue(joined, self._statements, tasks, if_exists)
        )

    async def enqueue_group_in(self, connection: object, group: NewGroup) -> str:
        """Store ``group`` and its members inside the caller's transaction on ``connection``, as
        :meth:`enqueue_many_in` stores tasks (the transactional outbox for a group): the group exists, and
        its members wake workers, only if that transaction commits. Raises :class:`DuplicateTaskError` like
        :meth:`enqueue_group` (only the savepoint is rolled back), ``TypeError`` for a connection that is not
        a ``psycopg.AsyncConnection``, and :class:`BackendError` when the tables do not exist yet.

        Example::

            async with conn.transaction():
                await conn.execute("INSERT INTO albums ...")
                await backend.enqueue_group_in(conn, group)
        """
        joined = await self._join(connection, "enqueue_group_in", start=True)
        return await self._in_callers_transaction(lambda: ops.enqueue_group(joined, self._statements, group))

    async def _join(self, connection: object, what: str, *, start: bool) -> psycopg.AsyncConnection[Any]:
        """The caller's connection, checked; with ``start``, its transaction started if none is open (see
        :meth:`enqueue_many_in`)."""
        if not isinstance(connection, psycopg.AsyncConnection):
            raise TypeError(
                f"PostgresBackend.{what}() needs a psycopg.AsyncConnection to the task database, "
                f"got {type(connection).__name__}"
            )
        idle = connection.info.transaction_status == TransactionStatus.IDLE
        if start and idle and not connection.autocommit:
            # No statement ran yet: start the caller's transaction the way psycopg would on a first
            # execute. (A transaction block opened on an idle connection would commit on its own.)
            await connection.execute("SELECT 1")
        return connection

    async def _in_callers_transaction(self, write: Callable[[], Awaitable[_T]]) -> _T:
        """Run ``write`` (a savepoint of the caller's transaction); while the tables are missing on a backend
        opened with ``create="on_enqueue"``, create them on a connection of our own and write again."""
        try:
            return await write()
        except psycopg.errors.UndefinedTable as exc:
            if not (self._absent and self._pool is not None):
                raise BackendError(
                    f"the task tables of schema {self._schema!r} do not exist in this database: open this "
                    "PostgresBackend first (an AsyncTasks opens it in initialize; it creates the tables "
                    "then, or at its first enqueue when execution=False)"
                ) from exc
        # Opened with create="on_enqueue" and no tables yet: only the savepoint was rolled back.
        await self._create_tables()
        return await write()

    async def claim(
        self,
        queues: Sequence[str],
        limit: int,
        *,
        now: float,
        lease_until: float,
        limits: Mapping[str, FlowLimits] | None = None,
    ) -> list[ClaimedTask]:
        """Lease up to ``limit`` due tasks, ``queues`` in priority order (paused queues skipped, the highest
        task priority first), and cancel the due tasks that expired; see :meth:`Backend.claim`.

        Without ``limits`` this is one statement that locks the rows it takes with ``FOR UPDATE SKIP
        LOCKED``. With ``limits``, one transaction takes an advisory lock per limited name that has pending
        tasks (claimers of one name take turns; names without limits are not held up) and then counts, refills
        and leases in one statement, so the limits hold across every process. Raises :class:`ValueError` for a
        rate limit without a positive period."""
        if limit <= 0 or not queues:
            return []
        if limits:
            self._slot_names = tuple(
                sorted(
                    name
                    for name, flow in limits.items()
                    if flow.max_running is not None or flow.max_running_per_key is not None
                )
            )
        # The worker claims again soon anyway, so a claim does not wait long for a connection: while the
        # server is down it fails after _CLAIM_WAIT, and a worker asked to stop is not held up by it.
        checkout = self._connection(wait=min(self._connect_timeout, _CLAIM_WAIT))
        async with checkout as connection:
            return await ops.claim(
                connection,
                self._statements,
                list(dict.fromkeys(queues)),
                limit,
                now,
                lease_until,
                limits,
                cursor=checkout.cursor,
            )

    async def extend_leases(self, leases: Sequence[tuple[str, str]], *, lease_until: float) -> set[str]:
        """Renew held leases in one statement; return the ids whose lease was lost."""
        if not leases:
            return set()
        checkout = self._connection()
        async with checkout as connection:
            return await ops.extend_leases(
                connection, self._statements, leases, lease_until, cursor=checkout.cursor
            )

    async def settle(self, settlements: Sequence[Settlement]) -> set[str]:
        """Apply every settlement whose lease is held, with its ``then`` tasks (and a debounce's follow-up
        run, which becomes the record's next pending period), in one statement; return the ids not applied
        (a repeat of a task's settlement in the batch is not applied).

        The same statement does the group bookkeeping of the members it settled: the groups are locked in id
        order, each member is counted once, and the success that brings a group's count of members not yet
        succeeded to zero stores its ``then`` (a dead or cancelled member decides a group's outcome
        instead); and it sends one ``"settled"`` notice ``NOTIFY`` for the batch. ``then_groups`` are stored
        in the same transaction."""
        if not settlements:
            return set()
        checkout = self._connection()
        async with checkout as connection:
            return await ops.settle(
                connection, self._statements, settlements, self._slot_names, cursor=checkout.cursor
            )

    async def reclaim_expired(self, *, now: float, lease_until: float, limit: int) -> list[ClaimedTask]:
        """Take over active tasks whose lease ended before ``now``, attempts unchanged, and the damaged
        records no claim can select; see :meth:`Backend.reclaim_expired`."""
        if limit <= 0:
            return []
        async with self._connection() as connection:
            return await ops.reclaim_expired(connection, self._statements, now, lease_until, limit)

    async def wait_for_work(self, queues: Sequence[str], *, timeout: float) -> None:
        """Return when a task in ``queues`` was enqueued or released (a notification), when the earliest
        delayed task becomes due, or after ``timeout`` (seconds). Paused queues are left out; ``resume``
        notifies, and so does the settlement of a task whose name the last claim limited by ``max_running``
        or ``max_running_per_key`` (its slot may let a held task start). Tasks a rate limit holds back wake
        nobody: the engine passes a ``timeout`` no longer than one token's refill time.

        A task already due is reported once: while nothing changes, later calls wait instead of returning
        at once, so a caller that cannot claim it yet does not spin. Without notifications (the ``LISTEN``
        connection is reconnecting, or rows were written by hand) the table is checked every
        ``poll_interval``. A failure to reach the server is not raised here (the caller's next claim
        reports it): the call then waits like an idle one.
        """
        listener = self._listener
        if listener is None or self._pool is None:
            return
        deadline = anyio.current_time() + max(0.0, timeout)
        # The first wait starts listening, before it reads the counters and the table, so a notification
        # committed after that look is not missed; a LISTEN that connects later wakes this wait.
        await listener.start(min(max(0.0, timeout), self._connect_timeout))
        key = tuple(dict.fromkeys(queues))
        while True:
            changed = listener.changed()
            generation = listener.generation(key)
            remaining = deadline - anyio.current_time()
            if remaining <= 0:
                return
            due = await self._next_due(key, remaining) if key else None
            wall = time.time()
            if due is not None and due[0] <= wall:
                snapshot = (key, due, generation)
                if snapshot != self._reported:
                    self._reported = snapshot
                    return
            remaining = deadline - anyio.current_time()
            if remaining <= 0:
                return
            pause = min(remaining, self._poll_interval)
            if due is not None and due[0] > wall:
                pause = min(pause, due[0] - wall)
            with anyio.move_on_after(pause):
                while listener.generation(key) == generation:
                    await changed.wait()
                    changed = listener.changed()
                return
            if self._listener is None:
                return  # closed while waiting

    async def _next_due(self, queues: tuple[str, ...], within: float) -> tuple[float, int] | None:
        """The earliest pending ``(run_at, seq)`` of ``queues``; ``None`` when there is none or it could not
        be read (the server is unreachable, or no connection came free ``within`` seconds)."""
        try:
            checkout = self._connection(wait=within)
            async with checkout as connection:
                # Shielded too: psycopg answers an interrupted query by cancelling it on the server and
                # closing the connection, and callers cancel wait_for_work routinely, whenever something
                # else woke them first. The query is one index probe per queue.
                with anyio.CancelScope(shield=True), anyio.move_on_after(self._connect_timeout):
                    return await ops.next_due(connection, self._statements, queues, cursor=checkout.cursor)
                return None  # the server went silent
        except psycopg.OperationalError as exc:
            # The server is unreachable (restarting?): wait as if idle; the caller's next claim reports the
            # outage, and the next look at the table finds what was missed.
            _log.debug("wait_for_work could not look for due tasks: %s", exc)
            return None

    async def pause(self, queue: str) -> None:
        """Stop every worker of this schema from claiming tasks of ``queue`` until :meth:`resume` (a row in
        ``lifecycle_paused``: it survives restarts and holds for workers started later). Idempotent.
        Creates the tables of a backend opened with ``create="on_enqueue"``, like an enqueue."""
        async with self._connection() as connection:
            await ops.pause(connection, self._statements, queue)

    async def resume(self, queue: str) -> None:
        """Let workers claim tasks of ``queue`` again, and wake the idle ones (idempotent)."""
        await self._inspect(ops.resume, queue, absent=None)

    async def paused(self) -> set[str]:
        """The paused queues."""
        return await self._inspect(ops.paused, absent=set())

    async def flow_state(
        self, name: str, concurrency_key: str | None, *, now: float, limits: FlowLimits
    ) -> FlowState:
        """The running tasks of ``name`` (and of ``concurrency_key``) and its rate bucket refilled to ``now``
        (with the ``refused`` count); reads only. See :meth:`Backend.flow_state`."""
        empty = FlowState(
            running=0, running_for_key=0, tokens=None if limits.rate is None else float(limits.rate)
        )
        return await self._inspect(ops.flow_state, name, concurrency_key, now, limits, absent=empty)

    async def _inspect(self, operation: Callable[..., Awaitable[_T]], *args: Any, absent: _T) -> _T:
        """``operation(connection, statements, *args)`` of an inspection or operator action: while the
        tables do not exist yet (opened with ``create="on_enqueue"``) its answer is ``absent``, and nothing
        is created."""
        async with self._connection(create=False) as connection:
            try:
                result = await operation(connection, self._statements, *args)
            except psycopg.errors.UndefinedTable:
                if not self._absent:
                    raise
                return absent
        self._absent = False  # the tables exist (another process created them)
        return result

    async def get(self, task_id: str) -> TaskRecord | None:
        """The record with this id, or ``None``."""
        return await self._inspect(ops.get, task_id, absent=None)

    async def list_records(
        self,
        *,
        states: Collection[TaskState] | None = None,
        queue: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[TaskRecord]:
        """Records matching the filters, newest ``enqueued_at`` first."""
        if states is not None and not states:
            return []
        return await self._inspect(ops.list_records, states, queue, limit, offset, absent=[])

    async def stats(self) -> Mapping[str, Mapping[TaskState, int]]:
        """Counts per queue and state (states with no record are left out)."""
        return await self._inspect(ops.stats, absent={})

    async def cancel(self, task_ids: Sequence[str], *, now: float) -> list[str]:
        """Cancel the pending tasks among ``task_ids`` and ask the active ones to stop (``cancel_requested``;
        their worker stops them within milliseconds through a ``"cancel"`` notice, or at its next look at
        the store), in one statement; return the ids of both kinds, in the order given. The group of a pending
        member ends cancelled in the same statement; see :meth:`Backend.cancel`."""
        if not task_ids:
            return []
        return await self._inspect(ops.cancel, task_ids, now, absent=[])

    async def cancel_requests(self, task_ids: Sequence[str]) -> set[str]:
        """The active tasks among ``task_ids`` whose cancellation was asked (one statement, a primary key
        probe per id)."""
        if not task_ids:
            return set()
        return await self._inspect(ops.cancel_requests, task_ids, absent=set())

    async def save_progress(self, updates: Sequence[ProgressUpdate]) -> set[str]:
        """Store each update whose lease is held, in one statement (the last update of a task wins); return
        the ids whose lease was lost."""
        if not updates:
            return set()
        async with self._connection() as connection:
            return await ops.save_progress(connection, self._statements, updates)

    async def enqueue_group(self, group: NewGroup) -> str:
        """Store ``group`` and its members in one transaction and wake the workers; see
        :meth:`Backend.enqueue_group`. The group's row keeps its ``then`` and a row per member (its last
        ending and its result, kept when retention removes the member's record). Raises
        :class:`DuplicateTaskError` for a group id that exists, or a member id that is live (nothing is
        stored then)."""
        async with self._connection() as connection:
            return await ops.enqueue_group(connection, self._statements, group)

    async def get_group(self, group_id: str) -> GroupRecord | None:
        """The group with this id (its members' results in call order, and counts per state), or
        ``None``."""
        return await self._inspect(ops.get_group, group_id, absent=None)

    async def wait_for_notices(self, *, timeout: float) -> list[Notice]:
        """The notices (cancel requests, settlements) that arrived since the last call, waiting up to
        ``timeout`` seconds for a first one; see :meth:`NotifyingBackend.wait_for_notices`.

        They travel by ``NOTIFY`` on :attr:`notice_channel`, sent by the transaction that made the change
        (one per settlement batch, with the ids in the payload, split to stay under PostgreSQL's 8000-byte
        limit), so they arrive when it commits. The ``LISTEN`` connection listens to that channel from the
        first call on (a process that never calls this is sent none); notices sent while it reconnects are
        lost (best effort: the engine polls too).
        """
        listener = self._listener
        if listener is None:
            await anyio.sleep(max(0.0, timeout))  # closed: nothing will come
            return []
        await listener.start(self._connect_timeout)
        await listener.listen_notices(self._connect_timeout)
        return await listener.next_notices(timeout)

    async def requeue(
        self, task_ids: Sequence[str] | None = None, *, queue: str | None = None, now: float
    ) -> int:
        """Move dead/cancelled tasks back to pending with ``attempts = 0``; return how many moved."""
        if task_ids is not None and not task_ids:
            return 0
        return await self._inspect(ops.requeue, task_ids, queue, now, absent=0)

    async def purge(
        self,
        *,
        states: Collection[TaskState],
        queue: str | None = None,
        before: float | None = None,
        limit: int | None = None,
    ) -> int:
        """Delete matching records; return how many were deleted."""
        if not states:
            return 0
        return await self._inspect(ops.purge, states, queue, before, limit, absent=0)


async def _configure(connection: psycopg.AsyncConnection[Any]) -> None:
    """Set up a new pooled connection.

    No JIT compilation: the backend's statements are short index probes, but the claim with limits is a
    large statement whose estimated cost (window functions, counts) can pass ``jit_above_cost``: compiling
    it then takes 100 ms or more, for a statement that runs in well under a millisecond.

    Lists (the column arrays every batch statement takes) are sent in PostgreSQL's binary array format:
    psycopg's text format quotes each element after a regular expression search, which cost a worker about
    a tenth of its CPU in a drain. Every statement casts its arrays (``%s::text[]``), so the wire format
    does not change what they mean. (A caller's connection of the transactional outbox keeps its own
    adapters: the statements work with either.)

    The binary COPY of new tasks picks its dumpers by column type: for ``bytea`` that is psycopg's DB-API
    ``Binary`` dumper, written in Python, unless bytes' own (C) dumper is registered for the type again."""
    connection.adapters.register_dumper(list, ListBinaryDumper)
    register_arrays(connection.adapters)  # the hot statements' arrays, dumped in one pass (see _arrays)
    connection.adapters.register_dumper(bytes, connection.adapters.get_dumper(bytes, PyFormat.BINARY))
    await connection.execute("SET jit = off")


async def _check_if_signalled(connection: psycopg.AsyncConnection[Any]) -> None:
    """The pool's check of a connection it hands out: a round trip (psycopg_pool's own check) only when the
    server sent something to, or closed, this idle connection, and nothing otherwise.

    An idle pooled connection is sent nothing while the server is well (it LISTENs to nothing): a server that
    shuts down or restarts, or ends the session (``pg_terminate_backend``, ``idle_session_timeout``), sends
    an error and closes the socket, which makes it readable, and a connection psycopg has seen fail is
    closed already. So a local, non-blocking look at the socket finds the connections a restart broke,
    without the round trip per call the full check costs (half of a worker's round trips). A connection cut
    without a word (a network partition) passes both checks alike and fails at its first statement.
    """
    if connection.closed or readable(connection.pgconn.socket):
        await AsyncConnectionPool.check_connection(connection)


def _check_if_exists(if_exists: str) -> None:
    if if_exists not in ("error", "skip", "debounce"):
        raise ValueError(f"if_exists must be 'error', 'skip' or 'debounce', got {if_exists!r}")
