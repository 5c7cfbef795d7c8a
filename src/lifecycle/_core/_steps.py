"""One stage of one task (initialize, one execute attempt, cleanup) and the restart loop built from them.

The phases in ``_stages.py`` call these for every task; a task with a :class:`~lifecycle.Restart` policy
goes through the same steps again when its execute ends: cleanup (at once, releasing what it held), the
backoff delay, initialize, execute.
"""

from __future__ import annotations

import logging
import time

import anyio

from ._entry import Entry
from ._errors import TaskError, UnexpectedStopError
from ._events import EventKind
from ._machine import MachineCore
from ._task import Stage, TaskType

__all__ = ["Failure", "StageSteps"]

#: A stage that failed and why (an ``Exception``; a ``TimeoutError`` for a stage past its bound).
Failure = tuple[Stage, BaseException]

_WARNING = logging.WARNING


def _timed_out(stage: Stage, timeout: float | None, cause: BaseException | None = None) -> TimeoutError:
    """The failure of a stage that ran past its bound (``cause``: what the stage raised when cancelled)."""
    error = TimeoutError(f"{stage.value} did not complete within {timeout} s")
    if cause is not None:
        error.__cause__ = cause
    return error


class StageSteps(MachineCore):
    """The steps of one task. Not public."""

    async def _initialize_stage(self, entry: Entry) -> BaseException | None:
        """Run ``entry``'s initialize within its timeout; returns its failure or ``None``.

        Cancellation and non-``Exception`` errors (reported first) propagate.
        """
        self._begin_stage(entry, Stage.INITIALIZE, EventKind.TASK_INITIALIZING)
        timeout = entry.initialize_timeout
        deadline = anyio.move_on_after(timeout)
        try:
            with deadline:
                awaitable = entry.task.initialize()
                entry.awaitable = awaitable
                await awaitable
        except Exception as exc:
            return _timed_out(Stage.INITIALIZE, timeout, exc) if deadline.cancel_called else exc
        except BaseException as exc:
            if isinstance(exc, anyio.get_cancelled_exc_class()):
                entry.state = "cancelled"
            else:  # KeyboardInterrupt, SystemExit...: reported, then re-raised by run() after cleanup
                self._fail(entry, Stage.INITIALIZE, exc, record=False)
            raise
        finally:
            entry.awaitable = None
        if deadline.cancelled_caught:
            return _timed_out(Stage.INITIALIZE, timeout)
        entry.initialized = True
        entry.state = "done"
        self._emit_end(entry, EventKind.TASK_INITIALIZED)
        return None

    async def _initialize_one(self, entry: Entry) -> bool:
        """Initialize one task in the initialize phase; False when it failed (the error is recorded)."""
        failure: BaseException | None = None
        with anyio.CancelScope() as stop_scope:
            self._init_scope = stop_scope
            try:
                failure = await self._initialize_stage(entry)
            finally:
                self._init_scope = None
        if stop_scope.cancelled_caught and failure is None and not entry.initialized:
            entry.state = "cancelled"
            self._emit_end(entry, EventKind.TASK_CANCELLED)
            return True
        if failure is not None:
            self._fail(entry, Stage.INITIALIZE, failure)
            return False
        return True

    async def _cleanup_stage(self, entry: Entry, *, forcible: bool) -> BaseException | None:
        """Run ``entry``'s cleanup shielded and within its timeout; returns its failure or ``None``.

        ``forcible``: :meth:`TaskManager.cancel_cleanups` may cancel it (the cleanup phase); a restart's
        cleanup runs inside the task's execute and is only bounded by its timeout.
        """
        entry.initialized = False  # never cleaned up twice
        self._begin_stage(entry, Stage.CLEANUP, EventKind.TASK_CLEANING_UP)
        timeout = entry.cleanup_timeout
        deadline = anyio.move_on_after(timeout)
        failure: BaseException | None = None
        with anyio.CancelScope(shield=True) as scope:
            if forcible:
                entry.scope = scope
                self._cleaning = entry
            try:
                with deadline:
                    awaitable = entry.task.cleanup()
                    entry.awaitable = awaitable
                    await awaitable
            except Exception as exc:
                failure = _timed_out(Stage.CLEANUP, timeout, exc) if deadline.cancel_called else exc
            except BaseException as exc:
                if isinstance(exc, anyio.get_cancelled_exc_class()):
                    raise
                failure = exc
                if self._fatal is None:
                    self._fatal = exc
            finally:
                entry.awaitable = None
                if forcible:
                    self._cleaning = None
        if failure is None and deadline.cancelled_caught:
            failure = _timed_out(Stage.CLEANUP, timeout)
        elif failure is None and scope.cancelled_caught:
            failure = RuntimeError(
                "cleanup was cancelled before it finished by a forced shutdown (cancel_cleanups(), e.g. the "
                "second SIGINT/SIGTERM under lifecycle.run)"
            )
        if failure is None:
            entry.state = "done"
            self._emit_end(entry, EventKind.TASK_CLEANED_UP)
        return failure

    async def _cleanup_one(self, entry: Entry) -> None:
        """Clean up one task in the cleanup phase, recording a failure; the entry's run is then over."""
        failure = await self._cleanup_stage(entry, forcible=True)
        entry.ended_at = time.time()
        if failure is not None:
            self._fail(entry, Stage.CLEANUP, failure, record=isinstance(failure, Exception))
        entry.finish()

    async def _execute_attempt(self, entry: Entry) -> Failure | None:
        """Run ``entry``'s execute once; its failure (a STRICT early return included) or ``None``."""
        self._begin_stage(entry, Stage.EXECUTE, EventKind.TASK_EXECUTING)
        if entry.starting or entry.restarting:
            self._settle_readiness(entry)
        try:
            awaitable = entry.execute_fn()
            entry.awaitable = awaitable
            await awaitable
        except Exception as exc:
            return Stage.EXECUTE, exc
        if entry.task_type is TaskType.STRICT and not self._stop_requested and not entry.cancel_requested:
            return Stage.EXECUTE, UnexpectedStopError(
                f"execute of STRICT task {entry.name!r} returned before shutdown; add it as "
                "TaskType.ERROR if returning early is fine, or as TaskType.STOP_GROUP to stop the manager"
            )
        return None

    async def _execute_supervised(self, entry: Entry) -> tuple[Failure | None, str]:
        """Run ``entry``'s execute, then its restart policy if it has one (see :meth:`_supervise`)."""
        failure = await self._execute_attempt(entry)
        if entry.window is None:
            return failure, ""
        return await self._supervise(entry, failure)

    async def _supervise(self, entry: Entry, failure: Failure | None) -> tuple[Failure | None, str]:
        """Apply ``entry``'s restart policy to how its execute ended, as long as it allows.

        Returns the final outcome (``None``: ended without error) and, when the policy gave up (also after a
        return, with ``"always"``), a note saying how many restarts happened. Cancellation (shutdown, the
        handle) propagates.
        """
        policy, window = entry.restart, entry.window
        assert policy is not None
        assert window is not None
        while True:
            if self._stop_requested or entry.cancel_requested:
                return failure, ""
            if failure is None and policy.mode != "always":
                return None, ""
            now = self._timing.clock()
            if not window.allows(now):
                self._restarting_done(entry)
                return failure, (
                    f"gave up after {entry.restarts} restart{'s' if entry.restarts != 1 else ''}: "
                    f"{window.in_window(now)} within {policy.within:g} s reached max_restarts="
                    f"{policy.max_restarts}"
                )
            number = window.record(now)
            entry.restarts += 1
            self._restart_totals[entry.name] = self._restart_totals.get(entry.name, 0) + 1
            delay = policy.backoff.delay(number, self._timing.rng)
            self._announce_restart(entry, failure, number, delay)
            failure = None
            if entry.kind == "task" and entry.initialized:
                cleanup_failure = await self._cleanup_stage(entry, forcible=False)
                if cleanup_failure is not None and not isinstance(cleanup_failure, Exception):
                    raise cleanup_failure  # KeyboardInterrupt, SystemExit...: stop, never restart
                if cleanup_failure is not None:
                    failure = (Stage.CLEANUP, cleanup_failure)
                    continue
            entry.state = "restarting"
            await self._timing.sleep(delay)
            if entry.kind == "task":
                init_failure = await self._initialize_stage(entry)
                if init_failure is not None:
                    failure = (Stage.INITIALIZE, init_failure)
                    continue
            failure = await self._execute_attempt(entry)

    def _announce_restart(self, entry: Entry, failure: Failure | None, number: int, delay: float) -> None:
        policy = entry.restart
        assert policy is not None
        error = None
        stage = Stage.EXECUTE
        if failure is not None:
            stage, cause = failure
            error = TaskError(entry.name, stage, entry.task_type, cause, entry.restarts - 1)
            entry.last_error = error
        entry.state = "restarting"
        self._events.emit(
            EventKind.TASK_RESTARTING,
            _WARNING,
            task_name=entry.name,
            task_type=entry.task_type,
            stage=stage,
            duration=delay,
            error=error,
            detail=(
                f"restarting in {delay:.3f} s (restart {number} of {policy.max_restarts} within "
                f"{policy.within:g} s, {entry.restarts} in total)"
            ),
        )
        self._restarting_begins(entry)
