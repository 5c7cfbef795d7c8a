"""The worker engine: claim batches, run each task under its own cancel scope and deadline, settle results in
batches, renew leases, recover the tasks of dead workers, purge old results, and drain at shutdown."""

from __future__ import annotations

import logging
import math
import time
import traceback
from collections import deque
from collections.abc import Callable
from types import FrameType

import anyio
import anyio.abc
import anyio.lowlevel

from ..._core._backoff import Backoff
from ..._core._loopwatch import LoopBlock, LoopWatch
from .._backend import (
    Backend,
    SettleWaitAndClaim,
    WaitAndClaim,
    combined_settle_and_claim,
    combined_settle_wait_and_claim,
    combined_wait_and_claim,
    supports_control,
)
from .._encoding import Encoding
from .._observer import TaskObserver, observe_finished, observe_started
from .._records import ClaimedTask, Settlement, TaskState
from .._registry import Registry
from ._control import ProgressBook
from ._loop import ANYIO_PRIMITIVES, LoopPrimitives, loop_primitives
from ._notices import NoticePump
from ._options import EngineOptions
from ._runner import LOST, SHUTDOWN, Running, TaskRunner
from ._settler import Settler
from ._upkeep import purge_expired, recover_expired
from ._verdict import error_text, is_cancelled_from_outside

__all__ = ["Worker"]


_BACKEND_RETRY = Backoff(initial=0.05, cap=5.0)
_FINAL_FLUSH_TIMEOUT = 10.0
_BLOCK_WARNING_SHARE = 3  # warn when the loop is blocked longer than lease / 3: the heartbeat interval
_STACK_LIMIT = 20  # the innermost frames shown of a blocked loop's stack
_CANCEL_POLL = 0.5  # the longest between two looks at the cancel requests of the running tasks
_AHEAD_WAIT = 0.25  # the longest a task claimed ahead waits for a runner before it is given back


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
        *,
        pump: NoticePump | None = None,
    ) -> None:
        self._backend = backend
        self._controlled = supports_control(backend)
        self._pump = pump
        self._progress = ProgressBook(backend, options.clock, logger) if self._controlled else None
        self._group_ends: list[tuple[str, float, TaskState]] = []  # (group, at, state) saved, to report
        self._group_ends_event: anyio.Event | None = None
        self._report_groups = self._controlled and callable(getattr(options.observer, "group_finished", None))
        self._registry = registry
        self._options = options
        self._logger = logger
        self._clock = options.clock
        self._policy = options.policy
        self._running: dict[str, Running] = {}  # by lease token (one task id may run twice, briefly)
        self._held: dict[str, str] = {}  # task id -> token of every lease held: running or unsaved
        self._on_change = on_change
        self._members: dict[tuple[str, str], str] = {}  # (task id, token) -> group of a final verdict put
        self._settler = Settler(backend, self._held, self._settled, logger, on_saved=self._saved)
        self._stopping = False
        self._wake_generation = 0
        self._wake_scope: anyio.CancelScope | None = None  # the idle wait's, which wake() cancels
        self._wake_event: anyio.Event | None = None  # a wait_and_claim's, which wake() sets
        # The backend's settle_wait_and_claim, when the idle waits carry the buffered verdicts (the claim loop
        # sets it).
        self._settle_wait: SettleWaitAndClaim | None = None
        self._capacity_event: anyio.Event | None = None
        # The claimed tasks no runner has taken yet (each counted in ``_running`` from its claim on), and the
        # events of the idle runners: ``concurrency`` runners take them one after another, so a task costs no
        # task spawn, and never more than ``concurrency`` run at once. Idle runners are woken one at a time:
        # a runner that takes a task while more are queued wakes the next before it runs its own, so tasks
        # that wait start side by side, while a batch of tasks that never wait is run by one or two runners
        # (waking all of them for each batch cost a resumption per task).
        self._queue: deque[Running] = deque()
        self._idle_runners: deque[anyio.Event] = deque()
        self._runner_woken = False  # an idle runner was woken and has not looked at the queue yet
        self._closing = False
        self._ahead = 0  # slots beyond `concurrency` the next claim may fill (see _claimed)
        self._backlog = False  # the last claim took all it asked for
        self._finishing = 0  # runners writing the last progress of a task that ran: not free yet
        self._runner = TaskRunner(
            registry,
            encoding,
            options.policy,
            options.clock,
            options.on_error,
            logger,
            groups=backend.get_group if self._controlled else None,
            hooks=options.hooks,
        )
        self._loopwatch = LoopWatch(
            options.lease / _BLOCK_WARNING_SHARE,
            self._loop_blocked,
            name="lifecycle-asynctask-loopwatch",
            describe=self._blocking_task,
        )
        self.started = anyio.Event()
        self.stopping = anyio.Event()
        self._loop: LoopPrimitives = ANYIO_PRIMITIVES
        """The running loop's primitives: anyio's until :meth:`serve` looks them up in the loop it runs in."""

    # -- control --------------------------------------------------------------------------------------------

    @property
    def running(self) -> int:
        """How many tasks this worker holds: running, or claimed ahead and waiting for a runner."""
        return len(self._running)

    def wake(self) -> None:
        """Work was enqueued in this process: claim now instead of waiting for the backend."""
        self._wake_generation += 1
        scope, self._wake_scope = self._wake_scope, None
        if scope is not None:
            scope.cancel()
        event, self._wake_event = self._wake_event, None
        if event is not None:
            event.set()

    def cancel_running(self, task_id: str) -> bool:
        """``tasks.cancel()`` asked ``task_id`` to stop: stop its attempt here if this worker runs it."""
        token = self._held.get(task_id)
        running = None if token is None else self._running.get(token)
        if running is None or not running.request_cancel():
            return False
        self._logger.info(
            "task %s (%s): cancellation requested, stopping it", task_id, running.claimed.record.name
        )
        return True

    def stop(self) -> None:
        """Stop claiming; :meth:`serve` then drains the in-flight tasks and returns."""
        self._stopping = True
        self.stopping.set()
        self.wake()
        self._capacity_changed()

    def _settled(self) -> None:
        self._capacity_changed()
        if any(
            limits.max_running is not None or limits.max_running_per_key is not None
            for limits in self._registry.flow_limits().values()
        ):
            self.wake()  # a settled task gave back its slot: a task its limits held may start now
        self._on_change()

    def _capacity_changed(self) -> None:
        event, self._capacity_event = self._capacity_event, None
        if event is not None:
            event.set()

    # -- the main loop --------------------------------------------------------------------------------------

    async def serve(self) -> None:
        """Run until :meth:`stop`: then stop claiming, give in-flight tasks ``shutdown_grace`` seconds, cancel
        the rest and return them to pending (attempt refunded), save every verdict, and return."""
        self._runner.limiter = anyio.CapacityLimiter(self._options.concurrency)
        primitives = self._loop = loop_primitives()
        self._runner.use_loop(primitives)
        async with anyio.create_task_group() as services:
            services.start_soon(self._settler.run, primitives)
            services.start_soon(self._heartbeat_loop)
            services.start_soon(self._recovery_loop)
            await services.start(self._watch_loop)  # watching before a runner can run (and block) a task
            if any(age is not None for age in self._options.retention.values()):
                services.start_soon(self._retention_loop)
            if self._progress is not None:
                services.start_soon(self._progress.run)
            if self._controlled:
                services.start_soon(self._cancel_watch_loop)
                if self._pump is not None:
                    services.start_soon(self._pump.serve, self._confirm_cancels, self._options.poll_interval)
                if self._report_groups:
                    services.start_soon(self._group_report_loop)
            async with anyio.create_task_group() as runners:
                for _ in range(self._options.concurrency):
                    runners.start_soon(self._runner_loop)
                self.started.set()
                try:
                    await self._claim_loop()
                finally:
                    self._settler.release()
                await self._drain()
                self._closing = True  # the runners run what is queued (each stopped already), then end
                while self._idle_runners:
                    self._idle_runners.popleft().set()
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
        checkpoint = self._loop.checkpoint
        # With a backend that can, the verdicts waiting to be saved go with the claim: one call, not two.
        settle_and_claim = combined_settle_and_claim(backend)
        # With a backend that can, an idle wait carries the claim that follows it: one round trip, not two.
        # Only on the real clock: that claim's `now` moves on by the real time the wait took, which an
        # injected clock (a test's ManualClock) does not.
        wait_and_claim = combined_wait_and_claim(backend) if clock is time.time else None
        # And with a backend that can, the verdicts waiting to be saved go with that wait, in its write: an
        # idle worker's verdict costs no round trip of its own, and the store applies it before the wait
        # blocks rather than between the enqueue that ends the wait and the claim behind it.
        self._settle_wait = combined_settle_wait_and_claim(backend) if wait_and_claim is not None else None
        # A claim sent ahead finds no verdicts waiting (the runners have not run the batch before it yet), so
        # it would part the verdicts from the claim that a combined call saves with it: no claims ahead then.
        go_ahead = settle_and_claim is None
        idle = False  # the last claim took fewer than it could: wait (and claim) next
        failures = 0
        while not self._stopping:
            # Every slot counted free has a runner, but for the ``_ahead`` slots a drain of short tasks earns:
            # a task claimed ahead waits in the queue for a runner (see _claimed and _wait_for_capacity).
            free = min(
                concurrency + self._ahead - len(self._running) - self._finishing,
                2 * concurrency + self._ahead - len(self._held),
            )
            if free <= 0:
                self._settler.release()
                await self._wait_for_capacity()
                continue
            limit = min(free, concurrency)  # one claim takes a batch of at most `concurrency`, as always
            generation = self._wake_generation
            if idle and wait_and_claim is not None:
                idle = False
                waited = await self._wait_and_claim(wait_and_claim, generation, limit)
                if waited is not None:
                    self._claimed(waited, limit, ahead=False)
                    idle = len(waited) < limit
                    if waited:
                        if idle and self._settle_wait is not None:
                            # What the runners finish meanwhile goes with the next wait: no flusher pass.
                            # Nothing is awaited before that wait's take() ends the hold (the next turn
                            # goes there: idle, and nothing since the checkpoint can change the generation
                            # or stop it unseen), but for the capacity wait, which releases it first, and
                            # the end of this loop (serve() releases it).
                            self._settler.hold()
                        # The runner starts the task before this loop sends its next wait: the task that
                        # woke an idle worker starts one script call sooner.
                        await checkpoint()
                continue
            now = clock()
            limits = self._registry.flow_limits()
            if settle_and_claim is not None:
                verdicts = self._settler.take()
                if verdicts:
                    try:
                        lost, batch = await settle_and_claim(
                            verdicts,
                            options.queues.next_order(),
                            limit,
                            now=now,
                            lease_until=now + options.lease,
                            limits=limits,
                        )
                    except Exception:
                        # Nothing of the call counts: the settler saves the verdicts (retrying as it does),
                        # and the claim below runs alone (a failing store shows there).
                        self._settler.give_back(verdicts)
                    except BaseException:
                        self._settler.give_back(verdicts)
                        raise
                    else:
                        failures = 0
                        self._settler.saved(verdicts, lost)
                        self._claimed(batch, limit, ahead=go_ahead and not limits)
                        if len(batch) < limit:
                            if wait_and_claim is None:
                                await self._idle(generation)
                            else:
                                idle = True
                        continue
            try:
                if limits:
                    batch = await backend.claim(
                        options.queues.next_order(),
                        limit,
                        now=now,
                        lease_until=now + options.lease,
                        limits=limits,
                    )
                else:  # no keyword: a backend written before flow control existed keeps working
                    batch = await backend.claim(
                        options.queues.next_order(), limit, now=now, lease_until=now + options.lease
                    )
            except Exception as exc:
                failures += 1
                self._ahead = 0
                self._backlog = False
                await self._backend_trouble("claim tasks", exc, failures)
                continue
            failures = 0
            self._claimed(batch, limit, ahead=go_ahead and not limits)
            if len(batch) < limit:
                if wait_and_claim is not None:
                    idle = True
                elif self._ahead_deadline() == math.inf:
                    await self._idle(generation)
                # else tasks claimed ahead wait for a runner: _wait_for_capacity bounds their wait, not the
                # idle wait of up to poll_interval

    def _claimed(self, batch: list[ClaimedTask], limit: int, *, ahead: bool) -> None:
        """Queue ``batch`` for the runners, and decide whether the next claim may go out before they are free.

        A drain of short tasks would leave the worker idle for a round trip after each batch (its runners
        done, the next claim on its way) and the store idle while the runners work. So once two full claims
        in a row found the runners mostly done with what was claimed before, the next claim goes out ahead:
        the store serves it while the runners run this batch. A flow-controlled claim never goes ahead (a task
        held here counts against the limits of every worker), nor one after an idle wait."""
        concurrency = self._options.concurrency
        full = len(batch) == limit
        busy = len(self._running) - len(self._queue) + self._finishing  # runners on earlier tasks
        if ahead and full and self._backlog and 2 * busy <= concurrency:
            self._ahead = concurrency
        else:
            self._ahead = 0
        self._backlog = full
        self._start(batch)

    def _ahead_deadline(self) -> float:
        """When the tasks claimed ahead that wait for a runner are given back (``inf``: none wait)."""
        queue = self._queue
        if not queue or len(self._running) + self._finishing <= self._options.concurrency:
            return math.inf
        return queue[0].queued_at + _AHEAD_WAIT

    async def _wait_for_capacity(self) -> None:
        """Wait until a slot is free; give back the tasks claimed ahead if no runner took one for
        ``_AHEAD_WAIT`` seconds (the runners are on long tasks: other workers may run those now)."""
        event = self._capacity_event = self._loop.new_event()
        deadline = self._ahead_deadline()
        if deadline == math.inf:
            await event.wait()
            return
        with anyio.CancelScope(deadline=deadline):
            await event.wait()
            return
        self._give_back_ahead()

    def _give_back_ahead(self) -> None:
        """Return the queued tasks no runner is free for to pending, attempt refunded (they never started),
        and claim nothing ahead until two full claims show the runners keep up again."""
        self._ahead = 0
        self._backlog = False
        queue = self._queue
        excess = len(self._running) + self._finishing - self._options.concurrency
        if excess <= 0 or not queue:
            return
        given: list[Running] = []
        while excess > 0 and queue:
            given.append(queue.pop())  # the last claimed: the tasks that wait longest keep their turn
            excess -= 1
        self._logger.debug("giving back %d task(s) claimed ahead: no runner was free for them", len(given))
        for running in reversed(given):
            claimed = running.claimed
            del self._running[claimed.token]
            running.cancel(SHUTDOWN)  # its reason, unless it is stopped already (cancelled, lost)
            settlement = self._runner.stopped(running)
            if settlement is None:  # lost: not ours to give back
                if self._held.get(claimed.record.id) == claimed.token:
                    del self._held[claimed.record.id]
            else:
                self._put(claimed, settlement)
        self._capacity_changed()

    def _start(self, batch: list[ClaimedTask]) -> None:
        if not batch:
            return
        self._runner.look_up_tracer()
        queue = self._queue
        running_by_token = self._running
        held = self._held
        book = self._progress
        at = self._loop.clock()
        for claimed in batch:
            # What _hold() does, inline (once per task).
            task_id = claimed.record.id
            old_token = held.get(task_id)
            if old_token is not None and old_token != claimed.token:
                self._lose(task_id, old_token)  # the backend gave this task out again: that lease is gone
            held[task_id] = claimed.token
            # Counted as running from the claim on, so the next claim sees the slot as taken.
            running = running_by_token[claimed.token] = Running(claimed, book, at)
            queue.append(running)
        self._work_arrived()

    def _work_arrived(self) -> None:
        """Wake an idle runner for the queued tasks, unless one is woken already."""
        if not self._runner_woken and self._idle_runners:
            self._runner_woken = True
            self._idle_runners.popleft().set()

    async def _runner_loop(self) -> None:
        """One of the ``concurrency`` runners: run the queued tasks one after another, until closing."""
        queue = self._queue
        idle = self._idle_runners
        run = self._run
        new_event = self._loop.new_event
        while True:
            while queue:
                running = queue.popleft()
                if queue and idle and not self._runner_woken:
                    self._work_arrived()  # another runner takes the next one if this one's task waits
                await run(running)
            if self._closing:
                return
            event = new_event()
            idle.append(event)
            await event.wait()
            self._runner_woken = False

    def _hold(self, claimed: ClaimedTask) -> None:
        task_id = claimed.record.id
        old_token = self._held.get(task_id)
        if old_token is not None and old_token != claimed.token:
            # The backend gave this task out again, so the lease this worker held is gone.
            self._lose(task_id, old_token)
        self._held[task_id] = claimed.token

    async def _idle(self, generation: int) -> None:
        if self._stopping or generation != self._wake_generation:
            return
        # The wait runs in the claim loop's own task, under a scope wake() cancels: an idle period spawns no
        # task, so the claim after a wake-up follows the backend's reply at once.
        with anyio.CancelScope() as scope:
            self._wake_scope = scope
            await self._wait_for_backend()
        if self._wake_scope is scope:
            self._wake_scope = None

    async def _wait_and_claim(
        self, wait_and_claim: WaitAndClaim, generation: int, free: int
    ) -> list[ClaimedTask] | None:
        """The idle wait with the next claim behind it; ``None`` when no claim was made (woken since the last
        claim, work due already, the backend failed): the claim loop then claims as usual. ``wake()`` ends
        the wait by setting its event, not by cancelling it, so a claim already sent is never lost. With a
        backend that can, the settler's buffered verdicts go with the wait: the backend reports them saved, or
        refused (given back to the settler), as soon as it knows; a call that fails first gives them back."""
        if self._stopping or generation != self._wake_generation:
            return None
        event = self._wake_event = self._loop.new_event()
        options = self._options
        settle_wait = self._settle_wait
        verdicts = self._settler.take() if settle_wait is not None else []  # (take() ends a hold)
        pending = bool(verdicts)  # taken, and neither saved nor given back yet
        now = self._clock()
        try:
            if settle_wait is not None and verdicts:

                def settled(lost: set[str] | None) -> None:
                    nonlocal pending
                    if not pending:
                        return
                    pending = False
                    if lost is None:
                        self._settler.give_back(verdicts)  # refused: the settler saves them (and retries)
                    else:
                        self._settler.saved(verdicts, lost)

                claimed = await settle_wait(
                    verdicts,
                    options.queues.next_order(),
                    free,
                    now=now,
                    lease_until=now + options.lease,
                    limits=self._registry.flow_limits(),
                    timeout=self._idle_timeout(),
                    woken=event,
                    settled=settled,
                )
                if pending:
                    # Returned without reporting the outcome, which its contract says it does: the verdicts
                    # count as not saved, as after a call that failed (the settler saves them).
                    pending = False
                    self._settler.give_back(verdicts)
                return claimed
            return await wait_and_claim(
                options.queues.next_order(),
                free,
                now=now,
                lease_until=now + options.lease,
                limits=self._registry.flow_limits(),
                timeout=self._idle_timeout(),
                woken=event,
            )
        except Exception as exc:
            if pending:
                pending = False
                self._settler.give_back(verdicts)
            await self._backend_trouble("wait for work", exc, 1)
            return None
        except BaseException:
            if pending:
                pending = False
                self._settler.give_back(verdicts)
            raise
        finally:
            if self._wake_event is event:
                self._wake_event = None

    def _idle_timeout(self) -> float:
        """How long an idle worker waits for news: ``poll_interval``, or less when a rate limit refills a
        token sooner (a task it held back may start then, and no storage change announces it)."""
        timeout = self._options.poll_interval
        for limits in self._registry.flow_limits().values():
            if limits.rate is not None and limits.per is not None:
                timeout = min(timeout, limits.per / limits.rate)
        return timeout

    async def _wait_for_backend(self) -> None:
        try:
            await self._backend.wait_for_work(self._options.queues.names, timeout=self._idle_timeout())
        except Exception as exc:
            await self._backend_trouble("wait for work", exc, 1)

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
        # A stop ends the pause (nothing more is claimed), and so does the time tasks claimed ahead may wait
        # for a runner: the claim loop then gives them back (see _wait_for_capacity).
        with anyio.CancelScope(deadline=min(anyio.current_time() + delay, self._ahead_deadline())):
            await self.stopping.wait()

    async def _drain(self) -> None:
        self._give_back_ahead()  # the tasks claimed ahead that no runner took yet are not started now
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
                running.cancel(SHUTDOWN)

    # -- one task -------------------------------------------------------------------------------------------

    async def _run(self, running: Running) -> None:
        claimed = running.claimed
        observer = self._options.observer
        try:
            if observer is None:
                settlement = await self._runner.attempt(running)
            else:
                settlement = await self._run_observed(running, observer)
        except BaseException as exc:
            # A fault of this task's handling stays with this task: it is settled, the rest of the batch and
            # the worker go on (a runner raising would end the worker). Only the worker's own cancellation
            # passes.
            if is_cancelled_from_outside(exc):
                raise
            settlement = self._internal_error(running, exc)
        finally:
            del self._running[claimed.token]
            event = self._capacity_event
            if event is not None:
                self._capacity_event = None
                event.set()
        if settlement is None:
            if running.reported and self._progress is not None:
                self._progress.forget(claimed)
            task_id = claimed.record.id
            if self._held.get(task_id) == claimed.token:
                del self._held[task_id]
            return
        if running.reported:
            await self._finish_progress(claimed)
        if claimed.record.group_id is None:
            self._settler.put(settlement)
        else:
            self._put(claimed, settlement)

    async def _finish_progress(self, claimed: ClaimedTask) -> None:
        """Write the last progress ``claimed`` reported, if unwritten, before its verdict is queued."""
        progress = self._progress
        if progress is None or not progress.holds(claimed):
            return
        self._finishing += 1
        try:
            with anyio.CancelScope(shield=True):  # the last progress before the verdict, always
                await progress.finish(claimed)
        finally:
            self._finishing -= 1
            self._capacity_changed()

    def _put(self, claimed: ClaimedTask, settlement: Settlement) -> None:
        """Queue a verdict for saving (remembering a group member's final verdict for the metrics)."""
        group_id = claimed.record.group_id
        if group_id is not None and settlement.state.is_final and self._report_groups:
            self._members[settlement.task_id, settlement.token] = group_id
        self._settler.put(settlement)

    def _saved(self, batch: list[Settlement], lost: set[str]) -> None:
        """The settler saved ``batch`` but for the tasks in ``lost``: note the groups they may have ended, for
        the metrics."""
        if not self._members:
            return
        for settlement in batch:
            if settlement.task_id in lost:
                continue
            group_id = self._members.pop((settlement.task_id, settlement.token), None)
            if group_id is not None:
                self._group_ends.append((group_id, settlement.at, settlement.state))
        event = self._group_ends_event
        if self._group_ends and event is not None:
            event.set()

    def _internal_error(self, running: Running, exc: BaseException) -> Settlement | None:
        record = running.claimed.record
        self._logger.error(
            "internal error while handling task %s (%s); the task is dead, the worker goes on",
            record.id,
            record.name,
            exc_info=exc,
        )
        if running.reason == LOST:  # another worker holds the task now: its verdict is not ours to save
            return None
        return self._policy.dead(
            running.claimed,
            now=self._clock(),
            error=f"internal error while handling the task (please report it): {error_text(exc)}",
        )

    async def _run_observed(self, running: Running, observer: TaskObserver) -> Settlement | None:
        record = running.claimed.record
        if running.reason is not None:  # released (or lost) before it started: not an attempt here
            return await self._runner.run(running)
        started_at = self._clock()
        observe_started(observer, record)
        settlement = await self._runner.run(running)
        if settlement is not None:  # None: the lease was lost, the new owner reports the attempt
            observe_finished(observer, record, settlement, started_at)
        return settlement

    # -- background loops -----------------------------------------------------------------------------------

    async def _watch_loop(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        task_status.started()
        await self._loopwatch.run()  # joins the watchdog before its first await: before the caller resumes

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
            if token is not None:
                self._lose(task_id, token)
        self._capacity_changed()

    def _lose(self, task_id: str, token: str) -> None:
        """The lease ``token`` of ``task_id`` is no longer this worker's: cancel its run here, if any."""
        running = self._running.get(token)
        if running is not None and running.reason is None:
            self._logger.warning(
                "lost the lease of running task %s (%s): another worker took it over, so this run is "
                "cancelled here (was the event loop blocked longer than the lease of %g s?)",
                task_id,
                running.claimed.record.name,
                self._options.lease,
            )
            running.cancel(LOST)
        if self._held.get(task_id) == token:
            del self._held[task_id]

    def _loop_blocked(self, block: LoopBlock) -> None:
        """Called from the loop watchdog's thread: name the task that blocks the event loop, and its stack."""
        if block.frame is None or block.reported:  # thread gone, or the manager's watch reported this block
            return
        executing = self._runner.executing
        below: list[tuple[FrameType, int]] = []  # innermost first, down to the task's call
        blocker: Running | None = None
        for frame, line in traceback.walk_stack(block.frame):
            blocker = executing.get(frame)
            if blocker is not None:
                break
            below.append((frame, line))
        lease = self._options.lease
        if blocker is None:
            stack = "".join(traceback.StackSummary.extract(reversed(below[:_STACK_LIMIT])).format())
            self._logger.warning(
                "the event loop was blocked for %.1f s (more than lease / 3 = %g s), not by a task; while it "
                "is blocked no lease is renewed, and past the lease (%g s) other workers run this worker's "
                "tasks again. It was at:\n%s",
                block.seconds,
                block.threshold,
                lease,
                stack.rstrip("\n"),
            )
            return
        record = blocker.claimed.record
        stack = "".join(traceback.StackSummary.extract(reversed(below[:_STACK_LIMIT])).format())
        self._logger.warning(
            "the event loop was blocked for %.1f s (more than lease / 3 = %g s) by task %s (%s): while it is "
            "blocked no lease is renewed, and past the lease (%g s) another worker runs the task again and "
            "this run's result is discarded. Do not block in an async def task: await, or make it a plain "
            "def (it runs in a worker thread). It was at:\n%s",
            block.seconds,
            block.threshold,
            record.id,
            record.name,
            lease,
            stack.rstrip("\n"),
            extra={"task_id": record.id, "task_name": record.name},
        )

    def _blocking_task(self, frame: FrameType) -> str | None:
        """Called from the loop watchdog's thread: the durable task whose call is on ``frame``'s stack."""
        for each, _ in traceback.walk_stack(frame):
            running = self._runner.executing.get(each)
            if running is not None:
                return f"AsyncTasks task {running.claimed.record.id} ({running.claimed.record.name})"
        return None

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
        return await recover_expired(self._backend, self._options, self._take_over, self._logger)

    def _take_over(self, claimed: ClaimedTask, verdict: Settlement) -> None:
        self._hold(claimed)
        self._put(claimed, verdict)

    async def _cancel_watch_loop(self) -> None:
        """Ask the store, at least twice a second, whether a running task's cancellation was asked (the
        path every backend has; a backend that pushes notices is faster, see :class:`NoticePump`)."""
        interval = min(self._options.poll_interval, _CANCEL_POLL)
        failures = 0
        while True:
            await anyio.sleep(interval)
            running = [r.claimed.record.id for r in self._running.values() if r.reason is None]
            if not running:
                continue
            try:
                asked = await self._backend.cancel_requests(running)
            except Exception as exc:
                failures += 1
                self._logger.warning(
                    "could not read the cancel requests of %d running task(s) (%s: %s)",
                    len(running),
                    type(exc).__name__,
                    exc,
                    exc_info=failures == 1,
                )
                continue
            failures = 0
            for task_id in asked:
                self.cancel_running(task_id)

    async def _confirm_cancels(self, task_ids: list[str]) -> None:
        """Cancel notices arrived: stop those of the tasks running here whose request the store confirms
        (a notice may be late, or about another period of the task)."""
        running = {r.claimed.record.id for r in self._running.values() if r.reason is None}
        here = [task_id for task_id in dict.fromkeys(task_ids) if task_id in running]
        if not here:
            return
        for task_id in await self._backend.cancel_requests(here):
            self.cancel_running(task_id)

    async def _group_report_loop(self) -> None:
        """Report to the observer each group a verdict of this worker ended (its finish time is that
        verdict's), read back from the store after the verdicts were saved."""
        observer = self._options.observer
        report = getattr(observer, "group_finished", None)
        assert callable(report)
        while True:
            event = self._group_ends_event = anyio.Event()
            if not self._group_ends:
                await event.wait()
            ends, self._group_ends = self._group_ends, []
            for group_id in dict.fromkeys(group_id for group_id, _, _ in ends):
                try:
                    group = await self._backend.get_group(group_id)
                except Exception as exc:
                    self._logger.debug("could not read group %s for the metrics: %s", group_id, exc)
                    continue
                if group is None or group.outcome is None:
                    continue
                if any(
                    at == group.finished_at and state is group.outcome
                    for gid, at, state in ends
                    if gid == group_id
                ):
                    try:
                        report(TaskState(group.outcome).value)
                    except Exception:
                        self._logger.warning(
                            "the task observer failed in group_finished(); ignored", exc_info=True
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
