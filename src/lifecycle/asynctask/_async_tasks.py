"""``AsyncTasks``: durable asynchronous tasks as one managed lifecycle Task."""

from __future__ import annotations

import builtins
import dataclasses
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from types import TracebackType
from typing import Any, TypeVar, overload

import anyio

from .._core._backoff import Backoff
from .._metrics import Metrics
from .._redact import library_logger
from ._backend import Backend, TransactionalBackend, open_backend
from ._clock import Clock, as_seconds
from ._encoding import Encoding, JSONEncoding
from ._engine._options import DEFAULT_RETENTION, check_positive, check_retention
from ._engine._queues import QueueOrder
from ._engine._verdict import Policy, find_request
from ._engine._worker import EngineOptions, Worker
from ._enqueue import build_task, check_calls
from ._model import Call, TaskInfo, describe_target
from ._observer import TaskObserver, observe_enqueued, resolve_observer, track_queue_depths
from ._records import TaskState
from ._registry import (
    DEFAULT_QUEUE,
    Registry,
    check_timeout,
)
from ._schedule import Scheduler
from ._scheduling import SchedulingOperations

__all__ = ["DEFAULT_RETENTION", "AsyncTasks"]

F = TypeVar("F", bound=Callable[..., Any])


class AsyncTasks(SchedulingOperations):
    """Durable asynchronous tasks: register functions, enqueue calls, and run them in workers.

    An ``AsyncTasks`` is a :class:`lifecycle.Task`: ``initialize`` opens the backend, ``execute`` runs the
    worker engine (unless ``execution=False``), and cancelling ``execute`` (what a ``TaskManager`` does at
    shutdown) drains it: no new claims, running tasks get ``shutdown_grace`` seconds to finish, the rest are
    cancelled and returned to pending without counting an attempt. ``cleanup`` closes the backend.

    Args:
        backend: where tasks are stored (``MemoryBackend()``, ``SQLiteBackend("tasks.db")``, Redis, Postgres).
        execution: ``False`` for an enqueue-only process (a producer): ``execute`` then just waits, and a
            built-in backend's storage, when missing, is created by the first enqueue instead of at open.
        concurrency: how many tasks run at once in this process.
        queues: the queues this worker takes tasks from: a list is strict priority (earlier first), a mapping
            ``name -> weight`` is weighted random order per claim (asynq style).
        encoding: how arguments and results are stored; ``JSONEncoding()`` by default.
        shutdown_grace: seconds running tasks may take to finish at shutdown before they are cancelled.
        on_error: called as ``on_error(info, exc)`` (plain or async) after every failed attempt, with the
            task as it will be stored (``pending`` for a retry, ``dead``); its exceptions are logged.
        lease: seconds a claim holds a task without a heartbeat; heartbeats renew it every ``lease / 3``. A
            dead worker's tasks are taken over at most ``lease + recovery_interval`` after it died (then run
            after their retry backoff). The worker also warns, naming the task, when its event loop is
            blocked longer than ``lease / 3``.
        recovery_interval: seconds between looks for expired leases (default ``lease / 2``).
        poll_interval: the longest an idle worker waits before claiming again even without a wake-up.
        retry_backoff: delays between retries: exponential with full jitter (``Backoff(initial=1, cap=600)``).
        retention: seconds to keep finished tasks per final state (``None``: forever), merged over
            :data:`DEFAULT_RETENTION`; purged by every executing worker every ``retention_interval`` seconds.
        clock: the time source for everything stored (default ``time.time``); tests pass a manual clock.
        rng: the random source for jitter and weighted queue order (tests pass a seeded one).
        metrics: where to count enqueues, attempts, outcomes and run times: a ``lifecycle.Metrics`` (served
            by ``HealthServer`` at ``/metrics``, queue depths included), or any :class:`TaskObserver`.
            ``None`` (the default) costs nothing.

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
        metrics: Metrics | TaskObserver | None = None,
    ) -> None:
        if not isinstance(backend, Backend):
            raise TypeError(
                f"AsyncTasks needs a Backend (MemoryBackend(), SQLiteBackend(path), ...), got {backend!r}"
            )
        _check_concurrency(concurrency)
        if encoding is not None and not isinstance(encoding, Encoding):
            raise TypeError(f"encoding must have encode() and decode() (an Encoding), got {encoding!r}")
        if on_error is not None and not callable(on_error):
            raise TypeError(f"on_error must be a callable taking (TaskInfo, exception), got {on_error!r}")
        if not isinstance(retry_backoff, Backoff):
            raise TypeError(f"retry_backoff must be a lifecycle.Backoff, got {retry_backoff!r}")
        if not callable(clock):
            raise TypeError(f"clock must be a callable returning seconds since the epoch, got {clock!r}")
        self._rng = rng if rng is not None else random.Random()
        lease = check_positive(lease, "lease")
        self._backend = backend
        self._execution = bool(execution)
        self._encoding: Encoding = encoding if encoding is not None else JSONEncoding()
        self._registry = Registry()
        self._clock = clock
        self._logger = library_logger("lifecycle.asynctask")
        self._observer = resolve_observer(metrics)
        self._options = EngineOptions(
            concurrency=concurrency,
            queues=QueueOrder(queues, self._rng),
            lease=lease,
            poll_interval=check_positive(poll_interval, "poll_interval"),
            recovery_interval=check_positive(
                lease / 2 if recovery_interval is None else recovery_interval, "recovery_interval"
            ),
            retention=check_retention(retention),
            retention_interval=check_positive(retention_interval, "retention_interval"),
            shutdown_grace=as_seconds(shutdown_grace, "shutdown_grace"),
            clock=clock,
            policy=Policy(retry_backoff, self._rng),
            on_error=on_error,
            observer=self._observer,
        )
        self._scheduler = Scheduler(clock, self._logger)
        self._open = False
        self._opened = 0  # initialize() / `async with` not closed yet: the last cleanup closes the backend
        self._started = False
        self._worker: Worker | None = None
        self._changed: anyio.Event | None = None
        if self._observer is not None:
            track_queue_depths(self._observer, self.stats, lambda: self._open)

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

    def configure_worker(
        self,
        *,
        concurrency: int | None = None,
        queues: Mapping[str, int] | Sequence[str] | None = None,
    ) -> None:
        """Change how this process's worker runs, after construction but before :meth:`execute` starts.

        For code that builds the ``AsyncTasks`` in one place and decides how to run it in another (the
        ``lifecycle worker --concurrency N --queue NAME`` command line does this). ``concurrency`` and
        ``queues`` mean what they mean in the constructor and are checked the same way; ``None`` keeps the
        current value. Nothing changes when a value is bad.

        Raises ``ValueError``/``TypeError`` naming a bad value, and ``RuntimeError`` once ``execute`` has
        started: a running worker keeps its settings; build the ``AsyncTasks`` with them instead.

        Example::

            tasks.configure_worker(concurrency=50, queues={"critical": 6, "default": 3, "low": 1})
        """
        if self._started:
            raise RuntimeError(
                "configure_worker() must be called before execute() starts: the worker of this AsyncTasks "
                "runs already (or ran); pass concurrency= and queues= to AsyncTasks(...) or configure it "
                "before handing it to the TaskManager"
            )
        changes: dict[str, Any] = {}
        if concurrency is not None:
            changes["concurrency"] = _check_concurrency(concurrency)
        if queues is not None:
            changes["queues"] = QueueOrder(queues, self._rng)
        if changes:
            self._options = dataclasses.replace(self._options, **changes)

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
        ``module.qualname`` (for a script run as ``python service.py``, ``service.qualname``, as a process
        importing the script names it) and is required for lambdas, closures and functions defined inside
        functions. Names, like queue names, cannot contain a NUL character (``ValueError``).
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
        tasks = [build_task(call, now, self._registry, self._encoding) for call in check_calls(calls)]
        if connection is not None:
            backend = self._backend
            if not isinstance(backend, TransactionalBackend):
                raise TypeError(
                    "connection= needs a backend that can join your transaction (a TransactionalBackend "
                    f"such as PostgresBackend); {type(backend).__name__} cannot: drop connection="
                )
            ids = await backend.enqueue_many_in(connection, tasks)
            if self._observer is not None:  # stored in the caller's transaction: counted even if rolled back
                observe_enqueued(self._observer, tasks)
            return ids
        self._check_open("enqueue")
        if not tasks:
            return []
        ids = await self._backend.enqueue_many(tasks)
        self._stored(tasks, now)
        return ids

    # -- the lifecycle Task ---------------------------------------------------------------------------------

    async def initialize(self) -> None:
        """Open the backend (once: an ``AsyncTasks`` opened already, by its manager or an ``async with``,
        stays open until the matching :meth:`cleanup`). With ``execution=False`` a built-in backend creates
        missing storage (file, tables, keys) at the first enqueue rather than here, so inspecting tasks
        never creates any."""
        if self._opened == 0:
            await open_backend(self._backend, create=True if self._execution else "on_enqueue")
        self._opened += 1
        self._open = True

    async def execute(self) -> None:
        """Run the worker engine until cancelled, then drain (see the class docstring); with
        ``execution=False``, wait until cancelled. Either way, the scheduler of the declared schedules
        (:meth:`schedule`, :meth:`every`) runs alongside, so an enqueue-only process can drive them."""
        if self._execution or len(self._scheduler):
            self._check_open("execute")
        self._started = True
        crash: Exception | None = None
        async with anyio.create_task_group() as group:
            group.start_soon(self._run_scheduler)
            try:
                await self._execute_engine()
            except Exception as exc:  # raised below, unwrapped by this task group
                crash = exc
            group.cancel_scope.cancel()
        if crash is not None:
            raise crash

    async def _execute_engine(self) -> None:
        if not self._execution:
            await anyio.sleep_forever()
        if self._worker is not None:
            raise RuntimeError("this AsyncTasks is executing already: run one execute() at a time")
        worker = Worker(
            self._backend, self._registry, self._encoding, self._options, self._logger, self._notify_changed
        )
        unserved = sorted({definition.queue for definition in self._registry} - set(self.queues))
        if unserved:
            self._logger.info(
                "this worker serves the queues %s; registered tasks also default to %s, which only workers "
                "listing them will run",
                ", ".join(self.queues),
                ", ".join(unserved),
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
                    crash = find_request(exc)  # unwrapped from the engine's task groups
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
        except BaseException:
            if crash is not None:
                self._logger.error("the task worker crashed while stopping", exc_info=crash)
            raise
        finally:
            self._worker = None
        if crash is not None:
            raise crash

    async def cleanup(self) -> None:
        """Close the backend, unless another opening is still in use: each :meth:`initialize` (or
        ``async with``) is matched by one ``cleanup``, and the last closes the backend."""
        if self._opened > 1:
            self._opened -= 1
            return
        self._opened = 0
        self._open = False
        await self._backend.close()  # also after a failed initialize: close is idempotent

    async def __aenter__(self) -> AsyncTasks:
        """``async with tasks:`` opens the backend (for producers and scripts without a TaskManager).

        It may be nested: inside a running ``TaskManager`` that has this ``AsyncTasks`` (or inside another
        ``async with tasks:``) it uses the open backend and leaves it open at its exit for its owner.
        """
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


def _check_concurrency(concurrency: object) -> int:
    """``concurrency`` checked: an int >= 1 (``ValueError`` otherwise)."""
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
        raise ValueError(f"concurrency must be an int >= 1, got {concurrency!r}")
    return concurrency
