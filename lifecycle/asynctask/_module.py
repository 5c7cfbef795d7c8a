"""``AsyncTasks``: durable asynchronous tasks as one managed lifecycle Task."""

from __future__ import annotations

import builtins
import logging
import math
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from types import TracebackType
from typing import Any, TypeVar, overload

import anyio

from .._backoff import Backoff
from ._backend import Backend, TransactionalBackend
from ._clock import Clock, as_epoch, as_seconds
from ._encoding import Encoding, JSONEncoding
from ._model import Call, QueueStats, TaskInfo, describe_target
from ._queues import QueueOrder
from ._records import NewTask, TaskRecord, TaskState
from ._registry import (
    DEFAULT_MAX_RETRIES,
    DEFAULT_QUEUE,
    Registry,
    TaskDefinition,
    check_max_retries,
    check_queue,
    check_timeout,
)
from ._verdict import Policy
from ._worker import EngineOptions, Worker, purge_expired, recover_expired

__all__ = ["DEFAULT_RETENTION", "AsyncTasks"]

F = TypeVar("F", bound=Callable[..., Any])

DEFAULT_RETENTION: Mapping[TaskState, float | None] = {
    TaskState.SUCCEEDED: 86_400.0,
    TaskState.DEAD: 7 * 86_400.0,
    TaskState.CANCELLED: 7 * 86_400.0,
}
"""How long finished tasks are kept by default (seconds after they finished): succeeded 1 day, dead and
cancelled 7 days."""


class AsyncTasks:
    """Durable asynchronous tasks: register functions, enqueue calls, and run them in workers.

    An ``AsyncTasks`` is a :class:`lifecycle.Task`: ``initialize`` opens the backend, ``execute`` runs the
    worker engine (unless ``execution=False``), and cancelling ``execute`` (what a ``TaskManager`` does at
    shutdown) drains it: no new claims, running tasks get ``shutdown_grace`` seconds to finish, the rest are
    cancelled and returned to pending without counting an attempt. ``cleanup`` closes the backend.

    Args:
        backend: where tasks are stored (``MemoryBackend()``, ``SQLiteBackend("tasks.db")``, Redis, Postgres).
        execution: ``False`` for an enqueue-only process (a producer): ``execute`` then just waits.
        concurrency: how many tasks run at once in this process.
        queues: the queues this worker takes tasks from: a list is strict priority (earlier first), a mapping
            ``name -> weight`` is weighted random order per claim (asynq style).
        encoding: how arguments and results are stored; ``JSONEncoding()`` by default.
        shutdown_grace: seconds running tasks may take to finish at shutdown before they are cancelled.
        on_error: called as ``on_error(info, exc)`` (plain or async) after every failed attempt, with the
            task as it will be stored (``pending`` for a retry, ``dead``); its exceptions are logged.
        lease: seconds a claim holds a task without a heartbeat; heartbeats renew it every ``lease / 3``. A
            dead worker's tasks are run again after about this long.
        recovery_interval: seconds between looks for expired leases (default ``lease / 2``).
        poll_interval: the longest an idle worker waits before claiming again even without a wake-up.
        retry_backoff: delays between retries: exponential with full jitter (``Backoff(initial=1, cap=600)``).
        retention: seconds to keep finished tasks per final state (``None``: forever), merged over
            :data:`DEFAULT_RETENTION`; purged by every executing worker every ``retention_interval`` seconds.
        clock: the time source for everything stored (default ``time.time``); tests pass a manual clock.
        rng: the random source for jitter and weighted queue order (tests pass a seeded one).

    Raises ``TypeError``/``ValueError`` naming a bad option.

    Example::

        tasks = AsyncTasks(SQLiteBackend("tasks.db"), concurrency=20)

        @tasks.register
        async def send_mail(ctx: TaskContext, to: str) -> None: ...

        manager.add_task("async-tasks", tasks)
        # later, anywhere: await tasks.enqueue(send_mail, "a@example.com")
    """

    def __init__(
        self,
        backend: Backend,
        *,
        execution: bool = True,
        concurrency: int = 10,
        queues: Mapping[str, int] | Sequence[str] = (DEFAULT_QUEUE,),
        encoding: Encoding | None = None,
        shutdown_grace: float = 10.0,
        on_error: Callable[[TaskInfo, BaseException], Awaitable[None] | None] | None = None,
        lease: float = 30.0,
        recovery_interval: float | None = None,
        poll_interval: float = 1.0,
        retry_backoff: Backoff = Backoff(initial=1.0, cap=600.0),  # noqa: B008 - frozen, shared safely
        retention: Mapping[TaskState | str, float | timedelta | None] | None = None,
        retention_interval: float = 60.0,
        clock: Clock = time.time,
        rng: random.Random | None = None,
    ) -> None:
        if not isinstance(backend, Backend):
            raise TypeError(
                f"AsyncTasks needs a Backend (MemoryBackend(), SQLiteBackend(path), ...), got {backend!r}"
            )
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise ValueError(f"concurrency must be an int >= 1, got {concurrency!r}")
        if encoding is not None and not isinstance(encoding, Encoding):
            raise TypeError(f"encoding must have encode() and decode() (an Encoding), got {encoding!r}")
        if on_error is not None and not callable(on_error):
            raise TypeError(f"on_error must be a callable taking (TaskInfo, exception), got {on_error!r}")
        if not isinstance(retry_backoff, Backoff):
            raise TypeError(f"retry_backoff must be a lifecycle.Backoff, got {retry_backoff!r}")
        if not callable(clock):
            raise TypeError(f"clock must be a callable returning seconds since the epoch, got {clock!r}")
        self._rng = rng if rng is not None else random.Random()
        lease = _positive(lease, "lease")
        self._backend = backend
        self._execution = bool(execution)
        self._encoding: Encoding = encoding if encoding is not None else JSONEncoding()
        self._registry = Registry()
        self._clock = clock
        self._logger = logging.getLogger("lifecycle.asynctask")
        self._options = EngineOptions(
            concurrency=concurrency,
            queues=QueueOrder(queues, self._rng),
            lease=lease,
            poll_interval=_positive(poll_interval, "poll_interval"),
            recovery_interval=_positive(
                lease / 2 if recovery_interval is None else recovery_interval, "recovery_interval"
            ),
            retention=_retention(retention),
            retention_interval=_positive(retention_interval, "retention_interval"),
            shutdown_grace=as_seconds(shutdown_grace, "shutdown_grace"),
            clock=clock,
            policy=Policy(retry_backoff, self._rng),
            on_error=on_error,
        )
        self._open = False
        self._worker: Worker | None = None
        self._changed: anyio.Event | None = None

    def __repr__(self) -> str:
        return f"AsyncTasks({self._backend!r}, tasks={len(self._registry)}, execution={self._execution})"

    # -- configuration --------------------------------------------------------------------------------------

    @property
    def backend(self) -> Backend:
        """The backend tasks are stored in."""
        return self._backend

    @property
    def encoding(self) -> Encoding:
        """The encoding of arguments and results (register your classes on it)."""
        return self._encoding

    @property
    def execution(self) -> bool:
        """Whether ``execute`` runs workers (``False``: enqueue-only)."""
        return self._execution

    @property
    def concurrency(self) -> int:
        """How many tasks this process runs at once."""
        return self._options.concurrency

    @property
    def queues(self) -> tuple[str, ...]:
        """The queues this process's worker takes tasks from."""
        return self._options.queues.names

    @property
    def task_names(self) -> builtins.list[str]:
        """Every registered task name, sorted."""
        return self._registry.names()

    @overload
    def register(
        self,
        fn: F,
        /,
        *,
        name: str | None = None,
        queue: str | None = None,
        max_retries: int | None = None,
        timeout: float | timedelta | None = None,
    ) -> F: ...

    @overload
    def register(
        self,
        fn: None = None,
        /,
        *,
        name: str | None = None,
        queue: str | None = None,
        max_retries: int | None = None,
        timeout: float | timedelta | None = None,
    ) -> Callable[[F], F]: ...

    def register(
        self,
        fn: Callable[..., Any] | None = None,
        /,
        *,
        name: str | None = None,
        queue: str | None = None,
        max_retries: int | None = None,
        timeout: float | timedelta | None = None,
    ) -> Any:
        """Register a task function and return it unchanged (``@tasks.register`` or ``@tasks.register(...)``).

        The function is an ``async def`` (a plain ``def`` runs in a worker thread) with fixed positional
        parameters; its first parameter may be annotated ``TaskContext``. ``name`` defaults to
        ``module.qualname`` and is required for lambdas, closures and functions defined inside functions.
        ``queue`` (default ``"default"``), ``max_retries`` (default 5) and ``timeout`` (seconds, default none)
        are the defaults of its enqueues.

        Raises ``TypeError`` saying what to change when the function breaks a rule, ``ValueError`` when the
        name is registered already for another function.
        """
        if fn is None:
            return lambda real: self.register(
                real, name=name, queue=queue, max_retries=max_retries, timeout=timeout
            )
        seconds = check_timeout(timeout, f"register({describe_target(fn)})")
        self._registry.add(fn, name=name, queue=queue, max_retries=max_retries, timeout=seconds)
        return fn

    # -- enqueue --------------------------------------------------------------------------------------------

    async def enqueue(
        self,
        fn: Callable[..., Any] | str,
        /,
        *args: Any,
        delay: float | timedelta | None = None,
        at: datetime | float | None = None,
        queue: str | None = None,
        max_retries: int | None = None,
        timeout: float | timedelta | None = None,
        task_id: str | None = None,
        connection: object | None = None,
    ) -> str:
        """Store a call of ``fn`` (a registered function, or a registered name) and return its task id.

        ``args`` are positional and checked before anything is stored: their number against the function's
        signature, and that the encoding can encode each (``TypeError`` otherwise). A name registered only in
        other processes is accepted; then only encodability is checked. ``delay`` (seconds or ``timedelta``)
        or ``at`` (an aware ``datetime``, or seconds since the epoch) defers the task. ``queue``,
        ``max_retries`` and ``timeout`` override the registered defaults. ``task_id`` makes the enqueue
        idempotent: while a task with that id is pending or active, :class:`DuplicateTaskError` is raised;
        a finished one is replaced. ``connection`` (a :class:`TransactionalBackend` only, e.g. a psycopg
        connection for ``PostgresBackend``) stores the task in your transaction: it exists if and only if
        you commit.

        Returns once the backend has stored the task durably.
        """
        call = Call(
            fn,
            *args,
            delay=delay,
            at=at,
            queue=queue,
            max_retries=max_retries,
            timeout=timeout,
            task_id=task_id,
        )
        ids = await self.enqueue_many([call], connection=connection)
        return ids[0]

    async def enqueue_many(
        self, calls: Iterable[Call], *, connection: object | None = None
    ) -> builtins.list[str]:
        """Store several calls in one backend round trip (all or nothing) and return their ids in order.

        Each :class:`Call` is checked like :meth:`enqueue`; one bad call stores nothing. A ``task_id``
        conflict raises :class:`DuplicateTaskError` and stores nothing of the batch.
        """
        now = self._clock()
        tasks = [self._new_task(call, now) for call in _calls(calls)]
        if connection is not None:
            backend = self._backend
            if not isinstance(backend, TransactionalBackend):
                raise TypeError(
                    "connection= needs a backend that can join your transaction (a TransactionalBackend "
                    f"such as PostgresBackend); {type(backend).__name__} cannot: drop connection="
                )
            return await backend.enqueue_many_in(connection, tasks)
        self._check_open("enqueue")
        if not tasks:
            return []
        ids = await self._backend.enqueue_many(tasks)
        worker = self._worker
        if worker is not None and any(task.run_at <= now for task in tasks):
            worker.wake()
        self._notify_changed()
        return ids

    def _new_task(self, call: Call, now: float) -> NewTask:
        target = call.target
        definition: TaskDefinition | None
        if isinstance(target, str):
            if not target:
                raise TypeError("enqueue() needs a task function or a non-empty registered name, got ''")
            definition = self._registry.get(target)
            name = target
        else:
            definition = self._registry.for_function(target)
            if definition is None:
                raise TypeError(
                    f"{describe_target(target)} is not registered with this AsyncTasks: decorate it with "
                    "@tasks.register (or enqueue it by its registered name)"
                )
            name = definition.name
        where = f"enqueue({name!r})"
        if definition is not None:
            definition.check_arity(len(call.args))
        queue = (
            check_queue(call.queue, where)
            if call.queue is not None
            else (definition.queue if definition is not None else DEFAULT_QUEUE)
        )
        if call.max_retries is not None:
            max_retries = check_max_retries(call.max_retries, where)
        else:
            max_retries = definition.max_retries if definition is not None else DEFAULT_MAX_RETRIES
        if call.timeout is not None:
            timeout = check_timeout(call.timeout, where)
        else:
            timeout = definition.timeout if definition is not None else None
        if call.delay is not None and call.at is not None:
            raise TypeError(f"{where}: pass delay= or at=, not both")
        run_at = now
        if call.delay is not None:
            run_at = now + as_seconds(call.delay, f"{where} delay")
        elif call.at is not None:
            run_at = as_epoch(call.at, f"{where} at")
        task_id = call.task_id
        if task_id is None:
            task_id = uuid.uuid4().hex
        elif not isinstance(task_id, str) or not task_id:
            raise TypeError(f"{where}: task_id must be a non-empty string, got {task_id!r}")
        return NewTask(
            id=task_id,
            name=name,
            queue=queue,
            payload=self._encode_arguments(name, call.args, definition),
            max_retries=max_retries,
            timeout=timeout,
            enqueued_at=now,
            run_at=run_at,
        )

    def _encode_arguments(self, name: str, args: tuple[Any, ...], definition: TaskDefinition | None) -> bytes:
        try:
            return self._encoding.encode(args)
        except TypeError as whole:
            for index, arg in enumerate(args):
                try:
                    self._encoding.encode(arg)
                except TypeError as exc:
                    names = definition.parameter_names if definition is not None else ()
                    which = f"argument {index + 1}" + (f" ({names[index]})" if index < len(names) else "")
                    raise TypeError(f"cannot enqueue {name!r}: {which}: {exc}") from None
            raise TypeError(f"cannot enqueue {name!r}: {whole}") from None

    # -- inspection and operations --------------------------------------------------------------------------

    async def info(self, task_id: str) -> TaskInfo | None:
        """The task with this id, or ``None`` (never stored, or removed by retention or :meth:`purge`)."""
        self._check_open("info")
        record = await self._backend.get(task_id)
        return None if record is None else self._info(record)

    async def list(
        self,
        *,
        state: TaskState | str | Collection[TaskState | str] | None = None,
        queue: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> builtins.list[TaskInfo]:
        """Tasks, newest first, optionally of one or several states and of one queue."""
        self._check_open("list")
        states = None if state is None else _states(state)
        records = await self._backend.list_records(states=states, queue=queue, limit=limit, offset=offset)
        return [self._info(record) for record in records]

    async def stats(self) -> dict[str, QueueStats]:
        """The number of tasks per queue and state, by queue name."""
        self._check_open("stats")
        counts = await self._backend.stats()
        return {
            queue: QueueStats(**{TaskState(state).value: count for state, count in per_state.items()})
            for queue, per_state in sorted(counts.items())
        }

    async def cancel(self, task_id: str) -> bool:
        """Cancel a pending task (it will not run); ``False`` when it is not pending (running, finished,
        unknown). A running task cannot be cancelled."""
        self._check_open("cancel")
        cancelled = bool(await self._backend.cancel([task_id], now=self._clock()))
        self._notify_changed()
        return cancelled

    async def requeue(self, task_id: str) -> bool:
        """Move a dead or cancelled task back to pending, attempts reset; ``False`` when it is in another
        state or unknown."""
        self._check_open("requeue")
        moved = await self._backend.requeue([task_id], now=self._clock()) > 0
        if moved and self._worker is not None:
            self._worker.wake()
        return moved

    async def requeue_dead(self, queue: str | None = None) -> int:
        """Move every dead task (of ``queue`` when given) back to pending; returns how many moved."""
        self._check_open("requeue_dead")
        moved = await self._backend.requeue(None, queue=queue, now=self._clock())
        if moved and self._worker is not None:
            self._worker.wake()
        return moved

    async def purge(
        self,
        state: TaskState | str | Collection[TaskState | str],
        *,
        queue: str | None = None,
        older_than: float | timedelta | None = None,
    ) -> int:
        """Delete tasks in ``state`` (one or several; not ``active``), of ``queue`` when given, finished
        (or, if pending, enqueued) more than ``older_than`` seconds ago when given. Returns how many."""
        self._check_open("purge")
        states = _states(state)
        if TaskState.ACTIVE in states:
            raise ValueError("purge() cannot delete active tasks: a worker owns them; wait until they finish")
        before = None if older_than is None else self._clock() - as_seconds(older_than, "purge() older_than")
        return await self._backend.purge(states=states, queue=queue, before=before)

    async def purge_expired(self) -> int:
        """Apply the retention now (executing workers do it every ``retention_interval``); returns how many
        tasks were deleted."""
        self._check_open("purge_expired")
        return await purge_expired(self._backend, self._options)

    async def recover_expired(self) -> int:
        """Recover now the tasks whose worker died (lease expired): each is retried, or dead when out of
        retries (executing workers do it every ``recovery_interval``). Returns how many were recovered."""
        self._check_open("recover_expired")
        worker = self._worker
        if worker is not None:
            return await worker.recover_expired()
        recovered = await recover_expired(self._backend, self._options, None, None, self._logger)
        self._notify_changed()
        return recovered

    async def wait(
        self,
        task_id: str,
        *,
        timeout: float | None = None,
        states: Collection[TaskState | str] | None = None,
    ) -> TaskInfo:
        """Wait until the task is in one of ``states`` (default: finished: succeeded, dead or cancelled) and
        return it.

        A worker in this process wakes the waiter as soon as it saves a verdict; changes made by other
        processes are seen by polling every ``poll_interval``. Raises ``TimeoutError`` after ``timeout``
        seconds, ``LookupError`` when there is no task with this id (never stored, or purged).

        Example::

            task_id = await tasks.enqueue(resize, "photo.png")
            info = await tasks.wait(task_id, timeout=30)
            print(info.state, info.result)
        """
        self._check_open("wait")
        wanted = _states(states) if states is not None else {s for s in TaskState if s.is_final}
        return await self._wait_for(task_id, lambda info: info.state in wanted, timeout)

    async def _wait_for(
        self, task_id: str, predicate: Callable[[TaskInfo], bool], timeout: float | None
    ) -> TaskInfo:
        with anyio.fail_after(timeout):
            while True:
                changed = self._changed = self._changed or anyio.Event()
                info = await self.info(task_id)
                if info is None:
                    raise LookupError(f"there is no task with id {task_id!r} (never stored, or purged)")
                if predicate(info):
                    return info
                with anyio.move_on_after(self._options.poll_interval):
                    await changed.wait()

    def _notify_changed(self) -> None:
        changed, self._changed = self._changed, None
        if changed is not None:
            changed.set()

    def _info(self, record: TaskRecord) -> TaskInfo:
        result = None
        if record.result is not None:
            try:
                result = self._encoding.decode(record.result)
            except ValueError as exc:
                self._logger.warning("cannot decode the result of task %s: %s", record.id, exc)
        return TaskInfo(
            id=record.id,
            name=record.name,
            queue=record.queue,
            state=record.state,
            attempts=record.attempts,
            max_retries=record.max_retries,
            enqueued_at=record.enqueued_at,
            run_at=record.run_at,
            last_error=record.last_error,
            result=result,
            timeout=record.timeout,
            started_at=record.started_at,
            finished_at=record.finished_at,
        )

    def _check_open(self, what: str) -> None:
        if not self._open:
            raise RuntimeError(
                f"AsyncTasks.{what}() before the backend is open: add the AsyncTasks to a TaskManager (its "
                "initialize opens the backend), or use `async with tasks:`"
            )

    # -- the lifecycle Task ---------------------------------------------------------------------------------

    async def initialize(self) -> None:
        """Open the backend."""
        await self._backend.open()
        self._open = True

    async def execute(self) -> None:
        """Run the worker engine until cancelled, then drain (see the class docstring); with
        ``execution=False``, wait until cancelled."""
        if not self._execution:
            await anyio.sleep_forever()
        self._check_open("execute")
        if self._worker is not None:
            raise RuntimeError("this AsyncTasks is executing already: run one execute() at a time")
        worker = Worker(
            self._backend, self._registry, self._encoding, self._options, self._logger, self._notify_changed
        )
        self._worker = worker
        done = anyio.Event()
        crash: BaseException | None = None

        async def engine() -> None:
            nonlocal crash
            # Shielded: the manager's cancellation must not kill running tasks; the finally below drains.
            with anyio.CancelScope(shield=True):
                try:
                    await worker.serve()
                except BaseException as exc:
                    crash = exc
                finally:
                    done.set()

        try:
            async with anyio.create_task_group() as group:
                group.start_soon(engine)
                try:
                    await done.wait()
                finally:
                    worker.stop()
                    with anyio.CancelScope(shield=True):
                        await done.wait()
                    if crash is not None:
                        raise crash
        finally:
            self._worker = None

    async def cleanup(self) -> None:
        """Close the backend."""
        self._open = False
        await self._backend.close()

    async def __aenter__(self) -> AsyncTasks:
        """``async with tasks:`` opens the backend (for producers and scripts without a TaskManager)."""
        await self.initialize()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """Close the backend."""
        with anyio.CancelScope(shield=True):
            await self.cleanup()


def _calls(calls: Iterable[Call]) -> list[Call]:
    if isinstance(calls, Call):
        raise TypeError("enqueue_many() takes a list of Call objects; for one call use enqueue()")
    items = list(calls)
    for item in items:
        if not isinstance(item, Call):
            raise TypeError(f"enqueue_many() takes Call objects, got {item!r}; write Call(fn, *args)")
    return items


def _states(state: TaskState | str | Collection[TaskState | str]) -> set[TaskState]:
    values = [state] if isinstance(state, TaskState | str) else list(state)
    try:
        return {TaskState(value) for value in values}
    except ValueError:
        known = ", ".join(s.value for s in TaskState)
        raise ValueError(f"unknown task state in {state!r}; use one of: {known}") from None


def _positive(value: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
        raise ValueError(f"{name} must be a positive, finite number of seconds, got {value!r}")
    return float(value)


def _retention(
    retention: Mapping[TaskState | str, float | timedelta | None] | None,
) -> dict[TaskState, float | None]:
    merged: dict[TaskState, float | None] = dict(DEFAULT_RETENTION)
    for key, age in (retention or {}).items():
        try:
            state = TaskState(key)
        except ValueError:
            raise ValueError(f"retention: unknown state {key!r}; use succeeded, dead or cancelled") from None
        if not state.is_final:
            raise ValueError(
                f"retention: {state.value} tasks are not finished and are never purged automatically; "
                "give retention for succeeded, dead or cancelled"
            )
        merged[state] = None if age is None else as_seconds(age, f"retention[{state.value!r}]")
    return merged
