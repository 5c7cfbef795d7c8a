"""NatsBackend: durable tasks in NATS JetStream (extra ``nats``).

Install with ``pip install "anyio-lifecycle[nats]"`` (nats-py). asyncio only.
"""

from __future__ import annotations

import itertools
import re
import secrets
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, Literal, TypeVar

import anyio
import anyio.lowlevel
import anyio.to_thread

from ..._extras import raise_missing_extra

try:
    import nats  # noqa: F401  (the extra's package: a clear message when it is missing)
except ModuleNotFoundError as exc:  # the extra is not installed: say which, and how to install it
    raise_missing_extra(exc, "nats")

from ...._checks import check_count
from ...._redact import library_logger, redact
from ..._backend import Create, check_create
from ..._errors import BackendError, DuplicateTaskError, StoreNotFoundError
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
from .._url_parts import split_url
from . import _ops as ops
from ._codec import decode_snapshot, encode_parts, encode_snapshot
from ._log import LAYOUT, Conflict, Log, Names, StreamMissing
from ._state import Feed, State
from ._tx import Tx

__all__ = ["NatsBackend"]

_log = library_logger("lifecycle.asynctask.nats")

R = TypeVar("R")

_SCHEMES = ("nats", "tls", "ws", "wss")
_PREFIX = re.compile(r"[A-Za-z0-9_-]+")
_PUSH_GRACE = 0.05  # how long a caller waits for pushed log messages before reading them itself
_PARTIAL_GRACE = 1.0  # how long a writer lets another's transaction of several messages finish
_CHUNK = 5_000  # records per transaction of requeue(None) and purge
_GENESIS = "genesis"
_NOTICE_BATCH = 2048  # the most notices one wait_for_notices() call returns


class NatsBackend:
    """Stores tasks in NATS JetStream through nats-py (asyncio only).

    Every change is one transaction appended to a JetStream stream (the log) with optimistic concurrency:
    the message says which log sequence its writer read up to (``Nats-Expected-Last-Sequence``), and the
    server refuses it when another process appended first; the writer then reads the new messages and plans
    the change again. Every process keeps the store's state in memory, read from the log (a snapshot, then
    the messages after it), so claims, leases, flow limits, pauses and uniqueness windows are checked against
    the whole store, atomically, by every process alike. Batch claims, settlements, heartbeats and enqueues
    are one message each. Idle workers wake by push (the log's messages reach every process as they are
    written) and sleep until the earliest delayed task is due, so nothing polls. It is a
    :class:`NotifyingBackend`: the cancellation of a running task and every verdict reach the workers and
    waiters of every process as the log pushes them. A group's fan-in is planned inside the transaction
    that settles its last member, so its ``then`` is stored exactly once. ``docs/backends.md`` says why
    nothing is lost or run twice beyond the lease, and what to size.

    Durability is JetStream's: a call returns once the server stored the transaction (file storage;
    ``replicas`` copies in a cluster). Every process holds the store in memory: size for the tasks you keep
    (purge finished ones; ``retention`` does it).

    Args:
        url: the server, ``nats://[user:password@]host:4222`` (also ``tls://``, ``ws://``, ``wss://``); a
            comma-separated list names the servers of a cluster.
        prefix: the name the streams and subjects start with (``PREFIX_tasks_log``, ``PREFIX.tasks.log``,
            ...): letters, digits, ``-`` and ``_``. Use one prefix per application.
        replicas: copies of each stream in a JetStream cluster (1 to 5; 3 survives the loss of a server).
            Applied when the streams are created.
        client_options: further keyword arguments for ``nats.connect`` (``user_credentials``, ``tls``,
            ``token``, ``name``, ...).

    Raises :class:`BackendError` from :meth:`open` under trio (nats-py is asyncio-only), when the server
    cannot be reached or has no JetStream, or when the streams hold a newer layout.

    Example::

        backend = NatsBackend("nats://nats.internal:4222", prefix="shop", replicas=3)
        tasks = AsyncTasks(backend)
    """

    connect_timeout: float = 10.0
    """How long :meth:`open` may take to connect (seconds)."""
    reconnect_timeout: float = 30.0
    """How long a call keeps retrying after the connection dropped before it raises (seconds)."""
    compact_every: int = 10_000
    """Log messages between two snapshots; the log before the previous snapshot is then deleted."""

    def __init__(
        self,
        url: str = "nats://127.0.0.1:4222",
        *,
        prefix: str = "lifecycle",
        replicas: int = 1,
        **client_options: Any,
    ) -> None:
        _check_url(url)
        if not isinstance(prefix, str):
            raise TypeError(f"NatsBackend(prefix=...) must be a string, got {prefix!r}")
        if not _PREFIX.fullmatch(prefix):
            raise ValueError(
                "NatsBackend(prefix=...) must be letters, digits, '-' and '_' (it names JetStream streams "
                f"and subjects), got {prefix!r}"
            )
        replicas = check_count(replicas, "NatsBackend(replicas=...)", minimum=1)
        if replicas > 5:
            raise ValueError(f"NatsBackend(replicas=...) must be 1 to 5 (JetStream's limit), got {replicas}")
        if "servers" in client_options:
            raise ValueError(
                "NatsBackend takes its servers in url (a comma-separated list for a cluster), not servers=..."
            )
        self._url = url
        self._names = Names(prefix)
        self._replicas = replicas
        self._client_options = client_options
        self._log: Log | None = None
        self._state = State()
        self._present = False  # the streams exist (else: opened with create="on_enqueue", nothing yet)
        self._stale = False  # the log lost messages this replica had not read: reload from the snapshot
        self._refollow = False  # reconnected: the log's subscription may be gone, follow the log again
        self._generation = 0
        self._write_lock: anyio.Lock | None = None
        self._reload_lock: anyio.Lock | None = None
        self._compacting = False
        self._advanced: anyio.Event | None = None
        self._changed: anyio.Event | None = None
        self._reported: tuple[tuple[str, ...], int, int] | None = None
        self._nonce = ""
        self._calls = itertools.count(1)
        self._inflight: tuple[str, list[Any]] | None = None  # the transaction this process is appending
        self._notices: list[Notice] | None = None  # filled from the log once wait_for_notices was called
        self._noticed: anyio.Event | None = None

    @property
    def prefix(self) -> str:
        """The application's prefix (streams ``{prefix}_tasks_log`` and ``{prefix}_tasks_snap``)."""
        return self._names.prefix

    @property
    def streams(self) -> tuple[str, str]:
        """The names of the two streams: the log, and the snapshots."""
        return self._names.log_stream, self._names.snap_stream

    def __repr__(self) -> str:
        replicas = f", replicas={self._replicas}" if self._replicas != 1 else ""
        return f"NatsBackend({redact(self._url, self._url)!r}, prefix={self.prefix!r}{replicas})"

    # -- connection -----------------------------------------------------------------------------------------

    async def open(self, *, create: Create = True) -> None:
        """Connect, check or create the streams, and read the store into memory (the latest snapshot, then the
        log after it). Calling it again does nothing.

        ``create=False`` creates nothing: it raises :class:`BackendError` when the prefix has no streams on
        this server (what the ``lifecycle tasks`` commands use). ``create="on_enqueue"`` (what
        ``AsyncTasks(..., execution=False)`` uses) creates them at the first enqueue instead.

        Raises :class:`BackendError` under trio, when the server cannot be reached within
        ``connect_timeout`` or has no JetStream, or when the streams hold a newer layout.
        """
        create = check_create(create)
        if self._log is not None:
            return
        require_asyncio("NatsBackend", "nats-py's client is asyncio-only")
        log = Log(
            self._url,
            self._names,
            replicas=self._replicas,
            options=self._client_options,
            connect_timeout=self.connect_timeout,
            reconnect_timeout=self.reconnect_timeout,
        )
        await log.connect()
        log.reconnected = self._reconnected
        self._write_lock = anyio.Lock()
        self._reload_lock = anyio.Lock()
        self._nonce = secrets.token_hex(6)
        try:
            layout = await log.layout()
            if layout is None and create is False:
                raise StoreNotFoundError(
                    f"there are no tasks under prefix {self.prefix!r} at {log.shown} (no stream "
                    f"{self._names.log_stream!r}); check the prefix (?prefix=NAME in a URL) and the server, "
                    "or start a worker, which creates it"
                )
            if layout is not None and layout > LAYOUT:
                raise BackendError(
                    f"the streams of prefix {self.prefix!r} at {log.shown} use layout version {layout}, "
                    f"newer than this version of lifecycle understands ({LAYOUT}); upgrade anyio-lifecycle, "
                    "or use another prefix"
                )
            self._log = log
            if layout is None and create is True:
                await log.create()
                layout = LAYOUT
            if layout is not None:
                await self._start()
        except BaseException:
            self._log = None
            await log.close()
            raise

    async def _start(self) -> None:
        """Read the store (snapshot and log) and follow the log from there on."""
        self._present = True
        await self._reload(force=True)
        await self._reach(await self._opened().head())

    async def close(self) -> None:
        """Stop following the log and close the connection. Idempotent."""
        log, self._log = self._log, None
        self._present = False
        self._wake()
        if log is not None:
            await log.close()

    def _opened(self) -> Log:
        if self._log is None:
            raise RuntimeError("this NatsBackend is not open: call `await backend.open()` first")
        return self._log

    # -- reading the log ------------------------------------------------------------------------------------

    def _wake(self) -> None:
        advanced, self._advanced = self._advanced, None
        if advanced is not None:
            advanced.set()

    def _reconnected(self) -> None:
        # Following the log again is I/O: the next caller that reads the replica does it (wait_for_work
        # returns for it), not nats-py's reconnect callback, which would hold up its reconnection.
        self._refollow = True
        self._notify()
        self._wake()

    async def _follow_again(self) -> None:
        """Follow the log again after a reconnect, from the message after the last one this replica read."""
        assert self._reload_lock is not None
        async with self._reload_lock:
            if not self._refollow or self._stale:  # done meanwhile, or _reload() follows anew anyway
                return
            self._generation += 1  # what the old subscription still delivers is dropped
            await self._follow()

    async def _follow(self) -> None:
        """Follow the log from the message after the replica's last one, for the current generation."""
        generation = self._generation
        await self._opened().follow(
            self._state.seq + 1,
            lambda seq, expected, part, data: self._feed(generation, seq, expected, part, data),
        )
        self._refollow = False  # a new subscription, made on the connection as it is now

    def _notify(self) -> None:
        changed, self._changed = self._changed, None
        if changed is not None:
            changed.set()
        if self._notices:
            noticed, self._noticed = self._noticed, None
            if noticed is not None:
                noticed.set()

    def _feed(
        self, generation: int, seq: int, expected: int | None, part: tuple[str, int, int], data: bytes
    ) -> None:
        """One log message, pushed or read by sequence."""
        if generation != self._generation:
            return  # a message of a subscription that was replaced
        state = self._state
        if seq <= state.seq:
            return
        inflight = self._inflight
        outcome: Feed
        try:
            if (
                inflight is not None
                and part == (inflight[0], 0, 1)
                and seq == state.seq + 1
                and expected == seq - 1
            ):
                # this process's own transaction, pushed before its acknowledgement: its ops are known
                state.seq = seq
                state.partial = None
                state.apply(inflight[1])
                outcome = "applied"
            else:
                outcome = state.feed(seq, expected, part, data)
        except Exception:  # a bug, never a message's content: start again from the snapshot, loudly
            _log.exception(
                "could not apply log message %d of prefix %r; reading the store again", seq, self.prefix
            )
            self._stale = True
            self._wake()
            return
        if outcome == "gap":
            self._stale = True
        elif outcome == "applied":
            self._notify()
        self._wake()

    async def _reload(self, *, force: bool = False) -> None:
        """Rebuild the replica from the latest snapshot and follow the log after it (unless another caller
        did it meanwhile)."""
        assert self._reload_lock is not None
        async with self._reload_lock:
            if not (force or self._stale):
                return
            log = self._opened()
            for _ in range(10):
                state = State()
                pointer = await log.pointer()
                if pointer is not None:
                    data = await log.read_snapshot(pointer)
                    if data is None:
                        continue  # replaced meanwhile: read the newer one
                    try:
                        state.load(*decode_snapshot(data))
                    except (ValueError, KeyError, TypeError, IndexError) as exc:
                        raise BackendError(
                            f"the snapshot of prefix {self.prefix!r} at {log.shown} cannot be read ({exc})"
                        ) from exc
                break
            else:
                raise BackendError(f"cannot read a snapshot of prefix {self.prefix!r} at {log.shown}")
            self._generation += 1
            state.notices = self._notices
            self._state = state
            self._stale = False
            self._notify()
            self._wake()
            await self._follow()

    async def _reach(self, target: int) -> State:
        """Return the replica once it has read the log up to ``target`` (by push, or by reading the missing
        messages itself when the push is late)."""
        log = self._opened()
        while True:
            if self._stale:
                await self._reload()
                continue
            if self._refollow:
                await self._follow_again()
            state = self._state
            if state.seq >= target:
                return state
            before = state.seq
            if self._advanced is None:
                self._advanced = anyio.Event()
            advanced = self._advanced
            with anyio.move_on_after(_PUSH_GRACE):
                await advanced.wait()
            if self._state is state and state.seq == before and not self._stale:
                fetched = await log.fetch(before + 1)
                if fetched is None:
                    self._stale = True  # deleted before this replica read it
                else:
                    self._feed(self._generation, before + 1, *fetched)

    async def _current(self) -> State | None:
        """The replica, once it has read the whole log as it is now; ``None`` when there is no store."""
        log = self._opened()
        if not self._present:
            if await log.layout() is None:
                return None
            await self._start()
        try:
            head = await log.head()
        except StreamMissing:
            return None
        return await self._reach(head)

    # -- writing --------------------------------------------------------------------------------------------

    def _token(self) -> str:
        return f"{self._nonce}.{next(self._calls):x}"

    async def _transact(self, plan: Callable[[Tx], R], *, creates: bool) -> R:
        """Plan a change on the replica and append it to the log; plan again after another process appended
        first. A plan that changes nothing (or raises :class:`DuplicateTaskError`) is returned (raised) once
        the replica is shown to be current."""
        log = self._opened()
        assert self._write_lock is not None
        compact = False
        async with self._write_lock:
            if not self._present:
                if not creates and await log.layout() is None:
                    return plan(Tx(State(), 1))
                await log.create()
                await self._start()
            while True:
                if self._stale:
                    await self._reload()
                if self._refollow:
                    await self._follow_again()
                state = self._state
                if state.partial is not None:  # another writer's transaction of several messages
                    before = state.seq
                    with anyio.move_on_after(_PARTIAL_GRACE):
                        while self._state is state and state.seq == before and not self._stale:
                            if self._advanced is None:
                                self._advanced = anyio.Event()
                            await self._advanced.wait()
                    if self._state is not state or state.seq != before or self._stale:
                        continue
                if state.seq == 0:
                    await self._genesis(log)
                    continue
                planned = state.seq  # the replica changes in place while this call awaits below
                tx = Tx(state, planned + 1)
                refusal: DuplicateTaskError | None = None
                try:
                    result = plan(tx)
                except DuplicateTaskError as exc:
                    refusal = exc
                changes = tx.ops() if refusal is None else []
                if not changes:
                    head = await log.head()
                    if head < planned:  # the streams were deleted and made again
                        self._stale = True
                        continue
                    if head > planned or self._state is not state:
                        await self._reach(head)
                        continue
                    if refusal is not None:
                        raise refusal
                    return result
                committed = await self._commit(log, state, changes)
                if committed is None:
                    continue
                first, last = committed
                compact = (first - 1) // self.compact_every != last // self.compact_every
                break
        if compact:
            await self._compact()
        return result

    async def _commit(self, log: Log, state: State, changes: list[Any]) -> tuple[int, int] | None:
        """Append a transaction planned on ``state``; return its first and last sequence, or ``None`` when
        the log had moved on (the replica has then read further)."""
        txn = self._token()
        parts = encode_parts(changes, max(4096, log.max_payload - 1024))
        self._inflight = (txn, changes) if len(parts) == 1 else None
        try:
            return await self._publish(log, state, txn, changes, parts)
        finally:
            self._inflight = None

    async def _publish(
        self, log: Log, state: State, txn: str, changes: list[Any], parts: list[bytes]
    ) -> tuple[int, int] | None:
        start = state.seq
        for index, body in enumerate(parts):
            try:
                seq = await log.publish(body, expected=start + index, txn=txn, part=index, parts=len(parts))
            except StreamMissing:
                raise BackendError(
                    f"the streams of prefix {self.prefix!r} at {log.shown} were deleted while this backend "
                    "was open"
                ) from None
            except Conflict as conflict:
                target = conflict.last if conflict.last is not None else await log.head()
                await self._reach(target)
                return None
            if seq != start + index + 1:  # not checked by the server: never counted as written
                await self._reach(seq)
                return None
        last = start + len(parts)
        if self._state is state and state.seq < last:
            state.seq = last
            state.partial = None
            try:
                state.apply(changes)
            except Exception:  # a bug: the log holds the transaction; read the store again
                _log.exception(
                    "could not apply a transaction of prefix %r; reading the store again", self.prefix
                )
                self._stale = True
            self._notify()
            self._wake()
        return start + 1, last

    async def _genesis(self, log: Log) -> None:
        """The log's first message (so that every later one expects a sequence above zero)."""
        body = encode_parts([], 4096)[0]
        try:
            await log.publish(body, expected=0, txn=_GENESIS)
        except Conflict:
            pass
        await self._reach(await log.head())

    async def _compact(self) -> None:
        """Write a snapshot of the replica; delete the log before the previous snapshot, and the snapshots
        before that one."""
        if self._compacting or self._log is None:
            return
        log = self._log
        self._compacting = True
        try:
            state = self._state
            if state.partial is not None:
                return
            previous = await log.pointer()
            if previous is not None and previous.seq >= state.seq:
                return
            seq, rows, windows, buckets, paused, groups = state.snapshot_parts()
            data = await anyio.to_thread.run_sync(
                encode_snapshot, seq, rows, windows, buckets, paused, groups
            )
            if not await log.write_snapshot(seq, data, previous):
                return
            if previous is not None:
                await log.purge_log_below(previous.seq + 1)
                await log.purge_snapshots_below(min(previous.chunks, default=previous.message))
            _log.debug("snapshot of prefix %r at %d (%d bytes)", self.prefix, seq, len(data))
        except Exception as exc:  # a snapshot is an optimisation: the next one tries again
            _log.warning("could not write a snapshot of prefix %r: %r", self.prefix, exc)
        finally:
            self._compacting = False

    # -- the worker's path ----------------------------------------------------------------------------------

    async def enqueue_many(
        self, tasks: Sequence[NewTask], *, if_exists: Literal["error", "skip", "debounce"] = "error"
    ) -> list[str]:
        """Store ``tasks`` in one transaction; see :meth:`Backend.enqueue_many`."""
        if if_exists not in ("error", "skip", "debounce"):
            raise ValueError(f"if_exists must be 'error', 'skip' or 'debounce', got {if_exists!r}")
        self._opened()
        if not tasks:
            return []
        return await self._transact(lambda tx: ops.enqueue(tx, tasks, if_exists), creates=True)

    async def claim(
        self,
        queues: Sequence[str],
        limit: int,
        *,
        now: float,
        lease_until: float,
        limits: Mapping[str, FlowLimits] | None = None,
    ) -> list[ClaimedTask]:
        """Lease up to ``limit`` due tasks in one transaction that checks the flow limits, skips paused queues
        and cancels expired tasks; see :meth:`Backend.claim`."""
        self._opened()
        if not queues or limit <= 0:
            return []
        return await self._transact(
            lambda tx: ops.claim(tx, queues, limit, now, lease_until, limits, self._token), creates=True
        )

    async def extend_leases(self, leases: Sequence[tuple[str, str]], *, lease_until: float) -> set[str]:
        """Renew every held lease in one transaction; see :meth:`Backend.extend_leases`."""
        self._opened()
        if not leases:
            return set()
        return await self._transact(lambda tx: ops.extend(tx, leases, lease_until), creates=False)

    async def settle(self, settlements: Sequence[Settlement]) -> set[str]:
        """Apply every settlement (with its ``then`` tasks) in one transaction; see :meth:`Backend.settle`."""
        self._opened()
        if not settlements:
            return set()
        return await self._transact(lambda tx: ops.settle(tx, settlements), creates=False)

    async def reclaim_expired(self, *, now: float, lease_until: float, limit: int) -> list[ClaimedTask]:
        """Take over up to ``limit`` expired leases; see :meth:`Backend.reclaim_expired`."""
        self._opened()
        if limit <= 0:
            return []
        return await self._transact(
            lambda tx: ops.reclaim(tx, now, lease_until, limit, self._token), creates=False
        )

    async def wait_for_work(self, queues: Sequence[str], *, timeout: float) -> None:
        """Return when a task of ``queues`` (paused ones left out) becomes claimable as the log reports it
        (enqueued, released, resumed) or the earliest delayed one is due, or after ``timeout`` seconds; see
        :meth:`Backend.wait_for_work`. No request to the server: the log's messages are pushed to this
        process.

        Work that is already due is reported once per change of the store, so a caller that cannot claim it
        (its clock disagrees, or flow limits hold it back) waits instead of spinning.
        """
        self._opened()
        deadline = anyio.current_time() + max(0.0, timeout)
        key = tuple(dict.fromkeys(queues))
        while True:
            state = self._state
            due = state.earliest(key)
            now = time.time()
            if due is not None and due <= now:
                reported = (key, id(state), state.version)
                if reported != self._reported:
                    self._reported = reported
                    await anyio.lowlevel.checkpoint()
                    return
            remaining = deadline - anyio.current_time()
            if (
                remaining <= 0 or self._log is None or self._stale or self._refollow
            ):  # stale, or reconnected: the next claim reads the store again, or follows the log again
                await anyio.lowlevel.checkpoint()
                return
            pause = remaining if due is None or due <= now else min(remaining, due - now)
            if self._changed is None:
                self._changed = anyio.Event()
            changed = self._changed
            with anyio.move_on_after(pause):
                await changed.wait()

    async def pause(self, queue: str) -> None:
        """Stop every worker from claiming tasks of ``queue`` until :meth:`resume` (stored in the log)."""
        self._opened()
        await self._transact(lambda tx: ops.set_paused(tx, queue, True), creates=True)

    async def resume(self, queue: str) -> None:
        """Let workers claim tasks of ``queue`` again."""
        self._opened()
        await self._transact(lambda tx: ops.set_paused(tx, queue, False), creates=False)

    async def paused(self) -> set[str]:
        """The paused queues."""
        state = await self._current()
        return set() if state is None else set(state.paused)

    async def flow_state(
        self, name: str, concurrency_key: str | None, *, now: float, limits: FlowLimits
    ) -> FlowState:
        """The running counts of ``name`` (and of its ``concurrency_key``) and its bucket at ``now``."""
        state = await self._current()
        return ops.flow_state(state or State(), name, concurrency_key, now, limits)

    # -- inspection and operator actions --------------------------------------------------------------------

    async def get(self, task_id: str) -> TaskRecord | None:
        """The record with this id, or ``None`` (read from the replica once it is current)."""
        state = await self._current()
        return None if state is None else ops.get(state, task_id)

    async def list_records(
        self,
        *,
        states: Collection[TaskState] | None = None,
        queue: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[TaskRecord]:
        """Records matching the filters, newest ``enqueued_at`` first; see :meth:`Backend.list_records`."""
        state = await self._current()
        return [] if state is None else ops.list_records(state, states, queue, limit, offset)

    async def stats(self) -> Mapping[str, Mapping[TaskState, int]]:
        """The number of records per queue and state (states without records are left out)."""
        state = await self._current()
        return {} if state is None else state.stats()

    async def cancel(self, task_ids: Sequence[str], *, now: float) -> list[str]:
        """Cancel the ``PENDING`` tasks among ``task_ids`` and ask the ``ACTIVE`` ones to stop, in one
        transaction (a pending member's group ends with it); see :meth:`Backend.cancel`. Every process
        following the log learns of a request as soon as it is stored (a ``"cancel"`` notice)."""
        self._opened()
        if not task_ids:
            return []
        return await self._transact(lambda tx: ops.cancel(tx, task_ids, now), creates=False)

    async def cancel_requests(self, task_ids: Sequence[str]) -> set[str]:
        """The ``ACTIVE`` tasks among ``task_ids`` whose cancellation was asked (read from the replica once
        it is current); see :meth:`Backend.cancel_requests`."""
        if not task_ids:
            self._opened()
            return set()
        state = await self._current()
        return set() if state is None else ops.cancel_requests(state, task_ids)

    async def save_progress(self, updates: Sequence[ProgressUpdate]) -> set[str]:
        """Store each update whose lease is held, in one transaction; return the ids whose lease was lost;
        see :meth:`Backend.save_progress`."""
        self._opened()
        if not updates:
            return set()
        return await self._transact(lambda tx: ops.save_progress(tx, updates), creates=False)

    async def enqueue_group(self, group: NewGroup) -> str:
        """Store ``group`` and its members in one transaction, or nothing (:class:`DuplicateTaskError`); see
        :meth:`Backend.enqueue_group`. Its ``then`` is stored by the transaction that settles the last
        member's success."""
        self._opened()
        return await self._transact(lambda tx: ops.enqueue_group(tx, group), creates=True)

    async def get_group(self, group_id: str) -> GroupRecord | None:
        """The group with this id, or ``None`` (read from the replica once it is current)."""
        state = await self._current()
        return None if state is None else ops.get_group(state, group_id)

    async def wait_for_notices(self, *, timeout: float) -> list[Notice]:
        """The notices since the last call, read from the log as this process applies it (a settlement, a
        cancellation: whichever process stored it), waiting up to ``timeout`` seconds for the first; see
        :meth:`NotifyingBackend.wait_for_notices`. The first call starts collecting them. One caller at a
        time."""
        self._opened()
        if self._notices is None:
            self._notices = []
            self._state.notices = self._notices
        notices = self._notices
        if not notices:
            if self._noticed is None:
                self._noticed = anyio.Event()
            noticed = self._noticed
            with anyio.move_on_after(max(0.0, timeout)):
                await noticed.wait()
        await anyio.lowlevel.checkpoint()
        batch = notices[:_NOTICE_BATCH]
        del notices[: len(batch)]
        return batch

    async def requeue(
        self, task_ids: Sequence[str] | None = None, *, queue: str | None = None, now: float
    ) -> int:
        """Move ``DEAD``/``CANCELLED`` tasks back to ``PENDING``; see :meth:`Backend.requeue`. With
        ``task_ids`` it is one transaction; without, dead tasks move in transactions of 5 000."""
        self._opened()
        if task_ids is not None:
            if not task_ids:
                return 0
            return await self._transact(lambda tx: ops.requeue(tx, task_ids, queue, now, 0), creates=False)
        moved = 0
        while True:
            count = await self._transact(lambda tx: ops.requeue(tx, None, queue, now, _CHUNK), creates=False)
            moved += count
            if count < _CHUNK:
                return moved

    async def purge(
        self,
        *,
        states: Collection[TaskState],
        queue: str | None = None,
        before: float | None = None,
        limit: int | None = None,
    ) -> int:
        """Delete records in ``states``; see :meth:`Backend.purge`. Works in transactions of 5 000 records
        (so a large purge is not atomic as a whole)."""
        self._opened()
        wanted = {TaskState(state) for state in states}
        if not wanted or (limit is not None and limit <= 0):
            return 0
        deleted = 0
        while limit is None or deleted < limit:
            most = _CHUNK if limit is None else min(_CHUNK, limit - deleted)
            count = await self._transact(
                lambda tx, most=most: ops.purge(tx, wanted, queue, before, most),  # type: ignore[misc]
                creates=False,
            )
            deleted += count
            if count < most:
                break
        return deleted

    async def clear(self) -> int:
        """Delete both streams of this prefix: every task of every queue, in any state, and the log. Returns
        how many task records there were. For tests and for decommissioning an application; stop the
        workers first."""
        log = self._opened()
        state = await self._current()
        count = 0 if state is None else len(state.rows)
        await log.stop_following()
        await log.delete()
        self._generation += 1
        self._state = State()
        self._present = False
        return count


def _check_url(url: object) -> None:
    if not isinstance(url, str) or not url:
        raise TypeError(
            f"NatsBackend(url=...) must be a URL string such as 'nats://127.0.0.1:4222', got {url!r}"
        )
    for server in url.split(","):
        parts = split_url(server.strip(), caller="NatsBackend")
        shown = redact(url, url)
        if parts.scheme.lower() not in _SCHEMES or not parts.hostname:
            raise ValueError(
                "NatsBackend(url=...) takes nats://host:port (or tls://, ws://, wss://; a comma-separated "
                f"list for a cluster), got {shown!r}"
            )
        if parts.query or (parts.path not in ("", "/")):
            raise ValueError(
                f"NatsBackend(url=...) takes no path or options in the URL, got {shown!r}: pass prefix= and "
                "replicas= as arguments (backend_from_url reads ?prefix= and ?replicas=)"
            )
