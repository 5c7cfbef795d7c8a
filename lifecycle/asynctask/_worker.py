"""The worker engine: claim batches, run each task under its own cancel scope and deadline, settle results in
batches, renew leases, recover the tasks of dead workers, purge old results, and drain at shutdown."""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.abc

from .._backoff import Backoff
from ._backend import Backend
from ._clock import Clock
from ._encoding import Encoding
from ._model import TaskContext, TaskInfo
from ._queues import QueueOrder
from ._records import ClaimedTask, Settlement, TaskRecord, TaskState
from ._registry import Registry, TaskDefinition
from ._settler import Settler
from ._verdict import Policy

__all__ = ["EngineOptions", "Worker"]

ErrorHook = Callable[[TaskInfo, BaseException], Awaitable[None] | None]

_LOST = "lease lost"
_SHUTDOWN = "shutdown"
_BACKEND_RETRY = Backoff(initial=0.05, cap=5.0)
_RECOVER_BATCH = 100
_PURGE_BATCH = 1000
_FINAL_FLUSH_TIMEOUT = 10.0


class WorkerLostError(RuntimeError):
    """Passed to ``on_error`` for an attempt whose worker died (its lease expired before it finished)."""


@dataclass(frozen=True, slots=True)
class EngineOptions:
    """The engine's settings, validated by :class:`~lifecycle.asynctask.AsyncTasks`."""

    concurrency: int
    queues: QueueOrder
    lease: float
    poll_interval: float
    recovery_interval: float
    retention: Mapping[TaskState, float | None]
    retention_interval: float
    shutdown_grace: float
    clock: Clock
    policy: Policy
    on_error: ErrorHook | None


class _Running:
    __slots__ = ("claimed", "reason", "scope")

    def __init__(self, claimed: ClaimedTask) -> None:
        self.claimed = claimed
        self.scope: anyio.CancelScope | None = None
        self.reason: str | None = None

    def cancel(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
        if self.scope is not None:
            self.scope.cancel()


class Worker:
    """One running engine of an ``AsyncTasks``. :meth:`serve` runs until :meth:`stop`, then drains."""

    def __init__(
        self,
        backend: Backend,
        registry: Registry,
        encoding: Encoding,
        options: EngineOptions,
        logger: logging.Logger,
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        self._backend = backend
        self._registry = registry
        self._encoding = encoding
        self._options = options
        self._logger = logger
        self._clock = options.clock
        self._policy = options.policy
        self._running: dict[str, _Running] = {}
        self._held: dict[str, str] = {}
        self._on_change = on_change
        self._settler = Settler(backend, self._held, self._settled, logger)
        self._stopping = False
        self._wake_generation = 0
        self._wake_event: anyio.Event | None = None
        self._capacity_event: anyio.Event | None = None
        self._runners: anyio.abc.TaskGroup | None = None
        self._limiter: anyio.CapacityLimiter | None = None
        self.started = anyio.Event()
        self.stopping = anyio.Event()

    # -- control --------------------------------------------------------------------------------------------

    @property
    def running(self) -> int:
        """How many tasks are executing now."""
        return len(self._running)

    def wake(self) -> None:
        """Work was enqueued in this process: claim now instead of waiting for the backend."""
        self._wake_generation += 1
        event, self._wake_event = self._wake_event, None
        if event is not None:
            event.set()

    def stop(self) -> None:
        """Stop claiming; :meth:`serve` then drains the in-flight tasks and returns."""
        self._stopping = True
        self.stopping.set()
        self.wake()
        self._capacity_changed()

    def _settled(self) -> None:
        self._capacity_changed()
        self._on_change()

    def _capacity_changed(self) -> None:
        event, self._capacity_event = self._capacity_event, None
        if event is not None:
            event.set()

    # -- the main loop --------------------------------------------------------------------------------------

    async def serve(self) -> None:
        """Run until :meth:`stop`: then stop claiming, give in-flight tasks ``shutdown_grace`` seconds, cancel
        the rest and return them to pending (attempt refunded), save every verdict, and return."""
        self._limiter = anyio.CapacityLimiter(self._options.concurrency)
        async with anyio.create_task_group() as services:
            services.start_soon(self._settler.run)
            services.start_soon(self._heartbeat_loop)
            services.start_soon(self._recovery_loop)
            if any(age is not None for age in self._options.retention.values()):
                services.start_soon(self._retention_loop)
            async with anyio.create_task_group() as runners:
                self._runners = runners
                self.started.set()
                await self._claim_loop()
                await self._drain()
            self._runners = None
            with anyio.move_on_after(_FINAL_FLUSH_TIMEOUT) as flush_scope:
                await self._settler.flush()
            if flush_scope.cancelled_caught:
                self._logger.warning(
                    "could not save %d task verdict(s) at shutdown within %.0f s: those tasks stay active "
                    "until their lease expires, then another worker recovers them",
                    self._settler.backlog,
                    _FINAL_FLUSH_TIMEOUT,
                )
            services.cancel_scope.cancel()

    async def _claim_loop(self) -> None:
        options = self._options
        concurrency = options.concurrency
        backend = self._backend
        clock = self._clock
        failures = 0
        while not self._stopping:
            free = min(concurrency - len(self._running), 2 * concurrency - len(self._held))
            if free <= 0:
                event = self._capacity_event = anyio.Event()
                await event.wait()
                continue
            generation = self._wake_generation
            now = clock()
            try:
                batch = await backend.claim(
                    options.queues.next_order(), free, now=now, lease_until=now + options.lease
                )
            except Exception as exc:
                failures += 1
                await self._backend_trouble("claim tasks", exc, failures)
                continue
            failures = 0
            self._start(batch)
            if len(batch) < free:
                await self._idle(generation)

    def _start(self, batch: list[ClaimedTask]) -> None:
        runners = self._runners
        assert runners is not None
        for claimed in batch:
            # Counted as running from the claim on, so the next claim sees the slot as taken.
            running = _Running(claimed)
            self._held[claimed.record.id] = claimed.token
            self._running[claimed.record.id] = running
            runners.start_soon(self._run, running)

    async def _idle(self, generation: int) -> None:
        if self._stopping or generation != self._wake_generation:
            return
        event = self._wake_event = anyio.Event()
        async with anyio.create_task_group() as group:
            group.start_soon(self._wait_for_backend, event)
            await event.wait()
            group.cancel_scope.cancel()

    async def _wait_for_backend(self, event: anyio.Event) -> None:
        try:
            await self._backend.wait_for_work(self._options.queues.names, timeout=self._options.poll_interval)
        except Exception as exc:
            await self._backend_trouble("wait for work", exc, 1)
        event.set()

    async def _backend_trouble(self, what: str, exc: Exception, failures: int) -> None:
        delay = _BACKEND_RETRY.delay(failures, self._policy.rng)
        self._logger.warning(
            "could not %s (%s: %s); trying again in %.2f s",
            what,
            type(exc).__name__,
            exc,
            delay,
            exc_info=failures == 1,
        )
        await anyio.sleep(delay)

    async def _drain(self) -> None:
        if self._running:
            self._logger.info(
                "stopping: waiting up to %g s for %d running task(s)",
                self._options.shutdown_grace,
                len(self._running),
            )
            with anyio.move_on_after(self._options.shutdown_grace):
                while self._running:
                    event = self._capacity_event = anyio.Event()
                    await event.wait()
        if self._running:
            self._logger.warning(
                "shutdown grace of %g s is over: cancelling %d running task(s) and returning them to pending",
                self._options.shutdown_grace,
                len(self._running),
            )
            for running in list(self._running.values()):
                running.cancel(_SHUTDOWN)

    # -- one task -------------------------------------------------------------------------------------------

    async def _run(self, running: _Running) -> None:
        claimed = running.claimed
        task_id = claimed.record.id
        try:
            settlement = await self._execute(running)
        finally:
            del self._running[task_id]
            self._capacity_changed()
        if settlement is None:
            if self._held.get(task_id) == claimed.token:
                del self._held[task_id]
        else:
            self._settler.put(settlement)

    async def _execute(self, running: _Running) -> Settlement | None:
        claimed = running.claimed
        record = claimed.record
        policy = self._policy
        if running.reason is not None:  # stopped or lost before it started
            return policy.release(claimed, now=self._clock()) if running.reason == _SHUTDOWN else None
        definition = self._registry.get(record.name)
        if definition is None:
            known = ", ".join(self._registry.names()) or "none"
            exc: Exception = LookupError(
                f"no task function is registered under the name {record.name!r} in this worker (it knows: "
                f"{known}); register it, or fix the name the producer used"
            )
            return await self._failed(record, policy.failure(claimed, now=self._clock(), error=str(exc)), exc)
        try:
            args = self._decode_arguments(record)
        except ValueError as decode_error:
            error = (
                f"cannot decode the arguments of task {record.name!r}: {decode_error}; the payload will not "
                "become readable by retrying, so the task is dead (enqueue a corrected task)"
            )
            return await self._failed(
                record, policy.dead(claimed, now=self._clock(), error=error), decode_error
            )
        if not definition.min_args <= len(args) <= definition.max_args:
            try:
                definition.check_arity(len(args))
            except TypeError as arity_error:
                verdict = policy.failure(claimed, now=self._clock(), error=str(arity_error))
                return await self._failed(record, verdict, arity_error)
        return await self._call(running, definition, args)

    def _decode_arguments(self, record: TaskRecord) -> tuple[Any, ...]:
        args = self._encoding.decode(record.payload)
        if type(args) is tuple:
            return args
        if isinstance(args, list):
            return tuple(args)
        raise ValueError(f"the payload holds {type(args).__name__}, not an argument list")

    async def _call(
        self, running: _Running, definition: TaskDefinition, args: tuple[Any, ...]
    ) -> Settlement | None:
        claimed = running.claimed
        record = claimed.record
        timeout = record.timeout
        if definition.takes_context:
            ctx = TaskContext(
                task_id=record.id,
                name=record.name,
                queue=record.queue,
                attempt=record.attempts,
                max_retries=record.max_retries,
                enqueued_at=record.enqueued_at,
                deadline=None if timeout is None else self._clock() + timeout,
            )
            args = (ctx, *args)
        scope = anyio.CancelScope(deadline=math.inf if timeout is None else anyio.current_time() + timeout)
        running.scope = scope
        if running.reason is not None:
            scope.cancel()
        finished = False
        result: Any = None
        failure: Exception | None = None
        try:
            with scope:
                if definition.is_async:
                    result = await definition.fn(*args)
                else:
                    result = await anyio.to_thread.run_sync(
                        functools.partial(definition.fn, *args), abandon_on_cancel=True, limiter=self._limiter
                    )
                finished = True
        except Exception as exc:
            failure = exc
        now = self._clock()
        if finished:
            return self._policy.success(claimed, now=now, result=self._encode_result(record, result))
        if running.reason == _LOST:
            return None
        if running.reason == _SHUTDOWN:
            return self._policy.release(claimed, now=now)
        if failure is None or (scope.cancel_called and running.reason is None):
            timed_out = TimeoutError(f"timed out after {timeout:g} s (attempt {record.attempts})")
            if failure is not None:
                timed_out.__cause__ = failure
            verdict = self._policy.failure(claimed, now=now, error=str(timed_out))
            return await self._failed(record, verdict, timed_out)
        return await self._failed(record, self._policy.for_exception(claimed, failure, now=now), failure)

    def _encode_result(self, record: TaskRecord, result: Any) -> bytes | None:
        if result is None:
            return None
        try:
            return self._encoding.encode(result)
        except TypeError as exc:
            self._logger.debug("task %s (%s): result not stored: %s", record.id, record.name, exc)
            return None

    async def _failed(self, record: TaskRecord, settlement: Settlement, exc: BaseException) -> Settlement:
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
        if self._options.on_error is not None:
            await call_error_hook(self._options.on_error, record, settlement, exc, self._logger)
        return settlement

    # -- background loops -----------------------------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        interval = self._options.lease / 3
        failures = 0
        while True:
            await anyio.sleep(interval)
            leases = list(self._held.items())
            if not leases:
                continue
            try:
                lost = await self._backend.extend_leases(
                    leases, lease_until=self._clock() + self._options.lease
                )
            except Exception as exc:
                failures += 1
                self._logger.warning(
                    "could not renew %d lease(s) (%s: %s); trying again in %g s",
                    len(leases),
                    type(exc).__name__,
                    exc,
                    interval,
                    exc_info=failures == 1,
                )
                continue
            failures = 0
            if lost:
                self._leases_lost(lost, dict(leases))

    def _leases_lost(self, lost: set[str], tokens: dict[str, str]) -> None:
        for task_id in lost:
            token = tokens.get(task_id)
            running = self._running.get(task_id)
            if running is not None and running.claimed.token == token:
                self._logger.warning(
                    "lost the lease of running task %s (%s): another worker took it over, so this run is "
                    "cancelled here (was the event loop blocked longer than the lease of %g s?)",
                    task_id,
                    running.claimed.record.name,
                    self._options.lease,
                )
                running.cancel(_LOST)
            if token is not None and self._held.get(task_id) == token:
                del self._held[task_id]
        self._capacity_changed()

    async def _recovery_loop(self) -> None:
        while True:
            try:
                await self.recover_expired()
            except Exception as exc:
                self._logger.warning(
                    "could not recover expired leases (%s: %s)", type(exc).__name__, exc, exc_info=True
                )
            await anyio.sleep(self._options.recovery_interval)

    async def recover_expired(self) -> int:
        """Take over tasks whose worker died (lease expired) and settle each as a retry or dead."""
        return await recover_expired(
            self._backend, self._options, self._settler.put, self._held, self._logger
        )

    async def _retention_loop(self) -> None:
        while True:
            try:
                await purge_expired(self._backend, self._options)
            except Exception as exc:
                self._logger.warning(
                    "could not purge old finished tasks (%s: %s)", type(exc).__name__, exc, exc_info=True
                )
            await anyio.sleep(self._options.retention_interval)


async def recover_expired(
    backend: Backend,
    options: EngineOptions,
    put: Callable[[Settlement], None] | None,
    held: dict[str, str] | None,
    logger: logging.Logger,
) -> int:
    """Reclaim every expired lease and settle it (through ``put`` when a settler runs, else directly)."""
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
            verdict = options.policy.failure(claimed, now=now, error=str(error))
            logger.warning(
                "recovered task %s (%s) from a lost worker: %s",
                record.id,
                record.name,
                "retrying" if verdict.state is TaskState.PENDING else "dead, no retries left",
            )
            if options.on_error is not None:
                await call_error_hook(options.on_error, record, verdict, error, logger)
            verdicts.append(verdict)
        if verdicts:
            if put is not None and held is not None:
                for claimed, verdict in zip(reclaimed, verdicts, strict=True):
                    held[claimed.record.id] = claimed.token
                    put(verdict)
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
    )
    try:
        outcome = hook(info, exc)
        if outcome is not None:
            await outcome
    except Exception:
        logger.exception(
            "on_error raised while handling task %s (%s); the worker goes on", record.id, record.name
        )


async def purge_expired(backend: Backend, options: EngineOptions) -> int:
    """Delete finished tasks older than the retention of their state; returns how many were deleted."""
    total = 0
    for state, age in options.retention.items():
        if age is None:
            continue
        before = options.clock() - age
        while True:
            deleted = await backend.purge(states={state}, before=before, limit=_PURGE_BATCH)
            total += deleted
            if deleted < _PURGE_BATCH:
                break
    return total


def _first_line(text: str | None) -> str:
    if not text:
        return ""
    lines = text.strip().splitlines()
    return lines[-1] if lines and lines[0].startswith("Traceback") else lines[0]
