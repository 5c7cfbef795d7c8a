"""Synchronous producers: ``with tasks.blocking() as producer: producer.enqueue(fn, *args)`` from Django,
Flask, scripts and any other code that runs without an event loop.

The producer runs the ``AsyncTasks`` in an event loop of its own (asyncio, in a background thread: an
anyio blocking portal) that opens the backend when the first ``with`` block starts and closes it when the
last one ends. Every method hands its call to that loop and blocks the calling thread until it is done, so
one producer may be shared by all the threads of a WSGI server.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import sys
import threading
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from datetime import datetime, timedelta
from typing import Any, Protocol, TypeVar, overload

from anyio.from_thread import BlockingPortal, start_blocking_portal
from typing_extensions import Unpack

from ._model import Call, EnqueueOptions, TaskContext, TaskInfo, Ts
from ._records import TaskState
from ._tracing import current_trace

__all__ = ["BlockingProducer", "ProducerHost", "running_event_loop"]

T = TypeVar("T")


class Tasks(Protocol):
    """What a producer uses of its ``AsyncTasks`` (a protocol, so that this module does not import the
    class that imports it)."""

    async def initialize(self) -> None: ...

    async def cleanup(self) -> None: ...

    async def _enqueue_many(
        self, calls: Iterable[Call], connection: object | None, trace: dict[str, str] | None
    ) -> list[str]: ...

    async def _enqueue_one(self, call: Call, trace: dict[str, str] | None) -> str: ...

    async def _enqueue_chain(self, calls: Sequence[Call], trace: dict[str, str] | None) -> str: ...

    async def info(self, task_id: str) -> TaskInfo | None: ...

    async def wait(
        self,
        task_id: str,
        *,
        timeout: float | timedelta | None = None,
        states: Collection[TaskState | str] | None = None,
    ) -> TaskInfo: ...


def running_event_loop() -> str | None:
    """The async library whose event loop runs in this thread (``"asyncio"``, ``"trio"``), or ``None``."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        return "asyncio"
    trio = sys.modules.get("trio")
    if trio is not None:
        try:
            trio.lowlevel.current_task()
        except RuntimeError:
            pass
        else:
            return "trio"
    return None


def refuse_in_event_loop(what: str, instead: str) -> None:
    """Raise ``RuntimeError`` when called from a thread that runs an event loop: blocking it until the
    backend answers would stall every other task of that loop."""
    library = running_event_loop()
    if library is not None:
        raise RuntimeError(
            f"{what} blocks its thread, and was called from inside a running {library} event loop, which it "
            f"would stall: in async code use the async API instead ({instead})"
        )


class BlockingProducer:
    """Enqueue and inspect tasks from synchronous code: what ``with tasks.blocking() as producer:`` gives.

    Its methods take the same arguments as the async methods of :class:`AsyncTasks` they are named after,
    and block until the backend answered. It may be shared by several threads. It works only inside its
    ``with`` block (``RuntimeError`` after it), and never from inside a running event loop (``RuntimeError``
    pointing to the async API).

    Example::

        with tasks.blocking() as producer:
            task_id = producer.enqueue(send_welcome, 42)
            print(producer.wait(task_id, timeout=30).state)
    """

    __slots__ = ("_portal", "_tasks")

    def __init__(self, tasks: Tasks, portal: BlockingPortal) -> None:
        self._tasks = tasks
        self._portal: BlockingPortal | None = portal

    def __repr__(self) -> str:
        state = "open" if self._portal is not None else "closed"
        return f"<BlockingProducer of {self._tasks!r}, {state}>"

    # For type checkers: as AsyncTasks.enqueue (see docs/asynctask.md, "Typed calls").
    @overload
    def enqueue(
        self, fn: Callable[[Unpack[Ts]], object], /, *args: Unpack[Ts], **options: Unpack[EnqueueOptions]
    ) -> str: ...

    @overload
    def enqueue(
        self,
        fn: Callable[[TaskContext, Unpack[Ts]], object],
        /,
        *args: Unpack[Ts],
        **options: Unpack[EnqueueOptions],
    ) -> str: ...

    @overload
    def enqueue(self, fn: str, /, *args: Any, **options: Unpack[EnqueueOptions]) -> str: ...

    def enqueue(
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
        """Store a call of ``fn`` and return its task id: :meth:`AsyncTasks.enqueue`, blocking.

        Raises what :meth:`AsyncTasks.enqueue` raises (``TypeError`` for arguments that do not fit the
        function, before anything is stored), and ``RuntimeError`` outside the ``with`` block or inside a
        running event loop. ``connection=`` takes what the backend's ``enqueue_many_in`` takes (for
        ``PostgresBackend`` a ``psycopg.AsyncConnection``, which synchronous code rarely has: enqueue
        after your commit instead, e.g. in Django's ``transaction.on_commit``).
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
            concurrency_key=concurrency_key,
            priority=priority,
            unique_for=unique_for,
            debounce=debounce,
            expires=expires,
            meta=meta,
        )
        if connection is not None:
            return self._enqueue("enqueue", [call], connection)[0]
        # Threads enqueueing at once share round trips, as concurrent AsyncTasks.enqueue calls do.
        run = functools.partial(self._tasks._enqueue_one, call, current_trace())
        return self._call("enqueue", "await tasks.enqueue(...)", run)

    def enqueue_many(self, calls: Iterable[Call], *, connection: object | None = None) -> list[str]:
        """Store several calls in one round trip (all or nothing): :meth:`AsyncTasks.enqueue_many`,
        blocking."""
        return self._enqueue("enqueue_many", calls, connection)

    def _enqueue(self, what: str, calls: Iterable[Call], connection: object | None) -> list[str]:
        trace = current_trace()  # this thread's span: the portal's thread has a context of its own
        run = functools.partial(self._tasks._enqueue_many, calls, connection, trace)
        return self._call(what, f"await tasks.{what}(...)", run)

    def enqueue_chain(self, calls: Sequence[Call]) -> str:
        """Store a chain of calls run one after the other and return the chain's id:
        :meth:`AsyncTasks.enqueue_chain`, blocking."""
        run = functools.partial(self._tasks._enqueue_chain, calls, current_trace())
        return self._call("enqueue_chain", "await tasks.enqueue_chain(...)", run)

    def info(self, task_id: str) -> TaskInfo | None:
        """The task with this id, or ``None``: :meth:`AsyncTasks.info`, blocking."""
        return self._call("info", "await tasks.info(...)", functools.partial(self._tasks.info, task_id))

    def wait(
        self,
        task_id: str,
        *,
        timeout: float | timedelta | None = None,
        states: Collection[TaskState | str] | None = None,
    ) -> TaskInfo:
        """Block until the task is finished (or in one of ``states``) and return it: :meth:`AsyncTasks.wait`
        (``TimeoutError`` after ``timeout`` seconds, ``LookupError`` for an unknown id).

        Without a worker in the producer's own loop, changes are seen by polling every ``poll_interval``.
        """
        run = functools.partial(self._tasks.wait, task_id, timeout=timeout, states=states)
        return self._call("wait", "await tasks.wait(...)", run)

    def _call(self, what: str, instead: str, run: Callable[[], Awaitable[T]]) -> T:
        refuse_in_event_loop(f"producer.{what}()", instead)
        portal = self._portal
        if portal is None:
            raise RuntimeError(
                f"producer.{what}() after its `with tasks.blocking() as producer:` block ended (the "
                "producer's connection is closed): call it inside the block"
            )
        return portal.call(run)


class ProducerHost:
    """The event loop thread and open backend shared by the ``with tasks.blocking()`` blocks of one
    ``AsyncTasks``: the first block to start opens them, the last to end closes them."""

    __slots__ = ("_lock", "_portal_cm", "_producer", "_tasks", "_users", "thread")

    def __init__(self, tasks: Tasks) -> None:
        self._tasks = tasks
        self._lock = threading.Lock()
        self._users = 0
        self._portal_cm: AbstractContextManager[BlockingPortal] | None = None
        self._producer: BlockingProducer | None = None
        self.thread: int | None = None
        """The identity of the producer's event loop thread while it runs."""

    def enter(self, is_open: Callable[[], bool]) -> BlockingProducer:
        """The shared producer; starts its thread and opens the backend for the first user."""
        refuse_in_event_loop("tasks.blocking()", "async with tasks: ... await tasks.enqueue(...)")
        with self._lock:
            if self._producer is None:
                if is_open():
                    raise RuntimeError(
                        "tasks.blocking(): this AsyncTasks is open already in an event loop (a running "
                        "TaskManager, or `async with tasks:`), and its backend belongs to that loop; give "
                        "the synchronous code an AsyncTasks of its own (same backend settings, "
                        "execution=False)"
                    )
                self._producer = self._start()
            self._users += 1
            return self._producer

    def exit(self) -> None:
        """One user is done; the last one closes the backend and stops the thread."""
        with self._lock:
            self._users -= 1
            if self._users:
                return
            producer, portal_cm = self._producer, self._portal_cm
            self._producer = self._portal_cm = None
            assert producer is not None
            assert portal_cm is not None
            portal, producer._portal = producer._portal, None
            try:
                if portal is not None:
                    portal.call(self._tasks.cleanup)
            finally:
                self.thread = None
                portal_cm.__exit__(None, None, None)

    def _start(self) -> BlockingProducer:
        portal_cm = start_blocking_portal("asyncio", name="lifecycle-producer")
        portal = portal_cm.__enter__()
        try:
            self.thread = portal.call(_thread_id)
            try:
                portal.call(self._tasks.initialize)
            except BaseException:
                with contextlib.suppress(Exception):  # the open's error is the one to raise
                    portal.call(self._tasks.cleanup)  # what a failed open left (idempotent)
                raise
        except BaseException:
            self.thread = None
            portal_cm.__exit__(*sys.exc_info())
            raise
        self._portal_cm = portal_cm
        return BlockingProducer(self._tasks, portal)


async def _thread_id() -> int:
    return threading.get_ident()
