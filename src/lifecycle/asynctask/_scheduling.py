"""What ``AsyncTasks`` offers for periodic tasks and chains: ``schedule``, ``every``, ``schedules`` and
``enqueue_chain`` (a base class, so each module stays small)."""

from __future__ import annotations

import builtins
import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import timedelta, tzinfo
from typing import Any

from ._chain import build_chain
from ._enqueue import build_task
from ._meta import write_meta
from ._model import Call
from ._operations import TaskOperations
from ._registry import Registry
from ._schedule import (
    CronTrigger,
    IntervalTrigger,
    MissedFires,
    Schedule,
    ScheduleInfo,
    Scheduler,
    check_interval,
    check_missed,
    check_name,
    resolve_timezone,
)

__all__ = ["SchedulingOperations"]


class SchedulingOperations(TaskOperations):
    """The periodic-task and chain methods of :class:`~lifecycle.asynctask.AsyncTasks`; see that class."""

    _registry: Registry
    _scheduler: Scheduler

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
        check_name(name, "schedule()")
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
        check_name(name, "every()")
        trigger = IntervalTrigger(check_interval(interval))
        return self._add_schedule(name, trigger, fn, args, queue, max_retries, timeout, missed)

    def schedules(self) -> builtins.list[ScheduleInfo]:
        """Every schedule declared on this ``AsyncTasks``, by name, with its next fire time (from the
        running scheduler, or computed from now when it does not run)."""
        now = self._clock()
        return sorted((schedule.info(now) for schedule in self._scheduler), key=lambda info: info.name)

    async def enqueue_chain(self, calls: Sequence[Call]) -> str:
        """Store a chain of calls run one after the other and return the chain's id.

        Only the first step is stored now; each later step is enqueued when the previous one succeeds, in
        the same atomic step as that success, and receives the previous result as
        ``TaskContext.previous_result``. A step that dies (or is cancelled) stops the chain: later steps never
        run; requeue the dead step and, once it succeeds, the chain goes on. A step's ``delay`` counts from
        the previous step's success. ``tasks.info(chain_id)`` shows the step the chain is at, with the
        chain's progress in ``.chain``. Calls are checked like :meth:`enqueue_many`; steps cannot have a
        ``task_id`` (their ids are ``"<chain id>.<index>"``).

        Example::

            chain_id = await tasks.enqueue_chain([Call(fetch, url), Call(parse), Call(store)])
            info = await tasks.info(chain_id)
            print(info.chain.state, info.chain.current)
        """
        now = self._clock()
        chain_id, first = build_chain(calls, now, self._registry, self._encoding)
        self._check_open("enqueue_chain")
        await self._backend.enqueue_many([first])
        self._stored([first], now)
        return chain_id

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
        task = replace(task, meta=write_meta(schedule={"name": schedule.name, "fire": fire}))
        stored = await self._backend.enqueue_many([task], if_exists="skip")
        if stored:
            self._logger.debug("schedule %r enqueued task %s", schedule.name, task.id)
            self._stored([task], now)

    async def _exists(self, task_id: str) -> bool:
        return await self._backend.get(task_id) is not None
