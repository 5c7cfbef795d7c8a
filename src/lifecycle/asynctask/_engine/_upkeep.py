"""The engine's upkeep: recovering the tasks of dead workers, purging old finished tasks, and calling the
``on_error`` hook."""

from __future__ import annotations

import logging
from collections.abc import Callable

from .._backend import Backend
from .._errors import WorkerLostError
from .._model import TaskInfo
from .._observer import observe_finished
from .._records import ClaimedTask, Settlement, TaskRecord, TaskState
from ._options import EngineOptions, ErrorHook
from ._verdict import is_cancellation

__all__ = ["call_error_hook", "purge_expired", "recover_expired"]

_RECOVER_BATCH = 100
_PURGE_BATCH = 1000


async def recover_expired(
    backend: Backend,
    options: EngineOptions,
    take_over: Callable[[ClaimedTask, Settlement], None] | None,
    logger: logging.Logger,
) -> int:
    """Reclaim every expired lease and settle it: through ``take_over`` (a running worker's settler), or
    directly when it is ``None``."""
    total = 0
    while True:
        now = options.clock()
        reclaimed = await backend.reclaim_expired(
            now=now, lease_until=now + options.lease, limit=_RECOVER_BATCH
        )
        verdicts: list[Settlement] = []
        for claimed in reclaimed:
            record = claimed.record
            error = WorkerLostError(
                f"worker lost: the lease of attempt {record.attempts} expired before the task finished (its "
                "worker process died, or was blocked longer than the lease)"
            )
            if record.cancel_requested:  # its cancellation was asked: it ends cancelled, never retried
                verdict = options.policy.cancelled(claimed, now=now, ran=False)
            else:
                verdict = options.policy.failure(claimed, now=now, error=str(error))
            logger.warning(
                "recovered task %s (%s) from a lost worker: %s",
                record.id,
                record.name,
                {TaskState.PENDING: "retrying", TaskState.CANCELLED: "cancelled, as was asked"}.get(
                    verdict.state, "dead, no retries left"
                ),
            )
            if options.on_error is not None and verdict.state is not TaskState.CANCELLED:
                await call_error_hook(options.on_error, record, verdict, error, logger)
            if options.observer is not None:  # the lost attempt ran from its claim until now, at least
                observe_finished(options.observer, record, verdict, record.started_at or now)
            verdicts.append(verdict)
        if verdicts:
            if take_over is not None:
                for claimed, verdict in zip(reclaimed, verdicts, strict=True):
                    take_over(claimed, verdict)
            else:
                await backend.settle(verdicts)
        total += len(reclaimed)
        if len(reclaimed) < _RECOVER_BATCH:
            return total


async def call_error_hook(
    hook: ErrorHook, record: TaskRecord, verdict: Settlement, exc: BaseException, logger: logging.Logger
) -> None:
    """Call ``on_error`` with the task as it is after ``verdict``; its exceptions are logged, never raised."""
    info = TaskInfo(
        id=record.id,
        name=record.name,
        queue=record.queue,
        state=verdict.state,
        attempts=record.attempts,
        max_retries=record.max_retries,
        enqueued_at=record.enqueued_at,
        run_at=verdict.run_at if verdict.run_at is not None else record.run_at,
        last_error=verdict.error,
        timeout=record.timeout,
        started_at=record.started_at,
        finished_at=verdict.at if verdict.state.is_final else None,
        damaged=record.fault,
    )
    try:
        outcome = hook(info, exc)
        if outcome is not None:
            await outcome
    except BaseException as hook_error:  # KeyboardInterrupt or SystemExit too: only cancellation passes
        if is_cancellation(hook_error):
            raise
        logger.error(
            "on_error raised while handling task %s (%s); the worker goes on",
            record.id,
            record.name,
            exc_info=hook_error,
        )


async def purge_expired(backend: Backend, options: EngineOptions) -> int:
    """Delete finished tasks older than the retention of their state; returns how many were deleted.

    The pass reads the clock once, at its start: a pass slowed by the backend (a busy pool, a long delete)
    never judges a later state by a later time than its first, so what one pass deletes is what was expired
    when it began, whichever order the states come in."""
    total = 0
    now = options.clock()
    for state, age in options.retention.items():
        if age is None:
            continue
        before = now - age
        while True:
            deleted = await backend.purge(states={state}, before=before, limit=_PURGE_BATCH)
            total += deleted
            if deleted < _PURGE_BATCH:
                break
    return total
