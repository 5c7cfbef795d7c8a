"""SQLiteBackend: the embedded default backend, one file shared safely by any number of worker processes."""

from __future__ import annotations

import asyncio
import enum
import math
import os
import sqlite3
import threading
import time
import types
from collections.abc import Awaitable, Callable, Collection, Generator, Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal, TypeVar

import anyio
import anyio.lowlevel
import anyio.to_thread

from ...._checks import check_seconds
from ...._redact import library_logger
from ..._backend import Create, check_create
from ..._errors import BackendError, StoreNotFoundError
from ..._records import (
    ClaimedTask,
    FlowLimits,
    FlowState,
    GroupRecord,
    NewGroup,
    NewTask,
    ProgressUpdate,
    Settlement,
    TaskRecord,
    TaskState,
)
from . import _ops as ops
from ._schema import check_sqlite_version, ensure_schema

__all__ = ["SQLiteBackend"]

_log = library_logger("lifecycle.asynctask.sqlite")

_T = TypeVar("_T")
Synchronous = Literal["OFF", "NORMAL", "FULL", "EXTRA"]
_SYNCHRONOUS = ("OFF", "NORMAL", "FULL", "EXTRA")
_MEMORY = ":memory:"

# The loop connection (see SQLiteBackend._write_on_loop): the largest batch it is given (a few hundred
# microseconds of the event loop); the longest its statements may run before SQLite interrupts them and the
# write goes to the worker thread (checked every _LOOP_STEPS virtual machine steps).
_LOOP_ROWS = 100
_LOOP_BUDGET = 0.002
_LOOP_STEPS = 1000
# The loop connection never checkpoints (a checkpoint syncs the file): once it has written about
# _CHECKPOINT_PAGES WAL frames since the last checkpoint, the WAL is checkpointed (PASSIVE, what an automatic
# checkpoint does) on a thread of its own while writes go on, then on the worker thread by the write after
# it finished (see SQLiteBackend._checkpoint_wal). The frames are
# estimated from the rows each write changed (a write of one task writes 3.4 pages: the row, its id and its
# pending index entry, plus splits; each further row about 1.1, mostly its id index leaf). Writing on the
# worker thread's connection instead (every 256th write, before) cost more than its hop: each connection's
# page cache is dropped when the other one wrote, so both read their pages again (strace of 20 000 one-task
# enqueues: 0.58 page reads per enqueue with those turns, 0.15 with checkpoints only).
_FRAMES_PER_WRITE = 2.3
_FRAMES_PER_ROW = 1.1
# On asyncio, a write on the loop's thread yields to the event loop first only once this much time passed
# since the last one yielded: a producer enqueueing in a tight loop holds the loop for at most about this long
# (plus one write), as asyncio's own StreamWriter.drain() returns without yielding below its high-water mark.
# A yield is a fifth of a single enqueue's instructions (callgrind: 137k -> 109k without it). Trio keeps a
# checkpoint per call, as trio's own calls do.
_YIELD_EVERY = 0.0005
_yield_clock = time.perf_counter
# The WAL size (pages) past which a commit of the thread connection checkpoints it (and the loop connection's
# estimate, past which its next write checkpoints first). SQLite's default of 1000
# checkpoints (two file syncs) every ~300 one-task enqueues, as each writes ~3.4 pages (the row and two
# indexes, schema 5): 4000 (a WAL of up to ~16 MiB) cut the cost of an awaited enqueue by about a quarter.
# A WAL that is reused costs less than one that grows: frames written past its end cost 4-6 us more per
# one-task enqueue (measured with schema 5), so a WAL never checkpointed is slower too.
_CHECKPOINT_PAGES = 4000
# While the background checkpoint runs (see SQLiteBackend._checkpoint_wal), a write looks whether it finished
# every _RECHECK_FRAMES frames (about 9 one-task enqueues).
_RECHECK_FRAMES = 32.0
_SQLITE_BUSY = 5
_SQLITE_LOCKED = 6
_SQLITE_INTERRUPT = 9


class _Absent(enum.Enum):
    CREATE = "create"  # a call that creates the store when it does not exist yet


class _Elsewhere(enum.Enum):
    THREAD = "thread"  # a write the loop connection did not take: it runs on the worker thread


@types.coroutine
def _asyncio_checkpoint() -> Generator[None, None, None]:
    """What ``anyio.lowlevel.checkpoint()`` does on asyncio (``asyncio.sleep(0)``: a bare yield to the
    event loop, where a cancellation is delivered), without anyio's look-up of the running library and the
    three coroutines it passes through: about 8 000 instructions fewer per single enqueue (callgrind)."""
    yield


def _checkpoint_of_running_loop() -> Callable[[], Awaitable[None]]:
    """The checkpoint for the event loop this thread runs: the bare yield on asyncio, anyio's otherwise."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return anyio.lowlevel.checkpoint
    return _asyncio_checkpoint


def _in_transaction(
    connection: sqlite3.Connection,
    operation: Callable[..., _T],
    args: tuple[Any, ...],
    budget: _Budget | None = None,
) -> tuple[_T, bool]:
    """Run ``operation`` in a ``BEGIN IMMEDIATE`` transaction; return its result and whether rows changed.
    ``budget`` (the loop connection's) ends before the ``COMMIT``: SQLite may ask the progress handler once
    more after a statement committed, and an interrupt reported then would make a stored write look
    refused, so that it would be written again."""
    before = connection.total_changes
    connection.execute("BEGIN IMMEDIATE")
    try:
        result = operation(connection, *args)
    except BaseException:
        if connection.in_transaction:
            connection.execute("ROLLBACK")
        raise
    if budget is not None:
        budget.deadline = math.inf
    connection.execute("COMMIT")
    return result, connection.total_changes != before


def _autocommit(
    connection: sqlite3.Connection,
    operation: Callable[..., _T],
    args: tuple[Any, ...],
    budget: _Budget | None = None,
) -> tuple[_T, bool]:
    """Run ``operation``, a single statement that SQLite commits on its own (no ``BEGIN``/``COMMIT``: two
    statements fewer); return its result and whether rows changed. It runs without ``budget``: the statement
    commits itself, and an interrupt after its commit (see :func:`_in_transaction`) would store it twice."""
    if budget is not None:
        budget.deadline = math.inf
    before = connection.total_changes
    result = operation(connection, *args)
    return result, connection.total_changes != before


def _refused(exc: sqlite3.OperationalError) -> bool:
    """Whether SQLite refused a loop connection's write for a lock another connection holds
    (``SQLITE_BUSY``/``SQLITE_LOCKED``) or interrupted it at the end of its time budget."""
    code = getattr(exc, "sqlite_errorcode", None)  # Python 3.11+
    if code is not None:
        return code & 0xFF in (_SQLITE_BUSY, _SQLITE_LOCKED, _SQLITE_INTERRUPT)
    return "locked" in str(exc) or str(exc) == "interrupted"


class _Budget:
    """The progress handler of a loop connection: interrupts its statement once ``deadline`` has passed."""

    __slots__ = ("deadline",)

    def __init__(self) -> None:
        self.deadline = 0.0

    def __call__(self) -> bool:
        return time.perf_counter() > self.deadline


class SQLiteBackend:
    """Stores tasks in one SQLite file through the standard library's :mod:`sqlite3`.

    The embedded default: no server, and any number of worker processes on one machine may share the file
    (each with its own ``SQLiteBackend``). Calls run on a worker thread (:func:`anyio.to_thread.run_sync`),
    one at a time per backend object, so it works on asyncio and trio; a small enqueue (up to 100 tasks, or a
    group) first tries a second connection on the event loop's thread that never waits for a lock
    (``busy_timeout`` 0, WAL, ``synchronous`` ``"NORMAL"`` or ``"OFF"``, so its commit does not sync the
    file), and goes to the worker thread when another connection holds the write lock. The WAL those writes
    grow is checkpointed mostly on a thread of its own, with a third connection, while writes go on.

    Args:
        path: the database file (created with its tables when missing, see :meth:`open`; its directory
            must exist).
            ``":memory:"`` gives a private in-memory database, useful only within one backend object.
        poll_interval: how often, at most, an idle worker looks for work written by *other* processes
            (seconds). Work enqueued through the same backend object wakes it at once.
        busy_timeout: how long a write waits for another process's write lock before
            :class:`sqlite3.OperationalError` ("database is locked") is raised (seconds).
        synchronous: SQLite's ``PRAGMA synchronous``. With the default ``"NORMAL"`` in WAL mode a committed
            task survives a crash of any process (including ``kill -9``); an operating system crash or power
            loss may lose the last transactions committed before it. ``"FULL"`` makes every commit survive
            those too, at the cost of an fsync per transaction. ``"OFF"`` is for throwaway data only.

    Durability: ``enqueue_many`` returns after its transaction committed. The file uses WAL journaling
    (readers never block the writer); writes take the lock with ``BEGIN IMMEDIATE``, and a claim is one such
    transaction (per queue: the due tasks read in claim order from the pending index, then one
    ``UPDATE ... RETURNING``), so two processes never lease the same task, and flow limits, pauses and
    expiry are checked in the same transaction.

    Raises :class:`BackendError` from :meth:`open` when the directory is missing, the file is not a
    database, SQLite is older than 3.35, or the file was written by a newer schema version; with
    ``open(create=False)`` also when there is no task database at ``path``.

    Example::

        tasks = AsyncTasks(SQLiteBackend("var/tasks.db"))
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        poll_interval: float | timedelta = 0.1,
        busy_timeout: float | timedelta = 30.0,
        synchronous: Synchronous = "NORMAL",
    ) -> None:
        poll_interval = check_seconds(poll_interval, "SQLiteBackend(poll_interval=...)")
        busy_timeout = check_seconds(busy_timeout, "SQLiteBackend(busy_timeout=...)", allow_zero=True)
        mode = str(synchronous).upper()
        if mode not in _SYNCHRONOUS:
            raise ValueError(f"synchronous must be one of {', '.join(_SYNCHRONOUS)}, got {synchronous!r}")
        self._path = os.fspath(path)
        self._poll_interval = float(poll_interval)
        self._busy_timeout = float(busy_timeout)
        self._synchronous = mode
        self._connection: sqlite3.Connection | None = None
        self._loop_connection: sqlite3.Connection | None = None  # used on the event loop's thread only
        self._loop_cursor: sqlite3.Cursor | None = None  # the loop connection's, kept for single inserts
        self._loop_budget = _Budget()
        self._loop_frames = 0.0  # WAL frames (estimated) the loop connection wrote since the last checkpoint
        # the _loop_frames from which a write calls _checkpoint_wal
        self._look_at_frames = float(_CHECKPOINT_PAGES)
        self._checkpointing: threading.Thread | None = None  # the background checkpoint (see _checkpoint_wal)
        self._checkpointer: sqlite3.Connection | None = None  # its connection, used on its thread only
        self._checkpoint_uri = ""  # the file's URI for that connection (set when the loop connection is made)
        self._checkpoint: Callable[[], Awaitable[None]] = anyio.lowlevel.checkpoint
        self._every_write_yields = True  # False on asyncio: see _YIELD_EVERY
        self._next_yield = 0.0  # _yield_clock() from which the next write on the loop's thread yields
        self._deferred = False  # open, but no store yet: opened with create="on_enqueue"
        self._attaching: anyio.Lock | None = None
        self._limiter: anyio.CapacityLimiter | None = None
        self._wakeup: anyio.Event | None = None
        self._waiters = 0  # wait_for_work calls under way: a write with none replaces no event
        self._changes = 0  # write transactions of this object that changed rows
        self._reported: tuple[object, ...] | None = None  # what wait_for_work last returned for

    @property
    def path(self) -> str:
        """The database file, as given."""
        return self._path

    @property
    def poll_interval(self) -> float:
        """The longest an idle worker waits before looking for work from other processes (seconds)."""
        return self._poll_interval

    def __repr__(self) -> str:
        return f"SQLiteBackend({self._path!r})"

    # -- connection ---------------------------------------------------------------------------------------

    async def open(self, *, create: Create = True) -> None:
        """Open the file, switch it to WAL, create or migrate the schema. Calling it again does nothing.

        ``create=False`` creates nothing: it raises :class:`BackendError` when the file does not exist or
        holds no task tables (what the ``lifecycle tasks`` commands use). ``create="on_enqueue"`` (what
        ``AsyncTasks(..., execution=False)`` uses) leaves a missing store missing until the first enqueue
        (or claim) creates it; until then reads find no tasks and ``cancel``/``requeue``/``purge`` change
        nothing. ``":memory:"`` is always created.
        """
        create = check_create(create)
        if self._connection is not None or self._deferred:
            return
        check_sqlite_version()
        self._checkpoint = _checkpoint_of_running_loop()
        self._every_write_yields = self._checkpoint is not _asyncio_checkpoint
        self._limiter = anyio.CapacityLimiter(1)
        self._attaching = anyio.Lock()
        if create is not True and self._path != _MEMORY:
            missing = await anyio.to_thread.run_sync(self._missing_store, limiter=self._limiter)
            if missing is not None and create is False:
                raise StoreNotFoundError(missing)
            if missing is not None:
                self._check_directory()  # the first enqueue could not create the file: say so now
                self._wakeup = anyio.Event()
                self._deferred = True
                return
        connection, loop_connection = await anyio.to_thread.run_sync(self._connect, limiter=self._limiter)
        self._wakeup = anyio.Event()
        self._attach(connection, loop_connection)

    def _missing_store(self) -> str | None:
        """Why there is no task database at the path (one line), or ``None`` when there is one (or a file
        that is not a database, which :meth:`_connect` reports). Creates nothing."""
        path = Path(self._path).expanduser().absolute()
        if not path.is_file():
            return (
                f"there is no SQLite task database at {self._path!r} (no such file); check the path, or "
                "start a worker, which creates it"
            )
        try:
            connection = sqlite3.connect(f"{path.as_uri()}?mode=rw", uri=True, timeout=self._busy_timeout)
        except sqlite3.Error:
            return None
        try:
            found = connection.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'lifecycle_schema'"
            ).fetchone()
        except sqlite3.DatabaseError:
            return None
        finally:
            connection.close()
        if found is None:
            return (
                f"the SQLite database {self._path!r} holds no task tables (no worker has used it yet, or it "
                "belongs to something else); check the path"
            )
        return None

    def _switch_to_wal(self, connection: sqlite3.Connection) -> str:
        # Switching the journal mode needs an exclusive lock, and SQLite reports "database is locked" at once
        # (without its busy handler) while another process is switching the same fresh file: retry until
        # busy_timeout, as a write would wait.
        deadline = time.monotonic() + self._busy_timeout
        pause = 0.005
        while True:
            try:
                (mode,) = connection.execute("PRAGMA journal_mode = WAL").fetchone()
                return str(mode)
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() + pause > deadline:
                    raise
            time.sleep(pause)  # on the backend's worker thread, never on the event loop
            pause = min(pause * 2, 0.1)

    def _check_directory(self) -> None:
        """Raise :class:`BackendError` when the file's directory does not exist (the file cannot be made)."""
        if self._path != _MEMORY:
            parent = Path(self._path).expanduser().absolute().parent
            if not parent.is_dir():
                raise BackendError(
                    f"cannot open the SQLite task database {self._path!r}: its directory {str(parent)!r} "
                    "does not exist; create the directory first or choose another path"
                )

    def _connect(self) -> tuple[sqlite3.Connection, sqlite3.Connection | None]:
        """The connection of the worker thread (the file switched to WAL, its schema made or migrated), and
        the loop connection when writes on the event loop's thread cannot wait for a lock or a sync."""
        connection = self._connect_thread()
        try:
            return connection, self._connect_loop(connection)
        except BaseException:
            connection.close()
            raise

    def _connect_loop(self, connection: sqlite3.Connection) -> sqlite3.Connection | None:
        """A connection for short writes on the event loop's thread, or ``None`` where one could block it:
        ``:memory:`` (a second connection is another database), a file not in WAL (a commit waits for
        readers), ``synchronous`` FULL or EXTRA (a commit syncs the file). Made on the worker thread (opening
        a file may wait on the file system), then used on the event loop's thread only."""
        if self._path == _MEMORY or self._synchronous not in ("OFF", "NORMAL"):
            return None
        (mode,) = connection.execute("PRAGMA journal_mode").fetchone()
        if str(mode).lower() != "wal":
            return None
        self._checkpoint_uri = f"{Path(self._path).expanduser().absolute().as_uri()}?mode=rw"
        loop_connection = sqlite3.connect(
            os.path.expanduser(self._path),
            timeout=0,  # SQLITE_BUSY at once instead of waiting: the caller goes to the worker thread
            isolation_level=None,
            check_same_thread=False,
            cached_statements=128,
        )
        try:
            loop_connection.execute(f"PRAGMA synchronous = {self._synchronous}")
            # Neither reads the file: a lock held elsewhere cannot fail the open (the first write meets it).
            loop_connection.execute("PRAGMA wal_autocheckpoint = 0")  # a checkpoint syncs: thread only
            loop_connection.set_progress_handler(self._loop_budget, _LOOP_STEPS)
        except BaseException:
            loop_connection.close()
            raise
        return loop_connection

    def _connect_thread(self) -> sqlite3.Connection:
        where = repr(self._path)
        self._check_directory()
        try:
            connection = sqlite3.connect(
                os.path.expanduser(self._path),
                timeout=self._busy_timeout,
                isolation_level=None,
                check_same_thread=False,
                cached_statements=128,
            )
        except sqlite3.Error as exc:
            raise BackendError(
                f"cannot open the SQLite task database {where}: {exc}; check that the path is a writable file"
            ) from exc
        try:
            connection.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout * 1000)}")
            mode = self._switch_to_wal(connection)
            if str(mode).lower() != "wal" and self._path != _MEMORY:
                _log.warning(
                    "SQLite database %s could not switch to WAL (journal_mode is %s): several processes "
                    "will block each other more; is it on a network file system?",
                    where,
                    mode,
                )
            connection.execute(f"PRAGMA synchronous = {self._synchronous}")
            connection.execute(f"PRAGMA wal_autocheckpoint = {_CHECKPOINT_PAGES}")
            ensure_schema(connection, where=where)
        except BaseException as exc:
            connection.close()
            if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
                raise BackendError(
                    f"cannot open the SQLite task database {where}: {exc} (another process held its write "
                    f"lock for longer than busy_timeout={self._busy_timeout:g} s); try again, or raise "
                    "busy_timeout"
                ) from exc
            if isinstance(exc, sqlite3.DatabaseError):
                raise BackendError(
                    f"cannot use {where} as a SQLite task database: {exc}; check that the file is writable, "
                    "or point SQLiteBackend at a new file or at one it created"
                ) from exc
            raise
        return connection

    async def close(self) -> None:
        """Close the connection (the last connection to close checkpoints the WAL). Idempotent."""
        connection, self._connection = self._connection, None
        loop_connection, self._loop_connection = self._loop_connection, None
        self._loop_cursor = None
        self._deferred = False
        if connection is None:
            return
        self._wake()
        with anyio.CancelScope(shield=True):
            await self._join_checkpoint()
            if loop_connection is not None:
                await anyio.to_thread.run_sync(loop_connection.close, limiter=self._limiter)
            await anyio.to_thread.run_sync(_close, connection, limiter=self._limiter)

    def _attach(self, connection: sqlite3.Connection, loop_connection: sqlite3.Connection | None) -> None:
        self._connection, self._loop_connection = connection, loop_connection
        # A cursor kept for the single inserts: Connection.execute makes a new one per call.
        self._loop_cursor = None if loop_connection is None else loop_connection.cursor()

    def _require(self) -> sqlite3.Connection:
        if self._connection is None:
            raise BackendError(
                f"{self!r} is not open: call `await backend.open()` first (AsyncTasks does it in initialize)"
            )
        return self._connection

    def _wake(self) -> None:
        if self._waiters and self._wakeup is not None:
            self._wakeup.set()
            self._wakeup = anyio.Event()

    async def _store(self, absent: object) -> sqlite3.Connection | None:
        """The connection. While the store does not exist yet (opened with ``create="on_enqueue"``): made
        now for ``absent=_Absent.CREATE``, else ``None``, unless another process made it meanwhile."""
        if self._connection is not None or not self._deferred:
            return self._require()
        assert self._attaching is not None
        async with self._attaching:
            if self._connection is None:
                if absent is not _Absent.CREATE:
                    missing = await anyio.to_thread.run_sync(self._missing_store, limiter=self._limiter)
                    if missing is not None:
                        return None
                connection, loop_connection = await anyio.to_thread.run_sync(
                    self._connect, limiter=self._limiter
                )
                self._attach(connection, loop_connection)
                self._deferred = False
        return self._connection

    async def _read(
        self, operation: Callable[..., _T], *args: Any, absent: _T | _Absent = _Absent.CREATE
    ) -> _T:
        """Run ``operation``; ``absent`` is the answer while there is no store (see :meth:`_store`)."""
        connection = await self._store(absent)
        if connection is None:
            assert not isinstance(absent, _Absent)
            return absent
        return await anyio.to_thread.run_sync(
            ops.reading_any_text, connection, operation, (connection, *args), limiter=self._limiter
        )

    async def _write(
        self,
        operation: Callable[..., _T],
        *args: Any,
        wake: bool = True,
        absent: _T | _Absent = _Absent.CREATE,
        on_loop: bool = False,
        single: bool = False,
    ) -> _T:
        """Run ``operation`` in a write transaction; with ``wake``, a change wakes this object's waiters
        (only writes that can make work claimable: enqueue, settle, requeue, recovery). ``absent`` is the
        answer while there is no store (see :meth:`_store`). ``on_loop``: a short write that may run on the
        event loop's thread (see :meth:`_write_on_loop`). ``single``: ``operation`` is one statement, run
        without ``BEGIN``/``COMMIT`` (SQLite makes it its own transaction)."""
        connection = await self._store(absent)
        if connection is None:
            assert not isinstance(absent, _Absent)
            return absent
        run = _autocommit if single else _in_transaction
        loop_done: tuple[_T, bool] | None = None
        if on_loop and self._loop_connection is not None:
            # The call's scheduling point, as the worker thread's call has one, so a producer enqueueing in
            # a loop does not starve the other tasks (on asyncio at least every _YIELD_EVERY): before the
            # write, so a cancellation delivered there stores nothing (one that arrives between two yields on
            # asyncio is delivered at the next), and nothing after it can interrupt the call once the task is
            # stored.
            if self._loop_frames >= self._look_at_frames:
                await self._checkpoint_wal()
            elif self._yield_due():
                await self._checkpoint()
            loop_done = self._write_on_loop(run, operation, args)
        if loop_done is not None:
            done = loop_done
        else:
            done = await anyio.to_thread.run_sync(
                ops.reading_any_text,
                connection,
                run,
                (connection, operation, args),
                limiter=self._limiter,
            )
        result, changed = done
        if changed:
            self._changes += 1
            if wake:
                self._wake()
        return result

    def _yield_due(self) -> bool:
        """Whether a write on the loop's thread yields to the event loop before it runs: always on trio; on
        asyncio when ``_YIELD_EVERY`` passed since the last one that yielded (see there)."""
        if self._every_write_yields:
            return True
        now = _yield_clock()
        if now < self._next_yield:
            return False
        self._next_yield = now + _YIELD_EVERY
        return True

    def _write_on_loop(
        self,
        run: Callable[[sqlite3.Connection, Callable[..., _T], tuple[Any, ...], _Budget], tuple[_T, bool]],
        operation: Callable[..., _T],
        args: tuple[Any, ...],
    ) -> tuple[_T, bool] | None:
        """Run ``operation`` with ``run`` (in a write transaction, or alone) on the loop connection, on the
        event loop's thread; or ``None`` when it must run on the worker thread: there is no loop connection,
        another connection (of any process, this object's own worker thread included) holds the write lock,
        or the statements ran
        past ``_LOOP_BUDGET``. The loop connection never waits for a lock (``busy_timeout`` 0) and SQLite
        interrupts it at the end of its budget, so this holds the loop for about that long at most (a
        commit's writes, never interrupted, come after the budget); a refused attempt rolled back everything
        it wrote, so the worker thread runs ``operation`` again from the start."""
        connection = self._loop_connection
        if connection is None:
            return None
        self._loop_budget.deadline = time.perf_counter() + _LOOP_BUDGET
        before = connection.total_changes
        try:
            done = ops.reading_any_text(connection, run, (connection, operation, args, self._loop_budget))
        except sqlite3.OperationalError as exc:
            if not _refused(exc):
                raise
        else:
            changed = connection.total_changes - before
            if changed:
                self._loop_frames += _FRAMES_PER_WRITE + _FRAMES_PER_ROW * changed
            return done
        self._loop_budget.deadline = math.inf  # the rollback below must not be interrupted
        if connection.in_transaction:  # a refused COMMIT leaves its transaction open
            connection.execute("ROLLBACK")
        return None

    async def _checkpoint_wal(self) -> None:
        """Checkpoint the WAL (see ``_FRAMES_PER_WRITE``), mostly without the writes waiting for it; a
        scheduling point when one is due (see :meth:`_yield_due`).

        A checkpoint syncs the WAL, then the database file: most of its time is spent waiting for the disk
        (awaited, ~14 ms per 4 000 frames: a quarter of the wall time of one-task enqueues in a row). So it
        first runs on a thread of its own with a connection of its own (``PASSIVE``: it takes no lock that
        writers need) while the loop connection goes on writing. The frames written meanwhile are not
        checkpointed, and the WAL starts over only when a write finds every frame checkpointed: so once it
        finished, the next write awaits another one on the worker thread, as before, which has only those
        frames left to copy and sync, and the write after it starts the WAL over. (Further background rounds
        before that one left less to await but let the WAL grow larger, for no clear gain.)"""
        running = self._checkpointing
        if running is None:
            self._loop_frames = 0.0
            self._look_at_frames = _RECHECK_FRAMES
            self._checkpointing = threading.Thread(
                target=_checkpoint_in_background,
                args=(self,),
                name="lifecycle-sqlite-checkpoint",
                daemon=True,
            )
            self._checkpointing.start()
        elif running.is_alive():
            self._look_at_frames = self._loop_frames + _RECHECK_FRAMES
        else:
            self._checkpointing = None
            self._loop_frames = 0.0
            self._look_at_frames = float(_CHECKPOINT_PAGES)
            await anyio.to_thread.run_sync(ops.checkpoint_wal, self._require(), limiter=self._limiter)
            return
        if self._yield_due():
            await self._checkpoint()

    async def _join_checkpoint(self) -> None:
        """Wait for the background checkpoint if one runs (on a worker thread: it may take a while); close its
        connection."""
        running, self._checkpointing = self._checkpointing, None
        self._loop_frames = 0.0
        self._look_at_frames = float(_CHECKPOINT_PAGES)
        if running is not None and running.is_alive():
            await anyio.to_thread.run_sync(running.join)
        checkpointer, self._checkpointer = self._checkpointer, None
        if checkpointer is not None:
            await anyio.to_thread.run_sync(checkpointer.close)

    # -- the Backend protocol -----------------------------------------------------------------------------

    async def enqueue_many(
        self, tasks: Sequence[NewTask], *, if_exists: Literal["error", "skip", "debounce"] = "error"
    ) -> list[str]:
        """Store ``tasks`` in one committed transaction; see :meth:`Backend.enqueue_many`."""
        if if_exists not in ("error", "skip", "debounce"):
            raise ValueError(f"if_exists must be 'error', 'skip' or 'debounce', got {if_exists!r}")
        if not tasks:
            return []
        if len(tasks) == 1 and if_exists != "debounce" and tasks[0].unique_key is None:
            # The common single enqueue: one INSERT. A taken id writes nothing; the rules below decide.
            # On the loop connection it is what _write(ops.insert_fresh, on_loop=True, single=True) does,
            # without its layers (about 5 000 instructions): the checkpoint, then _insert_on_loop.
            stored: list[str] | _Elsewhere | None = _Elsewhere.THREAD
            if self._loop_connection is not None:
                if self._loop_frames >= self._look_at_frames:
                    await self._checkpoint_wal()
                elif self._yield_due():
                    await self._checkpoint()
                stored = self._insert_on_loop(tasks[0])
            if stored is _Elsewhere.THREAD:
                stored = await self._write(ops.insert_fresh, tasks[0], single=True)
            if stored is not None:
                return stored
        return await self._write(ops.enqueue_many, list(tasks), if_exists, on_loop=len(tasks) <= _LOOP_ROWS)

    def _insert_on_loop(self, task: NewTask) -> list[str] | _Elsewhere | None:
        """:func:`ops.insert_fresh` on the loop connection, as :meth:`_write_on_loop` runs a single statement
        (no budget, see :func:`_autocommit`); :attr:`_Elsewhere.THREAD` when the write must run on the worker
        thread instead (another connection holds the write lock). An insert returns no text, so no text can
        fail to decode (what :func:`ops.reading_any_text` is for)."""
        connection, cursor = self._loop_connection, self._loop_cursor
        if connection is None or cursor is None:
            return _Elsewhere.THREAD
        self._loop_budget.deadline = math.inf
        try:
            stored = ops.insert_fresh(cursor, task)
        except sqlite3.OperationalError as exc:
            if not _refused(exc):
                raise
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            return _Elsewhere.THREAD
        if stored is not None:
            self._loop_frames += _FRAMES_PER_WRITE + _FRAMES_PER_ROW
            self._changes += 1
            if self._waiters:
                self._wake()
        return stored

    async def claim(
        self,
        queues: Sequence[str],
        limit: int,
        *,
        now: float,
        lease_until: float,
        limits: Mapping[str, FlowLimits] | None = None,
    ) -> list[ClaimedTask]:
        """Lease up to ``limit`` due tasks, ``queues`` in priority order, in one transaction that also checks
        the flow limits, skips paused queues and cancels expired tasks; see :meth:`Backend.claim`."""
        if limit <= 0 or not queues:
            return []
        return await self._write(ops.claim, list(queues), limit, now, lease_until, limits, wake=False)

    async def settle_and_claim(
        self,
        settlements: Sequence[Settlement],
        queues: Sequence[str],
        limit: int,
        *,
        now: float,
        lease_until: float,
        limits: Mapping[str, FlowLimits] | None = None,
    ) -> tuple[set[str], list[ClaimedTask]]:
        """:meth:`settle` ``settlements``, then :meth:`claim`, in one transaction on one trip to the worker
        thread (a worker's claim takes along the verdicts waiting to be saved); returns the lost ids and the
        claimed tasks. When it raises, neither happened."""
        if limit <= 0 or not queues:
            return await self.settle(settlements), []
        if not settlements:
            return set(), await self.claim(queues, limit, now=now, lease_until=lease_until, limits=limits)
        return await self._write(
            ops.settle_and_claim, list(settlements), list(queues), limit, now, lease_until, limits
        )

    async def extend_leases(self, leases: Sequence[tuple[str, str]], *, lease_until: float) -> set[str]:
        """Renew held leases; return the ids whose lease was lost."""
        if not leases:
            return set()
        return await self._write(ops.extend_leases, list(leases), lease_until, wake=False)

    async def settle(self, settlements: Sequence[Settlement]) -> set[str]:
        """Apply settlements whose lease is held, in one transaction; return the ids not applied."""
        if not settlements:
            return set()
        return await self._write(ops.settle, list(settlements))

    async def reclaim_expired(self, *, now: float, lease_until: float, limit: int) -> list[ClaimedTask]:
        """Take over active tasks whose lease ended before ``now``, attempts unchanged, and the damaged
        records no claim can select; see :meth:`Backend.reclaim_expired`."""
        if limit <= 0:
            return []
        return await self._write(ops.reclaim_expired, now, lease_until, limit)

    async def wait_for_work(self, queues: Sequence[str], *, timeout: float) -> None:
        """Return when a task in ``queues`` is due, this object changed the data, or after ``timeout``.

        Other processes' writes are seen by polling every ``poll_interval`` (one indexed query). A due task
        is reported once: while nothing changes in the file, later calls wait instead of returning again at
        once, so a caller that cannot claim it yet does not spin.
        """
        deadline = anyio.current_time() + max(0.0, timeout)
        key = tuple(dict.fromkeys(queues))
        self._waiters += 1  # from before the event is taken: every later write replaces it
        try:
            await self._wait_for_work(key, deadline)
        finally:
            self._waiters -= 1

    async def _wait_for_work(self, key: tuple[str, ...], deadline: float) -> None:
        while True:
            wakeup = self._wakeup
            if self._connection is None or wakeup is None:
                return
            next_run, data_version = await self._read(ops.next_run_at, key)
            wall = time.time()
            snapshot = (key, next_run, data_version, self._changes)
            if next_run is not None and next_run <= wall and snapshot != self._reported:
                self._reported = snapshot
                return
            remaining = deadline - anyio.current_time()
            if remaining <= 0:
                return
            pause = min(remaining, self._poll_interval)
            if next_run is not None and next_run > wall:
                pause = min(pause, next_run - wall)
            with anyio.move_on_after(pause):
                await wakeup.wait()
                return

    async def pause(self, queue: str) -> None:
        """Store the pause of ``queue``: no claim of any process takes its tasks until :meth:`resume`."""
        await self._write(ops.pause, queue, wake=False)

    async def resume(self, queue: str) -> None:
        """Forget the pause of ``queue`` (idempotent)."""
        await self._write(ops.resume, queue)

    async def paused(self) -> set[str]:
        """The paused queues."""
        return await self._read(ops.paused, absent=set())

    async def flow_state(
        self, name: str, concurrency_key: str | None, *, now: float, limits: FlowLimits
    ) -> FlowState:
        """The running counts and the rate bucket of ``name`` at ``now``; changes nothing."""
        empty = FlowState(
            running=0, running_for_key=0, tokens=None if limits.rate is None else float(limits.rate)
        )
        return await self._read(ops.flow_state, name, concurrency_key, now, limits, absent=empty)

    async def get(self, task_id: str) -> TaskRecord | None:
        """The record with this id, or ``None``."""
        return await self._read(ops.get, task_id, absent=None)

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
        return await self._read(ops.list_records, states, queue, limit, offset, absent=[])

    async def stats(self) -> Mapping[str, Mapping[TaskState, int]]:
        """Counts per queue and state (states with no record are left out)."""
        return await self._read(ops.stats, absent={})

    async def cancel(self, task_ids: Sequence[str], *, now: float) -> list[str]:
        """Cancel pending tasks among ``task_ids`` and ask active ones to stop, in one transaction; return
        both kinds, in the order given (see :meth:`Backend.cancel`)."""
        if not task_ids:
            return []
        return await self._write(ops.cancel, list(task_ids), now, wake=False, absent=[])

    async def cancel_requests(self, task_ids: Sequence[str]) -> set[str]:
        """The active tasks among ``task_ids`` whose cancellation was asked (workers ask this about their
        running tasks: SQLite pushes nothing, so a request is seen at the next look)."""
        if not task_ids:
            return set()
        return await self._read(ops.cancel_requests, list(task_ids), absent=set())

    async def save_progress(self, updates: Sequence[ProgressUpdate]) -> set[str]:
        """Store each update whose lease is held, in one transaction; return the ids whose lease was lost."""
        if not updates:
            return set()
        return await self._write(ops.save_progress, list(updates), wake=False)

    async def enqueue_group(self, group: NewGroup) -> str:
        """Store ``group`` and its members in one transaction, or nothing (see
        :meth:`Backend.enqueue_group`)."""
        return await self._write(ops.enqueue_group, group, on_loop=len(group.members) <= _LOOP_ROWS)

    async def get_group(self, group_id: str) -> GroupRecord | None:
        """The group with this id, or ``None``."""
        return await self._read(ops.get_group, group_id, absent=None)

    async def requeue(
        self, task_ids: Sequence[str] | None = None, *, queue: str | None = None, now: float
    ) -> int:
        """Move dead/cancelled tasks back to pending with ``attempts = 0``; return how many moved."""
        if task_ids is not None and not task_ids:
            return 0
        ids = None if task_ids is None else list(task_ids)
        return await self._write(ops.requeue, ids, queue, now, absent=0)

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
        return await self._write(ops.purge, states, queue, before, limit, wake=False, absent=0)


def _checkpoint_in_background(backend: SQLiteBackend) -> None:
    """:func:`ops.checkpoint_wal` on the backend's checkpoint connection (made at the first call), on a thread
    of its own (see ``SQLiteBackend._checkpoint_wal``). It never raises: a checkpoint that failed leaves the
    frames to the next one, awaited on the worker thread, which reports the error."""
    try:
        connection = backend._checkpointer
        if connection is None:
            # The file the other connections opened, by its absolute path (the working directory may have
            # changed since), never created (mode=rw).
            connection = sqlite3.connect(
                backend._checkpoint_uri, uri=True, timeout=0, isolation_level=None, check_same_thread=False
            )
            backend._checkpointer = connection
            connection.execute(f"PRAGMA synchronous = {backend._synchronous}")  # syncs as the others do
        ops.checkpoint_wal(connection)
    except sqlite3.Error:
        _log.debug("a background checkpoint of %r failed", backend.path, exc_info=True)


def _close(connection: sqlite3.Connection) -> None:
    try:
        connection.execute("PRAGMA optimize")
    except sqlite3.Error:
        pass  # only a planner hint; never let it keep the file open
    connection.close()
