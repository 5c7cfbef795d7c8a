"""Periodic tasks: cron and interval triggers, and the scheduler that enqueues each fire time exactly once.

Every process whose ``AsyncTasks`` executes runs the scheduler of the schedules it declares; there is no
leader. Each fire time becomes a task with a deterministic id (``"schedule:<name>:<UTC fire time>"``)
stored with ``enqueue_many(if_exists="skip")``, so however many processes reach the same fire time, the
backend stores it once. A run's outcome never affects the schedule: the next fire time is computed from the
clock, not from the previous run.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone, tzinfo
from typing import Any, Literal, Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import anyio
import anyio.abc

from .._checks import check_seconds
from .._core._backoff import Backoff
from ._clock import Clock
from ._model import Call
from ._registry import check_label

__all__ = [
    "CronTrigger",
    "IntervalTrigger",
    "MissedFires",
    "Schedule",
    "ScheduleInfo",
    "Scheduler",
    "check_interval",
    "check_missed",
    "check_schedule_name",
    "fire_stamp",
    "fire_task_id",
    "resolve_timezone",
]

MissedFires = Literal["skip", "run_once"]
"""What a schedule does about fire times that passed while no scheduler ran: ``"skip"`` them, or
``"run_once"``: one catch-up run for the most recent of them."""

_RETRY = Backoff(initial=0.5, cap=30.0)
_LONGEST_SLEEP = 60.0  # re-read the clock at least this often: wall clocks jump (NTP, suspend)


class Trigger(Protocol):
    """When a schedule fires (seconds since the epoch)."""

    def next_after(self, moment: float) -> float:
        """The first fire time strictly after ``moment``."""
        ...

    def latest_at_or_before(self, moment: float) -> float:
        """The last fire time at or before ``moment``."""
        ...


class IntervalTrigger:
    """Fires every ``interval`` seconds, at the multiples of ``interval`` since the Unix epoch, so that every
    process computes the same fire times whenever it started."""

    def __init__(self, interval: float) -> None:
        self.interval = interval

    def next_after(self, moment: float) -> float:
        """The first multiple of the interval after ``moment``."""
        fire = (math.floor(moment / self.interval) + 1) * self.interval
        return fire if fire > moment else fire + self.interval

    def latest_at_or_before(self, moment: float) -> float:
        """The last multiple of the interval at or before ``moment``."""
        fire = math.floor(moment / self.interval) * self.interval
        return fire if fire <= moment else fire - self.interval


class CronTrigger:
    """Fires on a cron expression (5 fields, or 6 with seconds last, as ``croniter`` reads them) in a time
    zone, daylight saving time included."""

    def __init__(self, expression: str, zone: tzinfo) -> None:
        croniter = _croniter()
        if not isinstance(expression, str) or not croniter.is_valid(expression):
            raise ValueError(
                f"schedule(): {expression!r} is not a valid cron expression; write five fields "
                "'minute hour day-of-month month day-of-week', e.g. '*/15 * * * *' or '0 3 * * mon-fri'"
            )
        self.expression = expression
        self.zone = zone
        self._croniter = croniter
        try:
            self.next_after(time.time())
        except Exception:  # croniter's CroniterBadDateError: it found no date in the years it searches
            raise ValueError(
                f"schedule(): the cron expression {expression!r} never fires: no date matches its "
                "day-of-month, month and day-of-week fields (such as February 31 or April 31); fix them"
            ) from None

    def next_after(self, moment: float) -> float:
        """The first fire time after ``moment``."""
        start = datetime.fromtimestamp(moment, self.zone)
        return float(self._croniter(self.expression, start).get_next(float))

    def latest_at_or_before(self, moment: float) -> float:
        """The last fire time at or before ``moment``."""
        start = datetime.fromtimestamp(moment, self.zone)
        previous = float(self._croniter(self.expression, start).get_prev(float))
        following = self.next_after(previous)
        return following if following <= moment else previous


@dataclass(frozen=True, slots=True)
class ScheduleInfo:
    """One schedule, as :meth:`AsyncTasks.schedules` lists it.

    ``kind`` is ``"cron"`` or ``"every"``; ``spec`` the cron expression or the interval in seconds;
    ``next_fire`` the next fire time (seconds since the epoch) after now, ``last_fire`` the latest fire time
    this process enqueued (or found enqueued by another process), ``None`` before the first.
    """

    name: str
    task_name: str
    kind: Literal["cron", "every"]
    spec: str
    timezone: str
    queue: str
    missed: MissedFires
    next_fire: float
    last_fire: float | None = None

    def task_id(self, fire: float) -> str:
        """The id of the task this schedule enqueues for ``fire`` (look it up with ``tasks.info``)."""
        return fire_task_id(self.name, fire)


class Schedule:
    """A declared schedule and what this process's scheduler knows about it."""

    def __init__(
        self,
        *,
        name: str,
        trigger: CronTrigger | IntervalTrigger,
        call: Call,
        task_name: str,
        queue: str,
        missed: MissedFires,
    ) -> None:
        self.name = name
        self.trigger = trigger
        self.call = call
        self.task_name = task_name
        self.queue = queue
        self.missed = missed
        self.last_fire: float | None = None
        self.next_fire: float | None = None

    def call_for(self, fire: float) -> Call:
        """The call to enqueue for the fire time ``fire``."""
        call = self.call
        return Call(
            call.target,
            *call.args,
            queue=call.queue,
            max_retries=call.max_retries,
            timeout=call.timeout,
            task_id=fire_task_id(self.name, fire),
        )

    def info(self, now: float) -> ScheduleInfo:
        """This schedule as a :class:`ScheduleInfo` row."""
        trigger = self.trigger
        if isinstance(trigger, CronTrigger):
            kind: Literal["cron", "every"] = "cron"
            spec, zone = trigger.expression, str(trigger.zone)
        else:
            kind, spec, zone = "every", f"{trigger.interval:g}", "UTC"
        next_fire = self.next_fire if self.next_fire is not None else trigger.next_after(now)
        return ScheduleInfo(
            name=self.name,
            task_name=self.task_name,
            kind=kind,
            spec=spec,
            timezone=zone,
            queue=self.queue,
            missed=self.missed,
            next_fire=next_fire,
            last_fire=self.last_fire,
        )


FireFunction = Callable[[Schedule, float], Awaitable[None]]
"""Enqueue the fire time (idempotently: ``if_exists="skip"``)."""

ExistsFunction = Callable[[str], Awaitable[bool]]
"""Whether a task with this id is stored."""


class Scheduler:
    """The schedules of one ``AsyncTasks``; :meth:`run` drives each in its own task until cancelled."""

    def __init__(self, clock: Clock, logger: logging.Logger) -> None:
        self._clock = clock
        self._logger = logger
        self._schedules: dict[str, Schedule] = {}
        self._group: anyio.abc.TaskGroup | None = None
        self._driver: Callable[[Schedule], Coroutine[Any, Any, None]] | None = None
        self._changed: anyio.Event | None = None

    def __len__(self) -> int:
        return len(self._schedules)

    def __iter__(self) -> Iterator[Schedule]:
        return iter(list(self._schedules.values()))

    def add(self, schedule: Schedule) -> None:
        """Add a schedule (started at once when the scheduler runs); ``ValueError`` for a used name."""
        if schedule.name in self._schedules:
            raise ValueError(
                f"a schedule named {schedule.name!r} exists already: schedule names identify fire times "
                "across processes, so each must be unique; pass another name="
            )
        self._schedules[schedule.name] = schedule
        if self._group is not None and self._driver is not None:
            self._group.start_soon(self._driver, schedule)

    async def run(self, fire: FireFunction, exists: ExistsFunction, lookback: float) -> None:
        """Drive every schedule until cancelled. ``lookback``: how far back ``missed="run_once"`` trusts the
        absence of a fire time's record (the retention of finished tasks)."""

        async def drive(schedule: Schedule) -> None:
            await self._drive(schedule, fire, exists, lookback)

        try:
            async with anyio.create_task_group() as group:
                self._group, self._driver = group, drive
                for schedule in self:
                    group.start_soon(drive, schedule)
                await anyio.sleep_forever()
        finally:
            self._group = self._driver = None

    async def wait_for(self, name: str, condition: Callable[[Schedule], bool]) -> None:
        """Wait until ``condition(schedule)`` holds for schedule ``name``, re-checked whenever this process's
        scheduler moves it (waits for a fire time, or handles one): for tests and tools."""
        schedule = self._schedules[name]
        while not condition(schedule):
            changed = self._changed = self._changed or anyio.Event()
            await changed.wait()

    async def wait_handled(self, name: str, fire: float) -> None:
        """Wait until this process handled the fire time ``fire`` (or a later one) of schedule ``name``."""
        await self.wait_for(name, lambda schedule: (schedule.last_fire or -math.inf) >= fire)

    def _moved(self) -> None:
        changed, self._changed = self._changed, None
        if changed is not None:
            changed.set()

    async def _drive(
        self, schedule: Schedule, fire: FireFunction, exists: ExistsFunction, lookback: float
    ) -> None:
        trigger = schedule.trigger
        now = self._clock()
        if schedule.missed == "run_once":
            latest = trigger.latest_at_or_before(now)
            if now - latest <= lookback and not await self._ran(schedule, latest, exists):
                self._logger.info(
                    "schedule %r missed its fire time %s while no scheduler ran: running it once now",
                    schedule.name,
                    fire_stamp(latest),
                )
                await self._fire(schedule, latest, fire)
        cursor = now
        while True:
            upcoming = schedule.next_fire = trigger.next_after(cursor)
            self._moved()
            await self._wait_until(upcoming)
            # Fire times that passed while this loop could not run (a blocked or suspended process)
            # coalesce into one run: the latest due.
            due = max(upcoming, trigger.latest_at_or_before(self._clock()))
            await self._fire(schedule, due, fire)
            cursor = due

    async def _ran(self, schedule: Schedule, fire: float, exists: ExistsFunction) -> bool:
        try:
            return await exists(fire_task_id(schedule.name, fire))
        except Exception as exc:
            self._logger.warning(
                "schedule %r could not check whether its fire time %s ran (%s: %s); not catching it up",
                schedule.name,
                fire_stamp(fire),
                type(exc).__name__,
                exc,
            )
            return True

    async def _fire(self, schedule: Schedule, due: float, fire: FireFunction) -> None:
        failures = 0
        while True:
            try:
                await fire(schedule, due)
            except Exception as exc:
                failures += 1
                delay = _RETRY.delay(failures)
                self._logger.warning(
                    "schedule %r could not enqueue its fire time %s (%s: %s); trying again in %.1f s",
                    schedule.name,
                    fire_stamp(due),
                    type(exc).__name__,
                    exc,
                    delay,
                    exc_info=failures == 1,
                )
                await anyio.sleep(delay)
                due = max(due, schedule.trigger.latest_at_or_before(self._clock()))
                continue
            schedule.last_fire = due
            self._moved()
            return

    async def _wait_until(self, deadline: float) -> None:
        clock = self._clock
        wait_until: Callable[[float], Awaitable[None]] | None = getattr(clock, "wait_until", None)
        while (remaining := deadline - clock()) > 0:
            if wait_until is not None:
                await wait_until(deadline)
            else:
                await anyio.sleep(min(remaining, _LONGEST_SLEEP))


def fire_stamp(fire: float) -> str:
    """``fire`` as UTC ISO text to the millisecond (``2024-05-01T03:00:00Z``, ``...T03:00:00.250Z``)."""
    millis = round(fire * 1000)
    text = datetime.fromtimestamp(millis // 1000, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{text}.{millis % 1000:03d}Z" if millis % 1000 else f"{text}Z"


def fire_task_id(name: str, fire: float) -> str:
    """The deterministic task id of schedule ``name``'s fire time ``fire``."""
    return f"schedule:{name}:{fire_stamp(fire)}"


def resolve_timezone(zone: str | tzinfo | None) -> tzinfo:
    """``zone`` as a ``tzinfo``: ``None`` is UTC, a string an IANA name (``"Europe/Paris"``)."""
    if zone is None:
        return timezone.utc
    if isinstance(zone, tzinfo):
        return zone
    if isinstance(zone, str):
        try:
            return ZoneInfo(zone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(
                f"schedule(): unknown time zone {zone!r}; pass an IANA name such as 'Europe/Paris' or 'UTC', "
                "or a tzinfo"
            ) from None
    raise TypeError(f"schedule(): timezone must be an IANA name or a tzinfo, got {zone!r}")


def check_interval(interval: float | timedelta) -> float:
    """``interval`` in seconds, at least a millisecond (fire times are identified to the millisecond)."""
    seconds = check_seconds(interval, "every(): the interval")
    if seconds < 0.001:
        raise ValueError(f"every(): the interval must be at least 0.001 s, got {interval!r}")
    return seconds


def check_missed(missed: object) -> MissedFires:
    """``missed`` checked: ``"skip"`` or ``"run_once"``."""
    if missed == "skip":
        return "skip"
    if missed == "run_once":
        return "run_once"
    raise ValueError(f"missed must be 'skip' (the default) or 'run_once', got {missed!r}")


def check_schedule_name(name: object, where: str) -> str:
    """A schedule name: a non-empty, non-blank string without NUL (it is part of each fire time's task id);
    ``TypeError`` for a non-string, ``ValueError`` otherwise."""
    return check_label(name, f"{where}: the schedule name")


def _croniter() -> Any:
    try:
        from croniter import croniter
    except ImportError:
        raise ImportError(
            "tasks.schedule() reads cron expressions with croniter, which is not installed: "
            "pip install 'anyio-lifecycle[cron]' (or use tasks.every() for fixed intervals)"
        ) from None
    return croniter
