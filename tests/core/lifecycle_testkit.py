"""Test doubles shared by the core tests: a recording Task, an event collector, a background runner."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import anyio

import lifecycle
from lifecycle import EventKind, LifecycleEvent

Behaviour = Callable[[], Awaitable[None]]


class Boom(Exception):
    """The exception test tasks raise."""


def raises(message: str) -> Behaviour:
    """A behaviour that raises ``Boom(message)``."""

    async def behaviour() -> None:
        raise Boom(message)

    return behaviour


def task_errors(group: BaseException | None) -> list[lifecycle.TaskError]:
    """The ``exceptions`` of a :class:`~lifecycle.TaskManagerError`, each checked to be a
    :class:`~lifecycle.TaskError` (the manager never nests groups): typed, so tests read their attributes."""
    assert isinstance(group, lifecycle.TaskManagerError), repr(group)
    errors = [error for error in group.exceptions if isinstance(error, lifecycle.TaskError)]
    assert len(errors) == len(group.exceptions), f"a nested group in {group!r}"
    return errors


async def returns() -> None:
    """A behaviour that returns at once."""


def waits_for(event: anyio.Event) -> Behaviour:
    """A behaviour that returns once ``event`` is set."""

    async def behaviour() -> None:
        await event.wait()

    return behaviour


class FakeTask:
    """A Task that appends ``"<name>.<stage>"`` to a shared log and then runs an optional behaviour.

    Without a behaviour, initialize and cleanup return at once and execute waits forever (until cancelled).
    ``"<name>.<stage>.cancelled"`` is logged when the stage sees a cancellation.
    """

    def __init__(
        self,
        name: str,
        log: list[str],
        *,
        initialize: Behaviour | None = None,
        execute: Behaviour | None = None,
        cleanup: Behaviour | None = None,
    ) -> None:
        self.name = name
        self.log = log
        self._initialize = initialize
        self._execute = execute
        self._cleanup = cleanup

    async def _stage(self, stage: str, behaviour: Behaviour | None, forever: bool = False) -> None:
        self.log.append(f"{self.name}.{stage}")
        try:
            if behaviour is not None:
                await behaviour()
            elif forever:
                await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            self.log.append(f"{self.name}.{stage}.cancelled")
            raise

    async def initialize(self) -> None:
        await self._stage("initialize", self._initialize)

    async def execute(self) -> None:
        await self._stage("execute", self._execute, forever=True)

    async def cleanup(self) -> None:
        await self._stage("cleanup", self._cleanup)


@dataclass
class Events:
    """An ``on_event`` callback that records events and lets a test await one."""

    events: list[LifecycleEvent] = field(default_factory=list)
    _waiters: list[tuple[Callable[[LifecycleEvent], bool], anyio.Event]] = field(default_factory=list)

    def __call__(self, event: LifecycleEvent) -> None:
        self.events.append(event)
        for predicate, waiter in list(self._waiters):
            if predicate(event):
                waiter.set()

    @staticmethod
    def _predicate(
        kind: EventKind, task_name: str | None, state: lifecycle.ManagerState | None
    ) -> Callable[[LifecycleEvent], bool]:
        def predicate(event: LifecycleEvent) -> bool:
            return (
                event.kind is kind
                and (task_name is None or event.task_name == task_name)
                and (state is None or event.state is state)
            )

        return predicate

    async def wait(
        self, kind: EventKind, task_name: str | None = None, *, state: lifecycle.ManagerState | None = None
    ) -> LifecycleEvent:
        """Wait until an event of ``kind`` (for ``task_name`` / ``state`` when given) has been seen."""
        predicate = self._predicate(kind, task_name, state)
        for event in self.events:
            if predicate(event):
                return event
        waiter = anyio.Event()
        entry = (predicate, waiter)
        self._waiters.append(entry)
        try:
            with anyio.fail_after(10):
                await waiter.wait()
        finally:
            self._waiters.remove(entry)
        return next(event for event in self.events if predicate(event))

    async def running(self) -> None:
        """Wait until the manager is RUNNING."""
        await self.wait(EventKind.STATE_CHANGED, state=lifecycle.ManagerState.RUNNING)

    def kinds(self, task_name: str | None = None) -> list[str]:
        """The kinds of the events about ``task_name`` (or manager-level events when None), in order."""
        return [e.kind.value for e in self.events if e.task_name == task_name]


@dataclass
class Outcome:
    """What ``manager.run()`` ended with."""

    done: anyio.Event = field(default_factory=anyio.Event)
    error: BaseException | None = None

    async def finished(self) -> BaseException | None:
        with anyio.fail_after(10):
            await self.done.wait()
        return self.error


async def run_capturing(manager: lifecycle.TaskManager, outcome: Outcome) -> None:
    """Run the manager, recording its exception (if any) in ``outcome`` instead of raising."""
    try:
        await manager.run()
    except Exception as exc:
        outcome.error = exc
    finally:
        outcome.done.set()


async def run_until_running_then_shut_down(
    manager: lifecycle.TaskManager, events: Events
) -> BaseException | None:
    """Run the manager until it runs, ask for a graceful shutdown, return what ``run()`` ended with."""
    outcome = Outcome()
    async with anyio.create_task_group() as tg:
        tg.start_soon(run_capturing, manager, outcome)
        await events.running()
        manager.shutdown()
    return await outcome.finished()


def manager(**kwargs: object) -> tuple[lifecycle.TaskManager, Events]:
    """A manager with an :class:`Events` recorder attached."""
    events = Events()
    return lifecycle.TaskManager(on_event=events, **kwargs), events  # type: ignore[arg-type]
