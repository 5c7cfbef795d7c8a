"""The user-facing nouns of :mod:`lifecycle.asynctask`: TaskInfo, QueueStats, Call, Group, GroupInfo,
TaskContext, Retry and Abort."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, MutableMapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypedDict, overload

import anyio.lowlevel
from typing_extensions import TypeVarTuple, Unpack

from .._checks import check_optional_seconds
from .._redact import library_logger
from ._records import TaskState

__all__ = [
    "Abort",
    "Call",
    "CallOptions",
    "ChainInfo",
    "ChainStep",
    "EnqueueOptions",
    "FlowStats",
    "Group",
    "GroupInfo",
    "QueueStats",
    "Retry",
    "TaskContext",
    "TaskFlow",
    "TaskInfo",
    "Ts",
]

Ts = TypeVarTuple("Ts")
"""The positional parameters of a task function (after its ``TaskContext``, if it takes one), for type
checkers: ``enqueue(fn, *args)`` and ``Call(fn, *args)`` are typed ``Callable[[*Ts], ...]`` / ``*args: *Ts``
so that mypy and pyright check the arguments against the function (see docs/asynctask.md, "Typed calls")."""


class CallOptions(TypedDict, total=False):
    """The keyword options of :class:`Call` (and of :meth:`AsyncTasks.enqueue`), as type checkers see them.

    The typed overloads of ``Call``, ``enqueue`` and the blocking producer's ``enqueue`` take
    ``**options: Unpack[CallOptions]`` so the options are listed once for type checkers; the run-time
    signatures keep their explicit keyword-only parameters. A test checks that both list the same names.
    """

    delay: float | timedelta | None
    at: datetime | float | None
    queue: str | None
    max_retries: int | None
    timeout: float | timedelta | None
    task_id: str | None
    concurrency_key: str | None
    priority: int | None
    unique_for: float | timedelta | None
    debounce: float | timedelta | None
    expires: float | timedelta | datetime | None


class EnqueueOptions(CallOptions, total=False):
    """The keyword options of :meth:`AsyncTasks.enqueue`: those of :class:`Call`, and ``connection``."""

    connection: object | None


@dataclass(frozen=True, slots=True)
class ChainStep:
    """One step of a chain as :class:`ChainInfo` shows it.

    ``state`` is ``None`` while the step is not enqueued yet (an earlier step has not succeeded), or after
    retention removed its record. ``task_id`` is the step's task id (``"<chain id>.<index>"``).
    """

    index: int
    name: str
    task_id: str
    state: TaskState | None = None
    last_error: str | None = None


@dataclass(frozen=True, slots=True)
class ChainInfo:
    """A chain's progress, as ``tasks.info(chain_id).chain`` shows it.

    ``state`` is the chain's state: ``pending``/``active`` while a step waits or runs, ``succeeded`` when the
    last step succeeded, ``dead`` or ``cancelled`` when a step died or was cancelled: the chain stopped there,
    ``current`` is that step's index and the later steps never run. ``current`` is otherwise the index of the
    step the chain is at (the last one once it succeeded). ``result`` is the last step's result once the chain
    succeeded.
    """

    id: str
    state: TaskState
    current: int
    steps: tuple[ChainStep, ...]
    result: Any = None

    @property
    def stopped_at(self) -> int | None:
        """The index of the step that stopped the chain (dead or cancelled), or ``None``."""
        return self.current if self.state in (TaskState.DEAD, TaskState.CANCELLED) else None

    @property
    def succeeded_steps(self) -> int:
        """How many steps succeeded so far."""
        return sum(1 for step in self.steps if step.state is TaskState.SUCCEEDED)


@dataclass(frozen=True, slots=True)
class GroupInfo:
    """A group of tasks run in parallel, as :meth:`AsyncTasks.group_info` and :meth:`AsyncTasks.wait_group`
    return it.

    ``state`` is ``pending`` until a member starts, ``active`` while members run (or wait for a retry),
    ``succeeded`` once every member succeeded (its ``then`` task is enqueued in that same step), and ``dead``
    or ``cancelled`` as soon as a member ended so (the group's ``then`` never runs; the other members run
    on unless cancelled). ``counts`` holds how many members are in each state now (every state is a key).
    ``task_ids`` are the members' ids in call order; ``then_id`` is the ``then`` task's id once it is
    enqueued.

    Example::

        group_id = await tasks.enqueue_group([Call(resize, p) for p in photos], then=Call(publish))
        info = await tasks.wait_group(group_id, timeout=600)
        print(info.state, info.counts[TaskState.SUCCEEDED], info.then_id)
    """

    id: str
    state: TaskState
    counts: dict[TaskState, int]
    task_ids: tuple[str, ...]
    then_id: str | None = None

    @property
    def is_final(self) -> bool:
        """True once the group is ``succeeded``, ``dead`` or ``cancelled``."""
        return self.state.is_final


@dataclass(frozen=True, slots=True)
class TaskInfo:
    """What is known about one stored task, as :meth:`AsyncTasks.info` and :meth:`AsyncTasks.list` return it.

    Times are seconds since the epoch, from the ``AsyncTasks`` clock. ``attempts`` counts how many times a
    worker started the task (including an attempt whose worker died). ``result`` is the decoded return value
    of a succeeded task (``None`` when it returned nothing, or returned something the encoding cannot encode).
    ``last_error`` is the text of the latest failure: exception type, message and traceback.

    A step of a chain has ``chain_id`` and ``chain_step`` (its index); ``chain`` holds the whole chain's
    progress when the task came from :meth:`AsyncTasks.info` (``None`` in :meth:`AsyncTasks.list` rows). A
    task enqueued by a schedule has ``schedule`` (the schedule's name).

    ``damaged`` is set when the backend cannot read the stored record whole (a field of the wrong type, a
    missing field, text that is not UTF-8, written by hand or by a storage fault): it names each such field
    and its value, and those fields show placeholders (``""``, ``0``, ``None``; an unknown state shows as
    ``dead``). A worker makes such a task dead instead of running it.

    Flow control (docs/flow-control.md): ``priority`` (higher runs first within its queue),
    ``concurrency_key`` (what ``max_running_per_key`` counts by), ``expires_at`` (a task not started by then
    is cancelled). ``waiting_on`` says why a pending task that is due has not started: ``"paused"`` (its
    queue), ``"rate_limit"``, ``"max_running"`` or ``"max_running_per_key"`` (its name's registered limits),
    or ``None`` when nothing holds it back (a worker will take it) or it is not a due pending task. Only
    :meth:`AsyncTasks.info` fills it (``None`` in :meth:`AsyncTasks.list` rows); the limits are those
    registered in the asking process.

    ``progress`` is the last ``(done, total)`` the task reported with :meth:`TaskContext.progress` (``None``
    before any report), and ``progress_message`` its message; both are kept after the task ends. ``group_id``
    is the id of the group the task is a member of (:meth:`AsyncTasks.enqueue_group`), or ``None``.
    """

    id: str
    name: str
    queue: str
    state: TaskState
    attempts: int
    max_retries: int
    enqueued_at: float
    run_at: float
    last_error: str | None = None
    result: Any = None
    timeout: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    chain_id: str | None = None
    chain_step: int | None = None
    chain: ChainInfo | None = None
    schedule: str | None = None
    damaged: str | None = None
    priority: int = 0
    concurrency_key: str | None = None
    expires_at: float | None = None
    waiting_on: str | None = None
    progress: tuple[float | None, float | None] | None = None
    progress_message: str | None = None
    group_id: str | None = None

    @property
    def retries_left(self) -> int:
        """How many retries the task has left: ``max_retries`` less the retries already started (every attempt
        after the first is a retry), so a task that has not run yet has all of them; 0 once it is finished."""
        if self.state.is_final:
            return 0
        return max(0, self.max_retries - max(0, self.attempts - 1))


@dataclass(frozen=True, slots=True)
class QueueStats:
    """The number of tasks of one queue in each state, as :meth:`AsyncTasks.stats` returns them."""

    pending: int = 0
    active: int = 0
    succeeded: int = 0
    dead: int = 0
    cancelled: int = 0

    def __getitem__(self, state: TaskState | str) -> int:
        """The count for ``state`` (a :class:`TaskState` or its value, e.g. ``"dead"``)."""
        return int(getattr(self, TaskState(state).value))

    @property
    def total(self) -> int:
        """Every task of the queue, whatever its state."""
        return self.pending + self.active + self.succeeded + self.dead + self.cancelled


@dataclass(frozen=True, slots=True)
class TaskFlow:
    """The flow control of one task name, as :meth:`AsyncTasks.flow` reports it.

    ``rate_limit``, ``max_running`` and ``max_running_per_key`` are the limits registered for the name in
    this process (``None``: not limited that way). ``running`` is how many of its tasks are active in the
    whole store, ``tokens`` the tokens left in its rate bucket now, ``refused`` how many claims (by every
    worker of the store) found its bucket empty; all three are ``None`` for a name without limits.
    ``waiting`` counts the due pending tasks of the name by what holds them back (``"paused"``,
    ``"rate_limit"``, ``"max_running"``, ``"max_running_per_key"``), among the pending tasks read.
    """

    name: str
    rate_limit: str | None
    max_running: int | None
    max_running_per_key: int | None
    running: int | None
    tokens: float | None
    refused: int | None
    waiting: dict[str, int]


@dataclass(frozen=True, slots=True)
class FlowStats:
    """What holds tasks back across the store, as :meth:`AsyncTasks.flow` reports it.

    ``paused`` is the set of paused queues. ``tasks`` maps each task name that has limits registered in this
    process, or due tasks waiting, to its :class:`TaskFlow`. The waiting counts are read from the
    ``sampled`` most recently enqueued pending tasks; ``complete`` is ``False`` when there were more.
    """

    paused: frozenset[str]
    tasks: dict[str, TaskFlow]
    sampled: int
    complete: bool


class Call:
    """One call to enqueue with :meth:`AsyncTasks.enqueue_many`: a function (or registered name), its
    positional arguments, and the same options :meth:`AsyncTasks.enqueue` takes.

    Example::

        await tasks.enqueue_many([Call(update_cache, "a", []), Call("app.jobs.send", 42, delay=60)])
    """

    __slots__ = (
        "args",
        "at",
        "concurrency_key",
        "debounce",
        "delay",
        "expires",
        "max_retries",
        "priority",
        "queue",
        "target",
        "task_id",
        "timeout",
        "unique_for",
    )

    # For type checkers: the arguments are checked against the function's parameters, with or without a
    # leading TaskContext; a registered name takes anything (see docs/asynctask.md, "Typed calls").
    @overload
    def __init__(
        self, target: Callable[[Unpack[Ts]], object], /, *args: Unpack[Ts], **options: Unpack[CallOptions]
    ) -> None: ...

    @overload
    def __init__(
        self,
        target: Callable[[TaskContext, Unpack[Ts]], object],
        /,
        *args: Unpack[Ts],
        **options: Unpack[CallOptions],
    ) -> None: ...

    @overload
    def __init__(self, target: str, /, *args: Any, **options: Unpack[CallOptions]) -> None: ...

    def __init__(
        self,
        target: Callable[..., Any] | str,
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
    ) -> None:
        self.target: Callable[..., Any] | str = target
        self.args: tuple[Any, ...] = args
        self.delay: float | timedelta | None = delay
        self.at: datetime | float | None = at
        self.queue: str | None = queue
        self.max_retries: int | None = max_retries
        self.timeout: float | timedelta | None = timeout
        self.task_id: str | None = task_id
        self.concurrency_key: str | None = concurrency_key
        self.priority: int | None = priority
        self.unique_for: float | timedelta | None = unique_for
        self.debounce: float | timedelta | None = debounce
        self.expires: float | timedelta | datetime | None = expires

    def __repr__(self) -> str:
        target = (
            self.target if isinstance(self.target, str) else getattr(self.target, "__qualname__", self.target)
        )
        args = ", ".join(repr(arg) for arg in self.args)
        return f"Call({target!s}{', ' if args else ''}{args})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Call):
            return NotImplemented
        return all(getattr(self, slot) == getattr(other, slot) for slot in self.__slots__)

    __hash__: ClassVar[None] = None  # type: ignore[assignment]


class Group:
    """Calls that run in parallel, as one step of a chain: ``enqueue_chain([Call(a), Group([Call(b, 1),
    Call(b, 2)]), Call(c)])``.

    Each member receives the previous step's result as ``TaskContext.previous_result``; the step after the
    group receives the list of the members' results, in call order, once every member succeeded (a member
    that ends dead or cancelled stops the chain there). The calls are checked like those of
    :meth:`AsyncTasks.enqueue_group` (``TypeError`` for anything that is not a :class:`Call`, ``ValueError``
    for no calls, at enqueue).

    Example::

        chain_id = await tasks.enqueue_chain(
            [Call(fetch_index), Group([Call(fetch_page, n) for n in range(10)]), Call(merge_pages)]
        )
    """

    __slots__ = ("calls",)

    def __init__(self, calls: Iterable[Call]) -> None:
        if isinstance(calls, Call):
            raise TypeError("Group() takes a list of Call objects: Group([Call(f, 1), Call(f, 2)])")
        self.calls: tuple[Call, ...] = tuple(calls)

    def __repr__(self) -> str:
        return f"Group([{', '.join(repr(call) for call in self.calls)}])"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Group):
            return NotImplemented
        return self.calls == other.calls

    __hash__: ClassVar[None] = None  # type: ignore[assignment]


class _AttemptControl(Protocol):
    """What a running attempt's context reads and reports through (the engine's side of it)."""

    @property
    def cancel_requested(self) -> bool: ...

    def report(self, done: float | None, total: float | None, message: str | None) -> None: ...


_MAX_PROGRESS_MESSAGE = 2000
"""Longer progress messages are cut to this many characters."""


class TaskContext:
    """What a running task knows about itself; declare it as the first parameter to receive it.

    It is recognised by the annotation (``ctx: TaskContext``), so its parameter name is free. ``attempt`` is
    1 on the first run and grows with each retry (a run whose worker died counts too). ``deadline`` is the
    time (seconds since the epoch, the ``AsyncTasks`` clock) at which the task's ``timeout`` cancels it, or
    ``None`` without a timeout. ``logger`` logs through ``lifecycle.asynctask.task`` with the task's name and
    id in front of each message. ``previous_result`` is the (decoded) result of the previous step of a chain,
    ``None`` otherwise (and for the first step); ``chain_id`` is the chain's id for a chain step.
    :attr:`cancel_requested` and :meth:`progress` connect the run with ``tasks.cancel()`` and
    ``tasks.info()``.

    Example::

        @tasks.register
        async def send_mail(ctx: TaskContext, to: str) -> None:
            ctx.logger.info("attempt %d of %d", ctx.attempt, ctx.max_retries + 1)
    """

    __slots__ = (
        "_control",
        "_logger",
        "attempt",
        "chain_id",
        "deadline",
        "enqueued_at",
        "max_retries",
        "name",
        "previous_result",
        "queue",
        "task_id",
    )

    def __init__(
        self,
        *,
        task_id: str,
        name: str,
        queue: str,
        attempt: int,
        max_retries: int,
        enqueued_at: float,
        deadline: float | None = None,
        previous_result: Any = None,
        chain_id: str | None = None,
        control: _AttemptControl | None = None,
    ) -> None:
        self.task_id: str = task_id
        self.name: str = name
        self.queue: str = queue
        self.attempt: int = attempt
        self.max_retries: int = max_retries
        self.enqueued_at: float = enqueued_at
        self.deadline: float | None = deadline
        self.previous_result: Any = previous_result
        self.chain_id: str | None = chain_id
        self._logger: logging.LoggerAdapter[logging.Logger] | None = None
        self._control = control

    @property
    def cancel_requested(self) -> bool:
        """True once ``tasks.cancel()`` asked this running task to stop (read-only).

        An ``async def`` task does not need it: it is cancelled at its next ``await``. A plain ``def`` task
        (running in a worker thread, which cannot be interrupted) should check it now and then and return
        early; whatever it returns then, the task ends ``cancelled`` and is not retried.

        Example::

            @tasks.register
            def export(ctx: TaskContext, rows: list[int]) -> None:
                for row in rows:
                    if ctx.cancel_requested:
                        return
                    write(row)
        """
        control = self._control
        return control is not None and control.cancel_requested

    async def progress(
        self, done: float | None = None, total: float | None = None, message: str | None = None
    ) -> None:
        """Report how far the task is: ``done`` out of ``total`` (any unit, e.g. rows or percent) and/or a
        ``message``. Shown by ``tasks.info(task_id).progress`` / ``.progress_message``, ``lifecycle tasks
        show`` and ``watch``, and the dashboard; kept after the task ends.

        Cheap to call often: the worker stores at most one report per task per second (the latest one),
        and always the last one before the attempt's verdict. ``done`` and ``total`` are finite numbers or
        ``None``; ``message`` is text (cut at 2 000 characters) or ``None``. Raises ``TypeError`` /
        ``ValueError`` naming a bad value. Outside a worker (a context built by hand) it checks its
        arguments and stores nothing. From a plain ``def`` task (a worker thread), call it as
        ``anyio.from_thread.run(ctx.progress, done, total)``.

        Example::

            for n, row in enumerate(rows, 1):
                await handle(row)
                await ctx.progress(n, len(rows), f"row {row.id}")
        """
        checked_done = _progress_number(done, "done")
        checked_total = _progress_number(total, "total")
        if message is not None:
            if not isinstance(message, str):
                raise TypeError(f"TaskContext.progress(): message must be a str or None, got {message!r}")
            if len(message) > _MAX_PROGRESS_MESSAGE:
                message = message[:_MAX_PROGRESS_MESSAGE]
        control = self._control
        if control is not None:
            control.report(checked_done, checked_total, message)
        await anyio.lowlevel.checkpoint()

    @property
    def is_last_attempt(self) -> bool:
        """True when a failure of this run makes the task ``dead`` instead of retrying it."""
        return self.attempt > self.max_retries

    @property
    def logger(self) -> logging.LoggerAdapter[logging.Logger]:
        """A logger that puts ``[task name id]`` before each message and ``task_id``/``task_name`` extras."""
        if self._logger is None:
            self._logger = _TaskLogger(
                library_logger("lifecycle.asynctask.task"),
                {"task_id": self.task_id, "task_name": self.name},
            )
        return self._logger

    def __repr__(self) -> str:
        return (
            f"TaskContext(task_id={self.task_id!r}, name={self.name!r}, queue={self.queue!r}, "
            f"attempt={self.attempt}, max_retries={self.max_retries})"
        )


if TYPE_CHECKING:
    _LoggerAdapter = logging.LoggerAdapter[logging.Logger]
else:  # LoggerAdapter is subscriptable at run time only from Python 3.11
    _LoggerAdapter = logging.LoggerAdapter


def _progress_number(value: object, what: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"TaskContext.progress(): {what} must be a number or None, got {value!r}")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise ValueError(f"TaskContext.progress(): {what} must be a finite number, got {value!r}")
    return number


class _TaskLogger(_LoggerAdapter):
    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        extra = self.extra or {}
        kwargs["extra"] = {**extra, **kwargs.get("extra", {})}
        return f"[{extra.get('task_name')} {extra.get('task_id')}] {msg}", kwargs


class Retry(Exception):
    """Raise from a task to ask for another attempt, ``after`` seconds from now (or after the usual backoff
    when ``after`` is ``None``).

    A retry requested this way still counts as an attempt and is bounded by ``max_retries``: when none is
    left the task goes ``dead`` with ``reason`` in its error. ``after`` is seconds (or a ``timedelta``) >= 0:
    anything else is a ``TypeError``, a negative or non-finite number a ``ValueError``.

    Example::

        if response.status == 429:
            raise Retry(after=float(response.headers["Retry-After"]), reason="rate limited")
    """

    def __init__(self, after: float | timedelta | None = None, reason: str = "") -> None:
        self.after: float | None = check_optional_seconds(after, "Retry(after=...)", allow_zero=True)
        self.reason = reason
        super().__init__(
            reason or (f"retry requested after {self.after} s" if self.after is not None else "")
        )

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickle by the constructor's arguments (``args`` holds the message, not them)."""
        return type(self), (self.after, self.reason), self.__dict__


class Abort(Exception):
    """Raise from a task to fail it for good: it goes ``dead`` at once with ``reason``, without retries.

    Example::

        if order is None:
            raise Abort(f"order {order_id} does not exist")
    """

    def __init__(self, reason: str = "") -> None:
        self.reason = reason
        super().__init__(reason)


def describe_target(target: object) -> str:
    """A short human name for a function or registered name, for error messages."""
    if isinstance(target, str):
        return repr(target)
    return str(getattr(target, "__qualname__", None) or getattr(target, "__name__", None) or repr(target))
