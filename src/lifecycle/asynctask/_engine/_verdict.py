"""The engine's failure policy as pure functions: how a finished attempt becomes a :class:`Settlement`.

Retry or dead, backoff delays, error texts: all decided here from the claimed record, the time and the
backoff, so the rules are tested without running anything.
"""

from __future__ import annotations

import math
import random
import traceback
from dataclasses import dataclass

import anyio

from ..._compat import BaseExceptionGroup, unwrap_single
from ..._core._backoff import Backoff
from ..._redact import redact
from .._chain import follow_up
from .._model import Abort, Retry
from .._records import ClaimedTask, Settlement, TaskState

__all__ = [
    "MAX_ERROR_CHARS",
    "Policy",
    "error_text",
    "is_cancellation",
    "is_cancelled_from_outside",
    "storable",
]

MAX_ERROR_CHARS = 32_000
"""Longer error texts keep their start and end (the exception line is at the end of a traceback)."""


@dataclass(frozen=True, slots=True)
class Policy:
    """Retry policy shared by every task of one ``AsyncTasks``."""

    backoff: Backoff
    rng: random.Random

    def success(self, claimed: ClaimedTask, *, now: float, result: bytes | None) -> Settlement:
        """The task returned. A chain step's success enqueues the next step in the same atomic settlement;
        damaged chain bookkeeping makes the step dead (saying so) rather than silently ending the chain."""
        record = claimed.record
        if record.meta is None:  # no chain step (the common case, once per task): nothing follows it
            return Settlement(
                task_id=record.id, token=claimed.token, state=TaskState.SUCCEEDED, at=now, result=result
            )
        try:
            then, then_groups = follow_up(claimed.record, result, now)
        except ValueError as exc:
            return self.dead(
                claimed,
                now=now,
                error=f"the task ran, but its chain cannot continue: {exc}; re-enqueue the remaining steps",
            )
        return Settlement(
            task_id=claimed.record.id,
            token=claimed.token,
            state=TaskState.SUCCEEDED,
            at=now,
            result=result,
            then=then,
            then_groups=then_groups,
        )

    def failure(
        self, claimed: ClaimedTask, *, now: float, error: str, retry_after: float | None = None
    ) -> Settlement:
        """A failed attempt: retried at ``now`` + backoff (or ``retry_after``) while attempts are left
        (``attempts <= max_retries``), ``dead`` otherwise. ``error`` becomes ``last_error`` either way."""
        record = claimed.record
        if record.fault is not None:
            return self.damaged(claimed, now=now)
        if record.attempts <= record.max_retries:
            delay = retry_after if retry_after is not None else self.backoff.delay(record.attempts, self.rng)
            return Settlement(
                task_id=record.id,
                token=claimed.token,
                state=TaskState.PENDING,
                at=now,
                run_at=now + delay,
                error=storable(error),
            )
        return self.dead(claimed, now=now, error=error)

    def dead(self, claimed: ClaimedTask, *, now: float, error: str) -> Settlement:
        """Failed for good, without a retry."""
        record_id, token = claimed.record.id, claimed.token
        return Settlement(task_id=record_id, token=token, state=TaskState.DEAD, at=now, error=storable(error))

    def damaged(self, claimed: ClaimedTask, *, now: float) -> Settlement:
        """Dead at once: the backend could not read the stored record whole (``TaskRecord.fault``), so
        running it again cannot help."""
        record = claimed.record
        return self.dead(
            claimed,
            now=now,
            error=f"the stored record of task {record.id!r} is damaged ({record.fault}), so it cannot run; "
            "enqueue a corrected task",
        )

    def cancelled(self, claimed: ClaimedTask, *, now: float, ran: bool) -> Settlement:
        """Cancelled for good, without a retry: ``tasks.cancel()`` asked the task to stop while it ran
        (``ran``), or before this attempt started (an earlier attempt was asked, or its worker was lost)."""
        record = claimed.record
        if ran:
            error = (
                f"cancelled while running (attempt {record.attempts}): tasks.cancel() asked the task to stop"
            )
        else:
            error = (
                f"cancelled: tasks.cancel() asked the task to stop while attempt {record.attempts} was held, "
                "so it does not run again"
            )
        return Settlement(
            task_id=record.id, token=claimed.token, state=TaskState.CANCELLED, at=now, error=error
        )

    def release(self, claimed: ClaimedTask, *, now: float) -> Settlement:
        """Back to pending at once without counting the attempt (graceful shutdown, a task claimed ahead that
        no runner took), due when it was due: it keeps its place among the tasks of its priority, before those
        enqueued after it."""
        record = claimed.record
        return Settlement(
            task_id=record.id,
            token=claimed.token,
            state=TaskState.PENDING,
            at=now,
            run_at=record.run_at if math.isfinite(record.run_at) else now,
            refund_attempt=True,
        )

    def for_exception(self, claimed: ClaimedTask, exc: BaseException, *, now: float) -> Settlement:
        """The verdict for an attempt that raised ``exc``: :class:`Retry` asks for a retry (still bounded by
        ``max_retries``), :class:`Abort` makes the task dead at once, anything else is a failure."""
        request = unwrap_single(exc)  # a task group around the task's code wraps what it raises
        if isinstance(request, Abort):
            reason = request.reason or "no reason given"
            return self.dead(claimed, now=now, error=f"aborted by the task: {reason}\n{error_text(request)}")
        if isinstance(request, Retry):
            record = claimed.record
            what = request.reason or "no reason given"
            if record.attempts > record.max_retries:
                error = (
                    f"the task asked for a retry ({what}) but has no retries left "
                    f"(attempt {record.attempts}, max_retries={record.max_retries})"
                )
                return self.dead(claimed, now=now, error=error)
            return self.failure(claimed, now=now, error=f"retry requested: {what}", retry_after=request.after)
        return self.failure(claimed, now=now, error=error_text(exc))


def storable(text: str) -> str:
    """``text`` as every backend can store it: each NUL written as ``\\x00`` (PostgreSQL refuses NUL in text)
    and each lone surrogate as ``\\udc80`` (not encodable as UTF-8), so an exception message holding one
    cannot block the saving of its verdict, nor of the verdicts saved in the same batch."""
    if "\x00" in text:
        text = text.replace("\x00", "\\x00")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def is_cancellation(exc: BaseException) -> bool:
    """True when ``exc`` is (or a group around it holds) the running async library's cancellation: the one
    ``BaseException`` a task's run passes on instead of counting it as the task's failure."""
    cancelled = anyio.get_cancelled_exc_class()
    if isinstance(exc, BaseExceptionGroup):
        return exc.subgroup(lambda inner: isinstance(inner, cancelled)) is not None
    return isinstance(exc, cancelled)


def is_cancelled_from_outside(exc: BaseException) -> bool:
    """True when ``exc`` is a cancellation and the current task is being cancelled (its scopes, outside a
    task's own scope that has exited by now): the worker's own stop, which passes on. Otherwise a cancellation
    exception is the task's doing (an ``asyncio.CancelledError`` it raised, or got from awaiting a future
    someone else cancelled) and counts as its failure, like any other ``BaseException``."""
    return is_cancellation(exc) and anyio.current_effective_deadline() == -math.inf


def error_text(exc: BaseException) -> str:
    """The exception type, message and traceback, as ``traceback`` prints them, with secrets masked (a
    connection string in a message is stored as ``postgresql://app:***@db``), cut to a bounded length."""
    text = redact("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).rstrip("\n"))
    if len(text) > MAX_ERROR_CHARS:
        half = MAX_ERROR_CHARS // 2
        text = f"{text[:half]}\n... ({len(text) - MAX_ERROR_CHARS} characters cut) ...\n{text[-half:]}"
    return text
