"""Running one claimed task: decode its arguments, call the function under its deadline, and turn the outcome
into a verdict (:class:`Settlement`)."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Awaitable, Callable, Coroutine
from types import FrameType
from typing import Any

import anyio

from .._chain import chain_fields, previous_result
from .._clock import Clock
from .._encoding import Encoding
from .._group import after_group
from .._meta import read_user_meta
from .._middleware import Hooks, run_middleware
from .._model import TaskContext
from .._records import ClaimedTask, GroupRecord, Settlement, TaskRecord, TaskState
from .._registry import Registry, TaskDefinition
from .._tracing import Tracing, attempt_span
from ._control import ProgressBook
from ._loop import ANYIO_PRIMITIVES, LoopPrimitives, Scope
from ._options import ErrorHook
from ._upkeep import call_error_hook
from ._verdict import Policy, error_text, is_cancelled_from_outside

__all__ = ["CANCEL", "LOST", "SHUTDOWN", "Running", "Scope", "TaskRunner"]

LOST = "lease lost"
"""Cancel reason: another worker took the task over; its verdict is not ours to save."""

SHUTDOWN = "shutdown"
"""Cancel reason: the shutdown grace is over; the task goes back to pending, attempt refunded."""

CANCEL = "cancel requested"
"""Cancel reason: ``tasks.cancel()`` asked the running task to stop; it ends ``cancelled``, no retry."""

_TRACE_MODULE = "opentelemetry.trace"
"""Imported by the application before any tracer provider can be configured (see :mod:`.._tracing`)."""


class Running:
    """A claimed task in this worker: its lease, its cancel scope once it runs, why it was cancelled, and the
    control its :class:`TaskContext` reads (``cancel_requested``) and reports progress through."""

    __slots__ = (
        "book",
        "cancel_requested",
        "claimed",
        "error",
        "is_async",
        "queued_at",
        "reason",
        "reported",
        "scope",
    )

    def __init__(
        self, claimed: ClaimedTask, book: ProgressBook | None = None, queued_at: float = 0.0
    ) -> None:
        self.claimed = claimed
        self.book = book
        self.queued_at = queued_at  # the event loop's time when it was queued for a runner
        self.scope: Scope | None = None
        self.reason: str | None = None
        self.error: BaseException | None = None  # why the attempt failed, for its span
        self.is_async = True  # until the runner knows the function
        self.cancel_requested = False
        self.reported = False  # whether the book may hold progress of this attempt (to write or forget)

    def cancel(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
        if self.scope is not None:
            self.scope.cancel()

    def request_cancel(self) -> bool:
        """``tasks.cancel()`` asked this attempt to stop: an ``async def`` task's scope is cancelled, a plain
        ``def`` task sees ``ctx.cancel_requested`` (its thread cannot be interrupted). Either way the attempt
        ends ``cancelled``. Returns ``False`` when the attempt was stopping for another reason already."""
        self.cancel_requested = True
        if self.reason is not None:
            return False
        self.reason = CANCEL
        if self.scope is not None and self.is_async:
            self.scope.cancel()
        return True

    def report(self, done: float | None, total: float | None, message: str | None) -> None:
        """Keep the attempt's latest progress (what ``ctx.progress()`` reports); the book stores it soon."""
        book = self.book
        if book is not None:
            self.reported = True
            book.report(self.claimed, done, total, message)


class TaskRunner:
    """Executes claimed tasks for one worker (every policy decision is the :class:`Policy`'s)."""

    def __init__(
        self,
        registry: Registry,
        encoding: Encoding,
        policy: Policy,
        clock: Clock,
        on_error: ErrorHook | None,
        logger: logging.Logger,
        groups: Callable[[str], Awaitable[GroupRecord | None]] | None = None,
        hooks: Hooks | None = None,
    ) -> None:
        self._groups = groups
        self._registry = registry
        self._hooks = hooks if hooks is not None else Hooks()
        self._encoding = encoding
        self._policy = policy
        self._clock = clock
        self._on_error = on_error
        self._logger = logger
        self.limiter: anyio.CapacityLimiter | None = None
        self.executing: dict[FrameType, Running] = {}
        """The frame of each task function call in progress: what the loop watchdog finds on a blocked
        loop's stack to name the task that blocks it (read from its thread: plain dict lookups only)."""
        self._tracing = Tracing()
        self._tracer: Any = None  # the tracer of the attempts of the latest claimed batch; None: tracing off
        self.attempt: Callable[[Running], Coroutine[Any, Any, Settlement | None]] = self._attempt
        """What :meth:`run` calls for the attempts of the latest claimed batch: the worker calls it directly
        (one call less per task)."""
        # The running event loop's cancel scope class and clock, looked up at the first attempt (a worker
        # serves one event loop): anyio.CancelScope() and anyio.current_time() find the running library
        # anew on every call, and this is paid once per task.
        self._new_scope: Callable[..., Scope] = ANYIO_PRIMITIVES.new_scope
        self._loop_time: Callable[[], float] = ANYIO_PRIMITIVES.clock

    def use_loop(self, primitives: LoopPrimitives) -> None:
        """Make the attempts' cancel scopes with the running loop's ``primitives`` (looked up by the worker;
        without this call, anyio's own, which look the running library up each time)."""
        self._new_scope, self._loop_time = primitives.new_scope, primitives.clock

    def look_up_tracer(self) -> None:
        """Find out whether OpenTelemetry is configured, for the attempts of a batch just claimed: once per
        batch, as the provider check reads the environment (a provider configured meanwhile applies from the
        next batch on)."""
        # No tracer can be configured before the application imports the module.
        tracer = self._tracer = self._tracing.tracer() if _TRACE_MODULE in sys.modules else None
        self.attempt = self._attempt if tracer is None else functools.partial(self._run_traced, tracer)

    def run(self, running: Running) -> Coroutine[Any, Any, Settlement | None]:
        """Run one claimed task and return its verdict (``None``: the lease was lost, nothing to save).

        With OpenTelemetry configured, the attempt runs in its span (see :mod:`.._tracing`)."""
        return self.attempt(running)

    async def _run_traced(self, tracer: Any, running: Running) -> Settlement | None:
        with attempt_span(tracer, running.claimed.record) as span:
            verdict = await self._attempt(running)
            return span.finish(verdict, running.error)

    async def _attempt(self, running: Running) -> Settlement | None:
        # The common case runs straight through this one frame: it is paid once per task.
        claimed = running.claimed
        record = claimed.record
        reason = running.reason  # read again after each await: the worker may stop the attempt meanwhile
        if reason is not None or record.cancel_requested or record.fault is not None:
            return await self._not_started(running)
        definition = self._registry.get(record.name)
        if definition is None:
            return await self._unknown(running)
        try:
            args = self._encoding.decode(record.payload)
            if type(args) is list:
                args = tuple(args)
            elif type(args) is not tuple:
                args = _arguments(args)
        except Exception as decode_error:  # any exception: a third-party Encoding may raise anything
            return await self._undecodable(running, decode_error)
        if not definition.min_args <= len(args) <= definition.max_args:
            try:
                definition.check_arity(len(args))
            except TypeError as arity_error:
                verdict = self._policy.failure(claimed, now=self._clock(), error=str(arity_error))
                return await self._failed(running, verdict, arity_error)
        timeout = record.timeout
        middleware = self._hooks.middleware  # the middleware of this attempt, even if more are added
        ctx: TaskContext | None = None
        if definition.takes_context or middleware:
            try:
                previous = await self._previous_result(record)
            except Exception as exc:  # the store failed while reading the group's results: try again later
                error = f"could not read the results of the group before this task: {_describe(exc)}"
                return await self._failed(
                    running, self._policy.failure(claimed, now=self._clock(), error=error), exc
                )
            if running.reason is not None:  # stopped while the results were read
                return self.stopped(running)
            ctx = TaskContext(
                task_id=record.id,
                name=record.name,
                queue=record.queue,
                attempt=record.attempts,
                max_retries=record.max_retries,
                enqueued_at=record.enqueued_at,
                deadline=None if timeout is None else self._clock() + timeout,
                previous_result=previous,
                chain_id=chain_fields(record)[0],
                control=running,
                meta=read_user_meta(record.meta),
            )
            if definition.takes_context:
                args = (ctx, *args)
        running.is_async = is_async = definition.is_async
        new_scope = self._new_scope
        scope = new_scope() if timeout is None else new_scope(deadline=self._loop_time() + timeout)
        running.scope = scope
        if running.reason is not None:
            scope.cancel()
        finished = False
        result: Any = None
        failure: BaseException | None = None
        executing = self.executing
        frame = sys._getframe()
        executing[frame] = running
        try:
            with scope:
                if ctx is not None and middleware:
                    invoke = functools.partial(self._invoke, definition, args)
                    result = await run_middleware(middleware, ctx, invoke)
                elif is_async:
                    result = await definition.fn(*args)
                else:
                    result = await self._invoke(definition, args)
                finished = True
        except BaseException as exc:
            # KeyboardInterrupt, SystemExit, GeneratorExit, any BaseException the task raises is its own
            # failure; only a cancellation from outside (the worker's task group) goes on.
            if is_cancelled_from_outside(exc):
                raise
            failure = exc
        finally:
            del executing[frame]
        now = self._clock()
        reason = running.reason
        if reason == CANCEL:  # whatever the task did after the request, the attempt is cancelled
            return self._policy.cancelled(claimed, now=now, ran=True)
        if finished:
            verdict = self._policy.success(claimed, now=now, result=self._encode_result(record, result))
            if self._hooks.on_enqueue and (verdict.then or verdict.then_groups):
                return await self._prepare_follow_ups(running, verdict)
            return verdict
        if reason == LOST:
            return None
        if reason == SHUTDOWN:
            return self._policy.release(claimed, now=now)
        if failure is None or (scope.cancel_called and reason is None):
            timed_out = TimeoutError(f"timed out after {timeout:g} s (attempt {record.attempts})")
            if failure is not None:
                timed_out.__cause__ = failure
            verdict = self._policy.failure(claimed, now=now, error=str(timed_out))
            return await self._failed(running, verdict, timed_out)
        return await self._failed(running, self._policy.for_exception(claimed, failure, now=now), failure)

    async def _not_started(self, running: Running) -> Settlement | None:
        """The verdict of an attempt that does not run: stopped or lost before it started, asked to cancel
        while an earlier attempt ran, or a damaged record."""
        claimed = running.claimed
        record = claimed.record
        policy = self._policy
        if running.reason is not None:
            return self.stopped(running)
        if record.cancel_requested:  # asked while an earlier attempt ran: this one never starts
            running.cancel_requested = True
            return policy.cancelled(claimed, now=self._clock(), ran=False)
        verdict = policy.damaged(claimed, now=self._clock())
        return await self._failed(running, verdict, ValueError(verdict.error))

    async def _unknown(self, running: Running) -> Settlement:
        """The verdict of a task whose name no function of this worker is registered under."""
        name = running.claimed.record.name
        known = ", ".join(self._registry.names()) or "none"
        exc = LookupError(
            f"no task function is registered under the name {name!r} in this worker (it knows: "
            f"{known}); register it, or fix the name the producer used"
        )
        verdict = self._policy.failure(running.claimed, now=self._clock(), error=str(exc))
        return await self._failed(running, verdict, exc)

    async def _undecodable(self, running: Running, decode_error: Exception) -> Settlement:
        """The verdict of a task whose arguments the encoding cannot decode: dead."""
        cause = str(decode_error) if type(decode_error) is ValueError else _describe(decode_error)
        error = (
            f"cannot decode the arguments of task {running.claimed.record.name!r}: {cause}; the payload will "
            "not become readable by retrying, so the task is dead (enqueue a corrected task)"
        )
        verdict = self._policy.dead(running.claimed, now=self._clock(), error=error)
        return await self._failed(running, verdict, decode_error)

    def stopped(self, running: Running) -> Settlement | None:
        """The verdict of an attempt stopped before its function was called (``None``: the lease was lost)."""
        now = self._clock()
        if running.reason == CANCEL:
            return self._policy.cancelled(running.claimed, now=now, ran=False)
        if running.reason == SHUTDOWN:
            return self._policy.release(running.claimed, now=now)
        return None

    async def _invoke(self, definition: TaskDefinition, args: tuple[Any, ...]) -> Any:
        """Call the task function: awaited, or a plain ``def`` in a worker thread."""
        if definition.is_async:
            return await definition.fn(*args)
        result, raised = await anyio.to_thread.run_sync(
            functools.partial(_capture, definition.fn, *args),
            abandon_on_cancel=True,
            limiter=self.limiter,
        )
        if raised is not None:
            raise raised
        return result

    async def _prepare_follow_ups(self, running: Running, verdict: Settlement) -> Settlement:
        """``verdict`` with what its success enqueues (a chain's next step, a group) through this process's
        ``on_enqueue`` hooks; a hook that raises makes the task dead, saying so (nothing is enqueued)."""
        try:
            return self._hooks.prepare_settlement(verdict)
        except Exception as exc:  # the user's hook: whatever it raises
            error = (
                "the task ran, but an on_enqueue hook refused what its success enqueues next (the next step "
                f"of its chain): {error_text(exc)}\nfix the hook, then requeue the task (it runs again)"
            )
            return await self._failed(
                running, self._policy.dead(running.claimed, now=verdict.at, error=error), exc
            )

    async def _previous_result(self, record: TaskRecord) -> Any:
        group_id = after_group(record)
        if group_id is not None and self._groups is not None:
            return await self._group_results(record, group_id)
        encoded = previous_result(record)
        if encoded is None:
            return None
        try:
            return self._encoding.decode(encoded)
        except Exception as exc:
            self._logger.warning(
                "task %s (%s): cannot decode the previous step's result, so previous_result is None: %s",
                record.id,
                record.name,
                _describe(exc),
            )
            return None

    async def _group_results(self, record: TaskRecord, group_id: str) -> list[Any] | None:
        """The results of the group ``record`` runs after, decoded, in call order (an undecodable one is
        ``None``); ``None`` when the group's record is gone (removed by retention)."""
        assert self._groups is not None
        group = await self._groups(group_id)
        if group is None:
            self._logger.warning(
                "task %s (%s): the group %s it runs after is gone (removed by retention?), so "
                "previous_result is None",
                record.id,
                record.name,
                group_id,
            )
            return None
        results: list[Any] = []
        for index, encoded in enumerate(group.results):
            if encoded is None:
                results.append(None)
                continue
            try:
                results.append(self._encoding.decode(encoded))
            except Exception as exc:
                self._logger.warning(
                    "task %s (%s): cannot decode the result of member %d of group %s, so it is None: %s",
                    record.id,
                    record.name,
                    index,
                    group_id,
                    _describe(exc),
                )
                results.append(None)
        return results

    def _encode_result(self, record: TaskRecord, result: Any) -> bytes | None:
        """The encoded result, or ``None`` when the encoding cannot encode it: the task ran, so it succeeds
        without a stored result (running it again would repeat its side effects for nothing)."""
        if result is None:
            return None
        try:
            return self._encoding.encode(result)
        except TypeError as exc:  # the encoding's documented way to refuse a value
            self._logger.debug("task %s (%s): result not stored: %s", record.id, record.name, exc)
        except Exception as exc:
            self._logger.warning(
                "task %s (%s) succeeded, but its result is not stored: the encoding raised %s",
                record.id,
                record.name,
                _describe(exc),
                exc_info=exc,
            )
        return None

    async def _failed(self, running: Running, settlement: Settlement, exc: BaseException) -> Settlement:
        running.error = exc
        record = running.claimed.record
        if settlement.state is TaskState.DEAD:
            self._logger.warning(
                "task %s (%s) is dead after attempt %d: %s",
                record.id,
                record.name,
                record.attempts,
                _first_line(settlement.error),
            )
        elif self._logger.isEnabledFor(logging.INFO):
            self._logger.info(
                "task %s (%s) failed attempt %d, retrying in %.2f s: %s",
                record.id,
                record.name,
                record.attempts,
                (settlement.run_at or settlement.at) - settlement.at,
                _first_line(settlement.error),
            )
        if self._on_error is not None:
            await call_error_hook(self._on_error, record, settlement, exc, self._logger)
        return settlement


def _arguments(value: Any) -> tuple[Any, ...]:
    """A decoded payload that is not a tuple as the argument tuple: a list's items, else ``ValueError``."""
    if isinstance(value, list):
        return tuple(value)
    raise ValueError(f"the payload holds {type(value).__name__}, not an argument list")


def _capture(fn: Any, *args: Any) -> tuple[Any, BaseException | None]:
    """Call ``fn`` in a worker thread and return ``(result, None)`` or ``(None, what it raised)``.

    What the function raises is raised again in the task's own frame: passed through the event loop instead,
    a ``GeneratorExit`` would be thrown into the outermost coroutine of the worker, past the task's handler.
    """
    try:
        return fn(*args), None
    except BaseException as exc:
        return None, exc


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _first_line(text: str | None) -> str:
    if not text:
        return ""
    lines = text.strip().splitlines()
    return lines[-1] if lines and lines[0].startswith("Traceback") else lines[0]
