"""``AsyncTasks``: durable asynchronous tasks as one managed lifecycle Task.

The whole public class lives here: configuration and registration, enqueue (single, batch, chains),
schedules, inspection and operations, and the lifecycle ``Task`` methods that run the engine. What is not
state of an ``AsyncTasks`` lives in the concept modules (``_enqueue``, ``_chain``, ``_schedule``,
``_registry``, ``_engine``).
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import functools
import math
import random
import threading
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import replace
from datetime import datetime, timedelta, tzinfo
from types import TracebackType
from typing import Any, TypeVar, overload

import anyio
from typing_extensions import Unpack

from .._checks import check_count, check_name, check_optional_seconds, check_seconds
from .._compat import unwrap_single
from .._core._backoff import Backoff
from .._redact import library_logger
from ._backend import (
    Backend,
    NotifyingBackend,
    TransactionalBackend,
    is_backend,
    open_backend,
    supports_control,
    supports_flow_control,
)
from ._blocking import BlockingProducer, ProducerHost
from ._chain import CHAIN_PREFIX, build_chain, chain_fields, chain_progress
from ._clock import Clock
from ._coalesce import EnqueueCoalescer
from ._encoding import Encoding, JSONEncoding
from ._engine._notices import NoticePump
from ._engine._options import EngineOptions, check_retention, check_states
from ._engine._queues import QueueOrder
from ._engine._upkeep import purge_expired, recover_expired
from ._engine._verdict import Policy
from ._engine._worker import Worker
from ._enqueue import build_plain_task, build_task, build_tasks, check_calls, if_exists_for, new_task_ids
from ._errors import DuplicateTaskError
from ._flow import flow_stats, waiting_on
from ._group import build_group, group_info
from ._meta import add_sections, read_user_meta
from ._middleware import EnqueueHook, Hooks, Middleware
from ._model import Call, EnqueueOptions, FlowStats, Group, GroupInfo, QueueStats, TaskContext, TaskInfo, Ts
from ._observer import (
    ObserverSource,
    TaskObserver,
    observe_enqueued,
    resolve_observer,
    track_queue_depths,
)
from ._records import GroupRecord, NewGroup, NewTask, TaskRecord, TaskState
from ._registry import DEFAULT_QUEUE, Registry, check_queue
from ._schedule import (
    CronTrigger,
    IntervalTrigger,
    MissedFires,
    Schedule,
    ScheduleInfo,
    Scheduler,
    check_interval,
    check_missed,
    check_schedule_name,
    resolve_timezone,
)
from ._tracing import current_trace, with_trace

__all__ = ["AsyncTasks"]

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")
M = TypeVar("M", bound=Middleware)
H = TypeVar("H", bound=EnqueueHook)


class AsyncTasks:
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
            by ``HealthServer`` at ``/metrics``, queue depths included), any :class:`TaskObserver`, or any
            object whose ``async_tasks`` attribute is one. ``None`` (the default) costs nothing.

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
        shutdown_grace: float | timedelta = 10.0,
        on_error: Callable[[TaskInfo, BaseException], Awaitable[None] | None] | None = None,
        lease: float | timedelta = 30.0,
        recovery_interval: float | timedelta | None = None,
        poll_interval: float | timedelta = 1.0,
        retry_backoff: Backoff = Backoff(initial=1.0, cap=600.0),  # noqa: B008 - frozen, shared safely
        retention: (
            Mapping[TaskState, float | timedelta | None] | Mapping[str, float | timedelta | None] | None
        ) = None,
        retention_interval: float | timedelta = 60.0,
        clock: Clock = time.time,
        rng: random.Random | None = None,
        metrics: ObserverSource | TaskObserver | None = None,
    ) -> None:
        if not is_backend(backend):
            raise TypeError(
                f"AsyncTasks needs a Backend (MemoryBackend(), SQLiteBackend(path), ...), got {backend!r}"
            )
        check_count(concurrency, "concurrency", minimum=1)
        if encoding is not None and not isinstance(encoding, Encoding):
            raise TypeError(f"encoding must have encode() and decode() (an Encoding), got {encoding!r}")
        if on_error is not None and not callable(on_error):
            raise TypeError(f"on_error must be a callable taking (TaskInfo, exception), got {on_error!r}")
        if not isinstance(retry_backoff, Backoff):
            raise TypeError(f"retry_backoff must be a lifecycle.Backoff, got {retry_backoff!r}")
        if not callable(clock):
            raise TypeError(f"clock must be a callable returning seconds since the epoch, got {clock!r}")
        self._rng = rng if rng is not None else random.Random()
        lease = check_seconds(lease, "lease")
        self._backend = backend
        self._execution = bool(execution)
        self._encoding: Encoding = encoding if encoding is not None else JSONEncoding()
        self._registry = Registry()
        self._clock = clock
        self._logger = library_logger("lifecycle.asynctask")
        self._observer = resolve_observer(metrics)
        self._hooks = Hooks()
        self._options = EngineOptions(
            concurrency=concurrency,
            queues=QueueOrder(queues, self._rng),
            lease=lease,
            poll_interval=check_seconds(poll_interval, "poll_interval"),
            recovery_interval=check_seconds(
                lease / 2 if recovery_interval is None else recovery_interval, "recovery_interval"
            ),
            retention=check_retention(retention),
            retention_interval=check_seconds(retention_interval, "retention_interval"),
            shutdown_grace=check_seconds(shutdown_grace, "shutdown_grace", allow_zero=True),
            clock=clock,
            policy=Policy(retry_backoff, self._rng),
            on_error=on_error,
            observer=self._observer,
            hooks=self._hooks,
        )
        self._scheduler = Scheduler(clock, self._logger)
        self._open = False
        self._opened = 0  # initialize() / `async with` not closed yet: the last cleanup closes the backend
        self._started = False
        self._worker: Worker | None = None
        self._changed: anyio.Event | None = None
        # Group commit of concurrent single enqueues, one coalescer per if_exists mode (made when first used).
        self._coalescers: dict[str, EnqueueCoalescer] = {}
        self._pump = (
            NoticePump(backend, self._notify_changed, self._logger)
            if isinstance(backend, NotifyingBackend)
            else None
        )
        self._producers = ProducerHost(self)
        if self._observer is not None:
            track_queue_depths(self._observer, self.stats, lambda: self._open, self.flow)

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
            changes["concurrency"] = check_count(concurrency, "concurrency", minimum=1)
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
        rate_limit: str | None = None,
        max_running: int | None = None,
        max_running_per_key: int | None = None,
        priority: int = 0,
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
        rate_limit: str | None = None,
        max_running: int | None = None,
        max_running_per_key: int | None = None,
        priority: int = 0,
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
        rate_limit: str | None = None,
        max_running: int | None = None,
        max_running_per_key: int | None = None,
        priority: int = 0,
    ) -> Any:
        """Register a task function and return it unchanged (``@tasks.register`` or ``@tasks.register(...)``).

        The function is an ``async def`` (a plain ``def`` runs in a worker thread) with fixed positional
        parameters; its first parameter may be annotated ``TaskContext``. ``name`` defaults to
        ``module.qualname`` (for a script run as ``python service.py``, ``service.qualname``, as a process
        importing the script names it) and is required for lambdas, closures and functions defined inside
        functions. Names, like queue names, cannot contain a NUL character (``ValueError``).
        ``queue`` (default ``"default"``), ``max_retries`` (default 5) and ``timeout`` (seconds, default none)
        are the defaults of its enqueues, and so is ``priority`` (default 0; higher runs first in a queue).

        Flow limits (docs/flow-control.md), enforced in the claim of every worker of the store, so they hold
        across processes: ``rate_limit`` (``"100/s"``, ``"30/m"``, ``"1000/h"``, ``"100/10s"``) allows at
        most that many starts of this task per period (a token bucket that starts full: bursts up to the
        count); ``max_running`` caps its attempts running at once; ``max_running_per_key`` caps them per
        ``concurrency_key`` (an enqueue option; tasks without a key are not capped by it). A task held back
        stays pending and starts as soon as the limits allow; it is never failed for it. Every worker must
        register the same limits (they travel with the code, not the store).

        Raises ``TypeError`` saying what to change when the function breaks a rule, ``ValueError`` when the
        name is registered already for another function, or for a bad limit (naming the call, the value and
        the accepted form).

        Example::

            @tasks.register(rate_limit="20/s", max_running_per_key=1)
            async def sync_account(account_id: str) -> None: ...

            await tasks.enqueue(sync_account, "acme", concurrency_key="acme")
        """
        if fn is None:
            return lambda real: self.register(
                real,
                name=name,
                queue=queue,
                max_retries=max_retries,
                timeout=timeout,
                rate_limit=rate_limit,
                max_running=max_running,
                max_running_per_key=max_running_per_key,
                priority=priority,
            )
        self._registry.add(
            fn,
            name=name,
            queue=queue,
            max_retries=max_retries,
            timeout=timeout,
            rate_limit=rate_limit,
            max_running=max_running,
            max_running_per_key=max_running_per_key,
            priority=priority,
        )
        return fn

    def middleware(self, fn: M, /) -> M:
        """Register ``fn`` as middleware around every attempt this process's worker runs, and return it
        unchanged (``@tasks.middleware``).

        ``fn`` is an ``async def mw(ctx: TaskContext, call_next) -> Any`` (see :class:`Middleware`):
        ``await call_next()`` runs the task (a plain ``def`` task in its worker thread) and returns its
        result; what ``mw`` returns is the attempt's result, and what it raises (``Retry`` and ``Abort``
        included) fails the attempt exactly as if the task had raised it. A middleware that never calls
        ``call_next`` does not run the task: its return value is the result. Middleware nest in registration
        order, the first registered outermost; every one gets the same :class:`TaskContext` (also for tasks
        that do not take one), and the task's ``timeout`` covers them too. Only this process's attempts are
        wrapped: register the same middleware in every worker.

        Middleware may be registered at any time, also while the worker runs: attempts that start afterwards
        run inside it, an attempt already running keeps the middleware it started with.

        Raises ``TypeError`` when ``fn`` is not an ``async def`` taking two positional arguments.

        Example::

            @tasks.middleware
            async def tenant_scope(ctx: TaskContext, call_next: Callable[[], Awaitable[Any]]) -> Any:
                token = current_tenant.set(ctx.meta.get("tenant"))
                try:
                    return await call_next()
                finally:
                    current_tenant.reset(token)
        """
        self._hooks.add_middleware(fn)
        return fn

    def on_enqueue(self, hook: H, /) -> H:
        """Register ``hook``, a plain ``def hook(task: NewTask) -> NewTask | None``, called once for each task
        just before it is stored, and return it unchanged (so ``@tasks.on_enqueue`` works too).

        Every store goes through it: :meth:`enqueue`, :meth:`enqueue_many`, a chain's first step at
        :meth:`enqueue_chain` and each later step when the previous one succeeds, groups (their members,
        then their ``then``), and schedule fires. Returning a changed copy stores that instead
        (``dataclasses.replace(task, queue="bulk")``; set metadata with :func:`with_meta`, which keeps the
        engine's own bookkeeping in ``NewTask.meta``); ``None`` keeps the task. Hooks run in registration
        order, each on what the previous one returned. A hook that raises makes the enqueue raise that
        exception and nothing of its batch is stored; returning something else than a ``NewTask`` or
        ``None`` is a ``TypeError``; changing the engine's bookkeeping, the ``group_id``, the id of a chain
        step, schedule fire or group member, or an id to one another task of the same batch has, is a
        ``ValueError``.

        Where hooks run: in the process that stores the task. A chain's later steps (and a group that is a
        chain step) are stored by the worker that saves the previous step's success, so that worker's
        hooks apply; there a hook that raises makes the step that succeeded ``dead`` with the hook's error
        (requeue it once the hook is fixed), and a step run twice (a worker died before saving its success)
        calls the hooks twice for the one next step stored. Schedule fires are stored by the scheduler,
        which retries with backoff while a hook raises. Register the same hooks in producers and workers.

        Raises ``TypeError`` when ``hook`` is not a plain function taking one positional argument.

        Example::

            @tasks.on_enqueue
            def tag_tenant(task: NewTask) -> NewTask:
                return with_meta(task, tenant=current_tenant.get())
        """
        self._hooks.add_enqueue_hook(hook)
        return hook

    # -- enqueue --------------------------------------------------------------------------------------------

    # For type checkers: the arguments are checked against the function's parameters, with or without a
    # leading TaskContext; a registered name takes anything (see docs/asynctask.md, "Typed calls").
    @overload
    async def enqueue(
        self, fn: Callable[[Unpack[Ts]], object], /, *args: Unpack[Ts], **options: Unpack[EnqueueOptions]
    ) -> str: ...

    @overload
    async def enqueue(
        self,
        fn: Callable[[TaskContext, Unpack[Ts]], object],
        /,
        *args: Unpack[Ts],
        **options: Unpack[EnqueueOptions],
    ) -> str: ...

    @overload
    async def enqueue(self, fn: str, /, *args: Any, **options: Unpack[EnqueueOptions]) -> str: ...

    async def enqueue(
        self,
        fn: Callable[..., Any] | str,
        /,
        *args: object,
        delay: float | timedelta | None = None,
        at: datetime | float | None = None,
        queue: str | None = None,
        max_retries: int | None = None,
        timeout: float | timedelta | None = None,
        task_id: str | None = None,
        concurrency_key: str | None = None,
        priority: int | None = None,
        unique_for: float | timedelta | None = None,
        debounce: float | timedelta | None = None,
        expires: float | timedelta | datetime | None = None,
        meta: Mapping[str, str] | None = None,
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

        Flow control (docs/flow-control.md): ``priority`` (higher runs first within the queue; overrides the
        registered default); ``concurrency_key`` (what the registered ``max_running_per_key`` counts by, e.g.
        a user or account id); ``unique_for`` (seconds or ``timedelta``): an equal task (same ``task_id``
        if given, else same name and arguments) enqueued again within that time raises
        :class:`DuplicateTaskError`, even once the first has finished; ``debounce`` (seconds, needs
        ``task_id``): the task runs once, that long after the *last* enqueue with its id (each enqueue while
        it is pending replaces its arguments and pushes its start back; one enqueue while it runs schedules
        one more run); ``expires`` (seconds from now, ``timedelta``, or an aware ``datetime``): a task not
        started by then never starts, it ends ``cancelled`` with ``last_error`` "expired before it
        started".

        ``meta`` is the task's own string metadata (``{"tenant": "acme"}``: ``str`` keys and values, no NUL
        characters; ``TypeError``/``ValueError`` otherwise): the task reads it as ``ctx.meta``,
        :class:`TaskInfo` shows it as ``info.meta``, and ``on_enqueue`` hooks can add to it.

        Returns once the backend has stored the task durably. Concurrent calls share round trips (group
        commit): while one store of this ``AsyncTasks`` is in flight, the calls that arrive wait and are
        stored together in the next one (at most 1000 tasks); a call that finds none in flight goes at once.
        Each call gets its own id or its own error (``DuplicateTaskError`` only for the call it concerns; an
        error of the store for every call of that round trip). Calls with ``connection=``, and calls with
        ``debounce`` and without, never share one. A call cancelled while it waits stores nothing; once
        its task is sent, the task may be stored even if the call is cancelled (look it up by its id). A
        round trip carrying other calls' tasks is finished before the cancellation of the call sending it
        takes effect. Type checkers check ``args`` against the
        function's parameters, and so does ``enqueue`` at run time: each argument against its parameter's
        annotation (``TypeError`` naming the parameter, the type it expects and the type it was given;
        values are checked, never converted). See docs/asynctask.md, "Typed calls".
        """
        if (
            delay is None
            and at is None
            and queue is None
            and max_retries is None
            and timeout is None
            and task_id is None
            and concurrency_key is None
            and priority is None
            and unique_for is None
            and debounce is None
            and expires is None
            and meta is None
            and connection is None
        ):  # the common call: the registered defaults, no option to check
            task = build_plain_task(fn, args, self._clock(), self._registry, self._encoding)
            trace = current_trace()
            coalescer = self._coalescers.get("error")
            if coalescer is not None and trace is None and self._open and not self._hooks.on_enqueue:
                try:  # what _enqueue_task does when there is nothing to add to the task
                    return await coalescer.enqueue(task)
                except DuplicateTaskError as exc:
                    raise _explained(exc, [task]) from None
            return await self._enqueue_task(task, "error", trace)
        call = Call(
            fn,
            *args,
            delay=delay,
            at=at,
            queue=queue,
            max_retries=max_retries,
            timeout=timeout,
            task_id=task_id,
            concurrency_key=concurrency_key,
            priority=priority,
            unique_for=unique_for,
            debounce=debounce,
            expires=expires,
            meta=meta,
        )
        if connection is not None:  # the caller's transaction: never shared with other calls
            ids = await self.enqueue_many([call], connection=connection)
            return ids[0]
        return await self._enqueue_one(call, current_trace())

    async def _enqueue_one(self, call: Call, trace: dict[str, str] | None) -> str:
        """One call stored through the coalescer of its ``if_exists`` mode: with the concurrent single
        enqueues, in one backend round trip."""
        task = build_task(call, self._clock(), self._registry, self._encoding)
        return await self._enqueue_task(task, if_exists_for([call]), trace)

    async def _enqueue_task(self, task: NewTask, if_exists: str, trace: dict[str, str] | None) -> str:
        """``task`` (built, checked) stored through the coalescer of its ``if_exists`` mode."""
        if trace is not None:
            (task,) = with_trace([task], trace)
        if self._hooks.on_enqueue:
            (task,) = self._hooks.prepare([task])
        self._check_open("enqueue")
        coalescer = self._coalescers.get(if_exists)
        if coalescer is None:
            backend = self._backend
            send = (  # the backend's own method (no frame of ours between the coalescer and the backend)
                backend.enqueue_many
                if if_exists == "error"
                else functools.partial(backend.enqueue_many, **_mode(if_exists))
            )
            coalescer = self._coalescers[if_exists] = EnqueueCoalescer(send, stored=self._stored)
        try:
            return await coalescer.enqueue(task)
        except DuplicateTaskError as exc:
            raise _explained(exc, [task]) from None

    async def enqueue_many(
        self, calls: Iterable[Call], *, connection: object | None = None
    ) -> builtins.list[str]:
        """Store several calls in one backend round trip (all or nothing) and return their ids in order.

        Each :class:`Call` is checked like :meth:`enqueue`; one bad call stores nothing. A ``task_id``
        conflict (or an open ``unique_for`` window) raises :class:`DuplicateTaskError` and stores nothing of
        the batch. Calls with ``debounce`` go in batches of their own (``ValueError`` for a mix).
        """
        return await self._enqueue_many(calls, connection, current_trace())

    async def _enqueue_many(
        self, calls: Iterable[Call], connection: object | None, trace: dict[str, str] | None
    ) -> builtins.list[str]:
        now = self._clock()
        checked = check_calls(calls)
        new_id = new_task_ids(len(checked))  # one read of the random source for the batch
        tasks = build_tasks(checked, now, self._registry, self._encoding, new_id)
        if_exists = if_exists_for(checked)
        if trace is not None:
            tasks = with_trace(tasks, trace)
        tasks = self._hooks.prepare(tasks)
        if connection is not None:
            backend = self._backend
            if not isinstance(backend, TransactionalBackend):
                raise TypeError(
                    "connection= needs a backend that can join your transaction (a TransactionalBackend "
                    f"such as PostgresBackend); {type(backend).__name__} cannot: drop connection="
                )
            try:
                ids = await backend.enqueue_many_in(connection, tasks, **_mode(if_exists))
            except DuplicateTaskError as exc:
                raise _explained(exc, tasks) from None
            if self._observer is not None:  # stored in the caller's transaction: counted even if rolled back
                observe_enqueued(self._observer, tasks)
            return ids
        self._check_open("enqueue")
        if not tasks:
            return []
        try:
            ids = await self._backend.enqueue_many(tasks, **_mode(if_exists))
        except DuplicateTaskError as exc:
            raise _explained(exc, tasks) from None
        self._stored(tasks, now)
        return ids

    async def enqueue_chain(self, calls: Sequence[Call | Group]) -> str:
        """Store a chain of calls run one after the other and return the chain's id.

        Only the first step is stored now; each later step is enqueued when the previous one succeeds, in
        the same atomic step as that success, and receives the previous result as
        ``TaskContext.previous_result``. A step that dies (or is cancelled) stops the chain: later steps never
        run; requeue the dead step and, once it succeeds, the chain goes on. A step's ``delay`` counts from
        the previous step's success. ``tasks.info(chain_id)`` shows the step the chain is at, with the
        chain's progress in ``.chain``. Calls are checked like :meth:`enqueue_many`; steps cannot have a
        ``task_id`` (their ids are ``"<chain id>.<index>"``).

        A step may be a :class:`Group` of calls run in parallel (each receives the previous result); the
        step after it receives the list of the members' results, in call order, once all succeeded (its
        ``delay`` then counts from the group's start). Two groups in a row are refused (``ValueError``): put
        a call between them.

        Example::

            chain_id = await tasks.enqueue_chain([Call(fetch, url), Call(parse), Call(store)])
            info = await tasks.info(chain_id)
            print(info.chain.state, info.chain.current)
        """
        return await self._enqueue_chain(calls, current_trace())

    async def _enqueue_chain(self, calls: Sequence[Call | Group], trace: dict[str, str] | None) -> str:
        now = self._clock()
        chain_id, first = build_chain(calls, now, self._registry, self._encoding)
        if isinstance(first, NewGroup):
            self._check_open("enqueue_chain")
            self._check_control("enqueue_chain", "a chain that starts with a Group")
            await self._store_group(first, trace, now)
            return chain_id
        if trace is not None:
            (first,) = with_trace([first], trace)
        (first,) = self._hooks.prepare([first])
        self._check_open("enqueue_chain")
        await self._backend.enqueue_many([first])
        self._stored([first], now)
        return chain_id

    async def enqueue_group(self, calls: Sequence[Call], *, then: Call | None = None) -> str:
        """Store calls that run in parallel, and optionally a ``then`` call run once all of them succeeded;
        return the group's id.

        The members and the group are stored at once (all or nothing). When the last member succeeds,
        ``then`` is enqueued exactly once, in the same atomic step as that success, and receives the
        members' results in call order as ``TaskContext.previous_result`` (a list): a worker that crashes
        at any moment cannot make it run twice, nor leave it unrun once every member succeeded. A member
        that ends ``dead`` or ``cancelled`` makes the group ``dead`` / ``cancelled`` and ``then`` never runs
        (requeueing that member does not change it). ``then``'s ``delay``/``at``/``expires`` count from
        now. Calls are checked like :meth:`enqueue_many`; they cannot have ``task_id``, ``unique_for`` or
        ``debounce`` (members are ``"<group id>.<index>"``, ``then`` is ``"<group id>.then"``).

        Raises ``TypeError``/``ValueError`` for a bad call or no calls, ``RuntimeError`` when the backend
        has no groups (a backend written before them).

        Example::

            group_id = await tasks.enqueue_group([Call(resize, p) for p in photos], then=Call(publish))
            info = await tasks.wait_group(group_id, timeout=600)
        """
        now = self._clock()
        group = build_group(calls, then, now, self._registry, self._encoding)
        self._check_open("enqueue_group")
        self._check_control("enqueue_group", "groups")
        await self._store_group(group, current_trace(), now)
        return group.id

    async def _store_group(self, group: NewGroup, trace: dict[str, str] | None, now: float) -> None:
        if trace is not None:
            members = tuple(with_trace(list(group.members), trace))
            then = None if group.then is None else with_trace([group.then], trace)[0]
            group = replace(group, members=members, then=then)
        group = self._hooks.prepare_group(
            group
        )  # members, then ``then``, as one batch; what it raises goes up
        await self._backend.enqueue_group(group)
        self._stored(list(group.members), now)

    async def group_info(self, group_id: str) -> GroupInfo | None:
        """The group with this id (from :meth:`enqueue_group`, or a chain's group step), or ``None`` (never
        stored, or removed by retention: a group is kept as long as its outcome's retention).

        Example::

            info = await tasks.group_info(group_id)
            print(info.state, info.counts)
        """
        self._check_open("group_info")
        _check_id(group_id, "group_info")
        record = await self._get_group(group_id)
        return None if record is None else group_info(record)

    async def wait_group(self, group_id: str, *, timeout: float | None = None) -> GroupInfo:
        """Wait until the group is final (``succeeded``, ``dead`` or ``cancelled``) and return it; a dead or
        cancelled group is returned, not raised.

        Woken like :meth:`wait` (at once by a worker of this process, within milliseconds by a backend that
        pushes notices, else every ``poll_interval``). Raises ``TimeoutError`` after ``timeout`` seconds
        (``None``: no limit; ``timeout=0`` reads the group once and does not wait),
        ``LookupError`` when there is no such group, ``TypeError``/``ValueError`` for a bad timeout.

        Example::

            info = await tasks.wait_group(group_id, timeout=600)
            if info.state is TaskState.SUCCEEDED:
                print("then task:", info.then_id)
        """
        self._check_open("wait_group")
        _check_id(group_id, "wait_group")
        seconds = check_optional_seconds(timeout, "AsyncTasks.wait_group(): timeout", allow_zero=True)

        async def read() -> GroupInfo:
            record = await self._get_group(group_id)
            if record is None:
                raise LookupError(f"there is no group with id {group_id!r} (never stored, or purged)")
            return group_info(record)

        def late(info: GroupInfo | None) -> str:
            if info is None:
                return "the group's state was not read yet"
            running = info.counts[TaskState.ACTIVE]
            done = info.counts[TaskState.SUCCEEDED]
            total = len(info.task_ids)
            return f"the group is still {info.state.value} ({done} of {total} succeeded, {running} running)"

        return await self._wait_until(
            read,
            lambda info: info.is_final,
            seconds,
            lambda last: f"tasks.wait_group({group_id!r}, timeout={seconds:g}) timed out: {late(last)}",
        )

    async def _get_group(self, group_id: str) -> GroupRecord | None:
        if not supports_control(self._backend):
            return None
        return await self._backend.get_group(group_id)

    @contextlib.contextmanager
    def blocking(self) -> Iterator[BlockingProducer]:
        """A producer for synchronous code (Django, Flask, scripts): ``with tasks.blocking() as producer:``.

        ``producer.enqueue``, ``enqueue_many``, ``enqueue_chain``, ``info`` and ``wait`` take the arguments
        of the async methods and block until the backend answered. No manager and no event loop are needed:
        the first ``with`` block starts an event loop in a background thread and opens the backend there
        (its own connections); the last block to end closes them. Blocks of several threads share one
        producer, and a producer may be used by several threads at once (a WSGI server's).

        Raises ``RuntimeError`` when called from inside a running event loop (use the async API there) or
        when this ``AsyncTasks`` is open already in an event loop (a running ``TaskManager`` or ``async
        with tasks:``: give the synchronous code an ``AsyncTasks`` of its own); and what the backend's
        ``open`` raises.

        Example::

            tasks = AsyncTasks(PostgresBackend(dsn), execution=False)

            with tasks.blocking() as producer:
                producer.enqueue(send_welcome, user.id)
        """
        producer = self._producers.enter(lambda: self._opened > 0)
        try:
            yield producer
        finally:
            self._producers.exit()

    # -- periodic tasks -------------------------------------------------------------------------------------

    def schedule(
        self,
        fn: Callable[..., Any] | str,
        cron: str,
        /,
        *args: Any,
        name: str,
        timezone: str | tzinfo | None = None,
        queue: str | None = None,
        max_retries: int | None = None,
        timeout: float | timedelta | None = None,
        missed: MissedFires = "skip",
    ) -> ScheduleInfo:
        """Enqueue ``fn(*args)`` on the cron expression ``cron`` (read by ``croniter``: the ``cron`` extra).

        ``name`` identifies the schedule across processes: every process that declares it and executes
        runs its scheduler, and each fire time is enqueued once (task id ``"schedule:<name>:<UTC time>"``).
        ``timezone`` (an IANA name or ``tzinfo``, default UTC) is where the cron fields are read.
        ``queue``, ``max_retries`` and ``timeout`` apply to every run, as with :meth:`enqueue`. ``missed``:
        fire times that passed while no scheduler ran are skipped (``"skip"``, the default) or caught up
        with one run at start (``"run_once"``). A failed run does not affect later fire times.

        The call is checked now, like an enqueue (``TypeError``); a bad expression or time zone is a
        ``ValueError``; a used ``name`` a ``ValueError``; without croniter an ``ImportError`` naming the
        extra. Returns the schedule's :class:`ScheduleInfo`.

        Example::

            tasks.schedule(send_report, "0 7 * * mon-fri", "sales", name="daily-report",
                           timezone="Europe/Paris")
        """
        check_schedule_name(name, "schedule()")
        trigger = CronTrigger(cron, resolve_timezone(timezone))
        return self._add_schedule(name, trigger, fn, args, queue, max_retries, timeout, missed)

    def every(
        self,
        fn: Callable[..., Any] | str,
        interval: float | timedelta,
        /,
        *args: Any,
        name: str,
        queue: str | None = None,
        max_retries: int | None = None,
        timeout: float | timedelta | None = None,
        missed: MissedFires = "skip",
    ) -> ScheduleInfo:
        """Enqueue ``fn(*args)`` every ``interval`` (seconds or ``timedelta``, at least 1 ms).

        Fire times are the multiples of ``interval`` since the Unix epoch (UTC), so every process agrees on
        them whenever it started: ``every(f, 3600, ...)`` fires on the hour. The other options are those of
        :meth:`schedule`.

        Example::

            tasks.every(refresh_cache, timedelta(minutes=5), name="refresh-cache")
        """
        check_schedule_name(name, "every()")
        trigger = IntervalTrigger(check_interval(interval))
        return self._add_schedule(name, trigger, fn, args, queue, max_retries, timeout, missed)

    def schedules(self) -> builtins.list[ScheduleInfo]:
        """Every schedule declared on this ``AsyncTasks``, by name, with its next fire time (from the
        running scheduler, or computed from now when it does not run)."""
        now = self._clock()
        return sorted((schedule.info(now) for schedule in self._scheduler), key=lambda info: info.name)

    # -- inspection and operations -------------------------------------------------------------------------

    async def info(self, task_id: str) -> TaskInfo | None:
        """The task with this id, or ``None`` (never stored, or removed by retention or :meth:`purge`).

        A chain id (from :meth:`enqueue_chain`) gives the step the chain is at (the running or waiting step,
        the step that stopped it, or the last step once done) with the whole chain's progress in
        ``info.chain`` (a :class:`ChainInfo`); so does the id of any step. A chain is ``None`` once its
        first step's record is removed.
        """
        self._check_open("info")
        _check_id(task_id, "info")
        record = await self._backend.get(task_id)
        chain_id = task_id if record is None and task_id.startswith(CHAIN_PREFIX) else None
        if record is not None:
            chain_id = chain_fields(record)[0]
            if chain_id is None:
                return await self._info_now(record)
        if chain_id is None:
            return None
        progress = await chain_progress(self._backend, chain_id, self._encoding.decode)
        if progress is None:
            return None if record is None else await self._info_now(record)
        chain, current = progress
        shown = current if record is None else record
        if shown is None:  # a group step whose first member's record is gone
            return None
        return replace(await self._info_now(shown), chain=chain)

    async def _info_now(self, record: TaskRecord) -> TaskInfo:
        """:meth:`_info` with ``waiting_on`` filled for a due pending task."""
        info = self._info(record)
        now = self._clock()
        if (
            record.state is not TaskState.PENDING
            or record.run_at > now
            or not supports_flow_control(self._backend)
        ):
            return info
        limits = self._registry.flow_limits().get(record.name)
        state = None
        if limits is not None:
            state = await self._backend.flow_state(
                record.name, record.concurrency_key, now=now, limits=limits
            )
        reason = waiting_on(record, now, await self._backend.paused(), limits, state)
        return info if reason is None else replace(info, waiting_on=reason)

    async def list(
        self,
        *,
        state: TaskState | str | Collection[TaskState | str] | None = None,
        queue: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> builtins.list[TaskInfo]:
        """Tasks, newest first, optionally of one or several states and of one queue: at most ``limit``, after
        skipping ``offset`` (both whole numbers >= 0)."""
        self._check_open("list")
        states = None if state is None else check_states(state)
        _check_queue(queue, "list")
        check_count(limit, "AsyncTasks.list(): limit")
        check_count(offset, "AsyncTasks.list(): offset")
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

    async def pause(self, queue: str) -> None:
        """Pause ``queue``: no worker of the store takes its tasks until :meth:`resume` (running tasks finish;
        enqueue still works). The pause is stored, so it holds for workers started later and survives
        restarts. Idempotent.

        Raises ``TypeError``/``ValueError`` for a bad queue name, ``RuntimeError`` when the backend is not
        open or does not support flow control.

        Example::

            await tasks.pause("emails")  # during the mail provider's outage
            ...
            await tasks.resume("emails")
        """
        self._check_open("pause")
        check_queue(queue, "AsyncTasks.pause()")
        self._check_flow("pause")
        await self._backend.pause(queue)
        self._notify_changed()

    async def resume(self, queue: str) -> None:
        """Resume a queue paused by :meth:`pause` (idempotent: resuming a running queue does nothing)."""
        self._check_open("resume")
        check_queue(queue, "AsyncTasks.resume()")
        self._check_flow("resume")
        await self._backend.resume(queue)
        if self._worker is not None:
            self._worker.wake()
        self._notify_changed()

    async def paused(self) -> set[str]:
        """The paused queues of the store (empty for a backend without flow control)."""
        self._check_open("paused")
        if not supports_flow_control(self._backend):
            return set()
        return set(await self._backend.paused())

    async def flow(self, *, sample: int = 1000) -> FlowStats:
        """What holds tasks back: the paused queues, and per task name the limits registered in this process,
        how many of its tasks run, its rate bucket, and how many due pending tasks wait on each reason (read
        from the ``sample`` most recently enqueued pending tasks). For ``lifecycle tasks stats`` and metrics.

        Example::

            stats = await tasks.flow()
            print(stats.paused, stats.tasks["app.sync_account"].waiting)
        """
        self._check_open("flow")
        check_count(sample, "AsyncTasks.flow(): sample", minimum=1)
        if not supports_flow_control(self._backend):
            return FlowStats(paused=frozenset(), tasks={}, sampled=0, complete=True)
        return await flow_stats(self._backend, self._registry.flow_limits(), self._clock(), sample)

    async def cancel(self, task_id: str) -> bool:
        """Cancel a task: a pending one becomes ``cancelled`` at once and never runs; a running one is
        stopped wherever it runs, then ends ``cancelled``, never retried. Returns ``False`` for a finished
        or unknown task.

        A running ``async def`` task is cancelled at its next ``await`` (anyio cancellation: ``finally``
        blocks run); a plain ``def`` task runs in a thread that cannot be interrupted: it sees
        ``ctx.cancel_requested`` become true and should return. The request reaches the worker holding the
        task within a second on every backend (within milliseconds on one that pushes notices: Redis,
        PostgreSQL, in-process), and is stored: if that worker dies first, the task ends ``cancelled`` when
        it is recovered. A task that finishes before its worker sees the request keeps its verdict. A
        cancelled member of a group makes the group ``cancelled``. ``tasks.info(task_id)`` tells which
        happened: ``cancelled`` already, or ``active`` until the worker stops it.

        Raises ``RuntimeError`` for a running task on a backend that cannot cancel one (written before
        this existed), ``TypeError``/``ValueError`` for a bad id.

        Example::

            if await tasks.cancel(task_id):
                info = await tasks.wait(task_id, timeout=5)  # cancelled
        """
        self._check_open("cancel")
        _check_id(task_id, "cancel")
        now = self._clock()
        cancelled = bool(await self._backend.cancel([task_id], now=now))
        if not cancelled and not supports_control(self._backend):
            record = await self._backend.get(task_id)
            if record is not None and record.state is TaskState.ACTIVE:
                raise RuntimeError(
                    f"AsyncTasks.cancel({task_id!r}): the task is running, and "
                    f"{type(self._backend).__name__} cannot cancel a running task (it has no "
                    "cancel_requests/save_progress/enqueue_group/get_group): update it to the current "
                    "Backend protocol, or wait for the task to finish"
                )
        worker = self._worker
        if cancelled and worker is not None:
            worker.cancel_running(task_id)  # running here: stop it now, no round trip
        if cancelled:
            await self._count_group_end(task_id, now)
        self._notify_changed()
        return cancelled

    async def _count_group_end(self, task_id: str, now: float) -> None:
        """Report a group this cancellation ended to the observer (when it counts groups)."""
        report = getattr(self._observer, "group_finished", None)
        if not callable(report):
            return
        record = await self._backend.get(task_id)
        if record is None or record.group_id is None or record.state is not TaskState.CANCELLED:
            return
        group = await self._get_group(record.group_id)
        if group is not None and group.outcome is TaskState.CANCELLED and group.finished_at == now:
            try:
                report(TaskState.CANCELLED.value)
            except Exception:
                self._logger.warning("the task observer failed in group_finished(); ignored", exc_info=True)

    async def requeue(self, task_id: str) -> bool:
        """Move a dead or cancelled task back to pending, attempts reset; ``False`` when it is in another
        state or unknown."""
        self._check_open("requeue")
        _check_id(task_id, "requeue")
        moved = await self._backend.requeue([task_id], now=self._clock()) > 0
        if moved and self._worker is not None:
            self._worker.wake()
        return moved

    async def requeue_dead(self, queue: str | None = None) -> int:
        """Move every dead task (of ``queue`` when given) back to pending; returns how many moved."""
        self._check_open("requeue_dead")
        _check_queue(queue, "requeue_dead")
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
        states = check_states(state)
        _check_queue(queue, "purge")
        if TaskState.ACTIVE in states:
            raise ValueError("purge() cannot delete active tasks: a worker owns them; wait until they finish")
        age = check_optional_seconds(older_than, "purge(): older_than", allow_zero=True)
        before = None if age is None else self._clock() - age
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
        recovered = await recover_expired(self._backend, self._options, None, self._logger)
        self._notify_changed()
        return recovered

    async def wait(
        self,
        task_id: str,
        *,
        timeout: float | timedelta | None = None,
        states: Collection[TaskState | str] | None = None,
    ) -> TaskInfo:
        """Wait until the task is in one of ``states`` (default: finished: succeeded, dead or cancelled) and
        return it.

        For a chain id (from :meth:`enqueue_chain`) the states are the chain's (``info.chain.state``): the
        default waits until the chain succeeded or stopped, whatever step it is at.

        A worker in this process wakes the waiter as soon as it saves a verdict; a verdict saved by another
        process wakes it within milliseconds on a backend that pushes notices (Redis, PostgreSQL, in-process)
        and within ``poll_interval`` otherwise (SQLite). Raises ``TimeoutError`` after ``timeout``
        seconds (``None``, the default: no limit; its message names the task, the timeout and the task's
        state then; ``timeout=0`` reads the task once and does not wait). Raises ``LookupError`` when there
        is no task with this id (never stored, or purged), ``TypeError``/``ValueError`` for a timeout that is
        not a finite number of seconds >= 0.

        Example::

            task_id = await tasks.enqueue(resize, "photo.png")
            info = await tasks.wait(task_id, timeout=30)
            print(info.state, info.result)
        """
        self._check_open("wait")
        _check_id(task_id, "wait")
        seconds = check_optional_seconds(timeout, "AsyncTasks.wait(): timeout", allow_zero=True)
        wanted = check_states(states) if states is not None else {s for s in TaskState if s.is_final}

        def reached(info: TaskInfo) -> bool:
            # A chain id waits for the chain, not for the record shown: at a group step that is the first
            # member's, which may have succeeded while the group (and so the chain) goes on.
            chain = info.chain
            if chain is not None and chain.id == task_id:
                return chain.state in wanted
            return info.state in wanted

        return await self._wait_for(task_id, reached, seconds)

    # -- the lifecycle Task ---------------------------------------------------------------------------------

    async def initialize(self) -> None:
        """Open the backend (once: an ``AsyncTasks`` opened already, by its manager or an ``async with``,
        stays open until the matching :meth:`cleanup`). With ``execution=False`` a built-in backend creates
        missing storage (file, tables, keys) at the first enqueue rather than here, so inspecting tasks
        never creates any."""
        producer_thread = self._producers.thread
        if producer_thread is not None and producer_thread != threading.get_ident():
            raise RuntimeError(
                "this AsyncTasks is open in the event loop of a `with tasks.blocking()` producer, and its "
                "backend belongs to that loop: give this event loop an AsyncTasks of its own"
            )
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
        limited = sorted(self._registry.flow_limits())
        if limited and not supports_flow_control(self._backend):
            raise RuntimeError(
                f"the tasks {', '.join(limited)} are registered with flow limits (rate_limit, max_running, "
                f"max_running_per_key), which {type(self._backend).__name__} cannot enforce (it has no "
                "flow control): update the backend to the current Backend protocol, or drop the limits"
            )
        worker = Worker(
            self._backend,
            self._registry,
            self._encoding,
            self._options,
            self._logger,
            self._notify_changed,
            pump=self._pump,
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
                    crash = unwrap_single(exc)  # unwrapped from the engine's task groups
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
        self._changed = None  # waiters of this event loop are gone; another loop may open it next
        self._coalescers = {}  # so are the callers of its enqueues
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

    # -- internals ------------------------------------------------------------------------------------------

    def _add_schedule(
        self,
        name: str,
        trigger: CronTrigger | IntervalTrigger,
        fn: Callable[..., Any] | str,
        args: tuple[Any, ...],
        queue: str | None,
        max_retries: int | None,
        timeout: float | timedelta | None,
        missed: object,
    ) -> ScheduleInfo:
        call = Call(fn, *args, queue=queue, max_retries=max_retries, timeout=timeout)
        probe = build_task(call, self._clock(), self._registry, self._encoding)  # checks now, not at 3 am
        schedule = Schedule(
            name=name,
            trigger=trigger,
            call=call,
            task_name=probe.name,
            queue=probe.queue,
            missed=check_missed(missed),
        )
        self._scheduler.add(schedule)
        return schedule.info(self._clock())

    async def _run_scheduler(self) -> None:
        # A fire time's record is how the schedule remembers it ran: trust its absence only as far back as
        # finished records are kept.
        ages = [age for state, age in self._options.retention.items() if state.is_final and age is not None]
        lookback = min(ages) if ages else math.inf
        await self._scheduler.run(self._enqueue_fire, self._exists, lookback)

    async def _enqueue_fire(self, schedule: Schedule, fire: float) -> None:
        now = self._clock()
        task = build_task(schedule.call_for(fire), now, self._registry, self._encoding)
        task = replace(task, meta=add_sections(task.meta, schedule={"name": schedule.name, "fire": fire}))
        (task,) = self._hooks.prepare([task])
        stored = await self._backend.enqueue_many([task], if_exists="skip")
        if stored:
            self._logger.debug("schedule %r enqueued task %s", schedule.name, task.id)
            self._stored([task], now)

    async def _exists(self, task_id: str) -> bool:
        return await self._backend.get(task_id) is not None

    async def _wait_for(
        self, task_id: str, predicate: Callable[[TaskInfo], bool], timeout: float | None
    ) -> TaskInfo:
        async def read() -> TaskInfo:
            info = await self.info(task_id)
            if info is None:
                raise LookupError(f"there is no task with id {task_id!r} (never stored, or purged)")
            return info

        return await self._wait_until(
            read,
            predicate,
            timeout,
            lambda last: (
                f"tasks.wait({task_id!r}, timeout={timeout:g}) timed out: {_state_of(last, task_id)}"
            ),
        )

    async def _wait_until(
        self,
        read: Callable[[], Awaitable[T]],
        predicate: Callable[[T], bool],
        timeout: float | None,
        timed_out: Callable[[T | None], str],
    ) -> T:
        """Read until ``predicate`` holds, woken by this process's verdicts, by the backend's notices (the
        waiter reads them itself while no worker of this process does), and by polling.

        ``timeout=0`` looks once: its deadline applies once the first read has answered (a deadline that has
        passed before the first read would give up without looking). Any other timeout bounds the reads too,
        counted from the call: a store that does not answer cannot hold the caller past it.
        """
        last: T | None = None
        pump = self._pump
        primed = False
        deadline = math.inf if timeout is None else anyio.current_time() + timeout
        try:
            with anyio.CancelScope(deadline=math.inf if timeout == 0 else deadline) as waiting:
                while True:
                    changed = self._changed = self._changed or anyio.Event()
                    if pump is not None and not primed and not pump.lock.locked():
                        # Listen before reading, so a verdict saved in between is not missed.
                        primed = await self._pump_notices(pump, 0)
                    value = await read()
                    if predicate(value):
                        return value
                    waiting.deadline = deadline
                    last = value
                    if (
                        pump is not None
                        and not pump.lock.locked()
                        and await self._pump_notices(pump, self._options.poll_interval)
                    ):
                        continue
                    with anyio.move_on_after(self._options.poll_interval):
                        await changed.wait()
        finally:
            if pump is not None:
                # This waiter may have been the one reading the notices: wake the others, so one of them
                # takes over the reading instead of waiting out a poll interval unheard.
                self._notify_changed()
        # Only the deadline ends the loop this way (timeout=None never does).
        assert waiting.cancelled_caught
        raise TimeoutError(timed_out(last))

    async def _pump_notices(self, pump: NoticePump, timeout: float) -> bool:
        """Read the backend's notices for this ``AsyncTasks`` (no worker of it does now); ``False`` when the
        backend failed (the waiter polls instead)."""
        async with pump.lock:
            try:
                await pump.pump(timeout)
            except Exception as exc:
                self._logger.debug(
                    "could not read the store's notices (%s: %s); polling", type(exc).__name__, exc
                )
                return False
        return True

    def _stored(self, tasks: builtins.list[NewTask], now: float | None = None) -> None:
        """``tasks`` were stored (committed): count them, wake this process's worker if one is due at
        ``now`` (default: the clock's time now), and wake the waiters."""
        if self._observer is not None:
            observe_enqueued(self._observer, tasks)
        worker = self._worker
        if worker is not None:
            if now is None:
                now = self._clock()
            if any(task.run_at <= now for task in tasks):
                worker.wake()
        changed, self._changed = self._changed, None  # what _notify_changed does, without its call
        if changed is not None:
            changed.set()

    def _notify_changed(self) -> None:
        changed, self._changed = self._changed, None
        if changed is not None:
            changed.set()

    def _info(self, record: TaskRecord) -> TaskInfo:
        result = None
        if record.result is not None:
            try:
                result = self._encoding.decode(record.result)
            except Exception as exc:  # any exception: a third-party Encoding may raise anything
                self._logger.warning(
                    "cannot decode the result of task %s, shown as None: %s: %s",
                    record.id,
                    type(exc).__name__,
                    exc,
                )
        chain_id, chain_step, schedule = chain_fields(record)
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
            chain_id=chain_id,
            chain_step=chain_step,
            schedule=schedule,
            damaged=record.fault,
            priority=record.priority,
            concurrency_key=record.concurrency_key,
            expires_at=record.expires_at,
            progress=None
            if record.progress_done is None
            and record.progress_total is None
            and record.progress_message is None
            else (record.progress_done, record.progress_total),
            progress_message=record.progress_message,
            group_id=record.group_id,
            meta=read_user_meta(record.meta),
        )

    def _check_flow(self, what: str) -> None:
        if not supports_flow_control(self._backend):
            raise RuntimeError(
                f"AsyncTasks.{what}() needs a backend with flow control (pause, resume, paused, flow_state); "
                f"{type(self._backend).__name__} has none: update it to the current Backend protocol"
            )

    def _check_control(self, what: str, feature: str) -> None:
        if not supports_control(self._backend):
            raise RuntimeError(
                f"AsyncTasks.{what}(): {feature} need a backend with control of running work "
                "(cancel_requests, save_progress, enqueue_group, get_group); "
                f"{type(self._backend).__name__} has none: update it to the current Backend protocol"
            )

    def _check_open(self, what: str) -> None:
        if not self._open:
            raise RuntimeError(
                f"AsyncTasks.{what}() before the backend is open: add the AsyncTasks to a TaskManager (its "
                "initialize opens the backend), or use `async with tasks:`"
            )


def _mode(if_exists: str) -> dict[str, Any]:
    """The ``if_exists`` keyword for a backend's enqueue: left out for the default, so a backend written
    before debounce existed keeps working."""
    return {} if if_exists == "error" else {"if_exists": if_exists}


def _explained(exc: DuplicateTaskError, tasks: builtins.list[NewTask]) -> DuplicateTaskError:
    """``exc`` with a message that names a uniqueness window when the refused task had one."""
    windowed = [task for task in tasks if task.id in exc.task_ids and task.unique_key is not None]
    if not windowed or exc.reason is not None:
        return exc
    task = windowed[0]
    return DuplicateTaskError(
        exc.task_id,
        exc.task_ids,
        f"task {task.id!r} ({task.name}) was refused: an equal task (the same task_id, or the same name and "
        "arguments) was enqueued less than unique_for ago, or a task with this id is still pending or "
        "active; enqueue it again once the window has passed, or without unique_for",
    )


def _check_id(task_id: object, what: str) -> None:
    check_name(task_id, f"AsyncTasks.{what}(): the task id")


def _check_queue(queue: object, what: str) -> None:
    if queue is not None:
        check_queue(queue, f"AsyncTasks.{what}()")


def _state_of(info: TaskInfo | None, task_id: str) -> str:
    """The state of a task (or of the chain ``task_id`` names) a wait gave up on, for the ``TimeoutError``."""
    if info is None:  # the deadline passed during the first look
        return "the task's state was not read yet"
    chain = info.chain
    if chain is not None and chain.id == task_id:
        step = chain.steps[chain.current]
        return f"the chain is still {chain.state.value} at step {step.index} ({step.name})"
    text = f"the task is still {info.state.value} (attempt {info.attempts} of {info.max_retries + 1}"
    if info.state is TaskState.PENDING and info.attempts:
        text += ", waiting for a retry"
    return f"{text})"
