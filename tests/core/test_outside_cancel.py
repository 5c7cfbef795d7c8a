"""Semantics 7: cancellation from outside, and KeyboardInterrupt / SystemExit from a task."""

from __future__ import annotations

import anyio
import anyio.lowlevel
import pytest

from lifecycle import EventKind, ManagerState, TaskManager, TaskType
from tests.core.lifecycle_testkit import Boom, FakeTask, manager, raises

pytestmark = pytest.mark.anyio


async def test_cancelled_from_outside_while_running_shuts_down_cleans_up_and_propagates() -> None:
    log: list[str] = []
    m, events = manager()
    m.add_task("a", FakeTask("a", log))
    m.add_task("b", FakeTask("b", log))
    hot = anyio.Event()

    async def hot_added() -> None:
        hot.set()
        await anyio.sleep_forever()

    with anyio.CancelScope() as outer:
        async with anyio.create_task_group() as tg:
            tg.start_soon(m.run)
            await events.running()
            m.add_execute_task("hot", hot_added)
            await hot.wait()
            outer.cancel()
    assert outer.cancelled_caught, "the cancellation must propagate out of run()"
    assert m.state is ManagerState.STOPPED
    assert log[-2:] == ["b.cleanup", "a.cleanup"]
    assert {"a.execute.cancelled", "b.execute.cancelled"} <= set(log)
    stop = next(e for e in events.events if e.kind is EventKind.SHUTDOWN_REQUESTED)
    assert "cancelled" in (stop.detail or "")


async def test_cancelled_from_outside_during_initialize_cleans_up_what_was_initialized() -> None:
    log: list[str] = []
    in_b = anyio.Event()
    m = TaskManager()

    async def b_initialize() -> None:
        in_b.set()
        await anyio.sleep_forever()

    m.add_task("a", FakeTask("a", log))
    m.add_task("b", FakeTask("b", log, initialize=b_initialize))
    with anyio.CancelScope() as outer:
        async with anyio.create_task_group() as tg:
            tg.start_soon(m.run)
            await in_b.wait()
            outer.cancel()
    assert outer.cancelled_caught
    assert log == ["a.initialize", "b.initialize", "b.initialize.cancelled", "a.cleanup"]
    assert m.state is ManagerState.STOPPED


async def test_task_errors_during_an_outside_cancellation_are_logged_and_the_cancellation_wins(
    caplog: pytest.LogCaptureFixture,
) -> None:
    log: list[str] = []
    m, events = manager()
    m.add_task("a", FakeTask("a", log, cleanup=raises("cleanup broke")))
    with anyio.CancelScope() as outer:
        async with anyio.create_task_group() as tg:
            tg.start_soon(m.run)
            await events.running()
            outer.cancel()
    assert outer.cancelled_caught
    failed = [e for e in events.events if e.kind is EventKind.TASK_FAILED]
    assert [e.task_name for e in failed] == ["a"]
    assert any("cleanup broke" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("exc_type", [KeyboardInterrupt, SystemExit])
async def test_base_exceptions_from_execute_shut_down_clean_up_and_re_raise(
    exc_type: type[BaseException],
) -> None:
    log: list[str] = []
    m, events = manager()

    async def interrupt() -> None:
        raise exc_type

    m.add_task("a", FakeTask("a", log))
    m.add_task("b", FakeTask("b", log, execute=interrupt))
    with pytest.raises(exc_type):
        await m.run()
    assert log[-2:] == ["b.cleanup", "a.cleanup"]
    assert "a.execute.cancelled" in log
    assert m.state is ManagerState.STOPPED
    failed = [e for e in events.events if e.kind is EventKind.TASK_FAILED]
    assert [(e.task_name, type(e.error.__cause__)) for e in failed] == [("b", exc_type)]  # type: ignore[union-attr]


async def test_keyboard_interrupt_wins_over_ordinary_errors_but_they_are_still_reported() -> None:
    log: list[str] = []
    m, events = manager()

    async def interrupt() -> None:
        raise KeyboardInterrupt

    m.add_task("a", FakeTask("a", log, cleanup=raises("cleanup")))
    m.add_execute_task("b", interrupt)
    with pytest.raises(KeyboardInterrupt):
        await m.run()
    failed = [(e.task_name, e.stage.value) for e in events.events if e.kind is EventKind.TASK_FAILED]  # type: ignore[union-attr]
    assert failed == [("b", "execute"), ("a", "cleanup")]
    assert isinstance(next(e for e in events.events if e.task_name == "a" and e.error).error.__cause__, Boom)  # type: ignore[union-attr]


async def test_keyboard_interrupt_from_a_cleanup_lets_the_other_cleanups_run_then_re_raises() -> None:
    log: list[str] = []

    async def interrupt() -> None:
        raise KeyboardInterrupt

    m = TaskManager()
    m.add_task("a", FakeTask("a", log))
    m.add_task("b", FakeTask("b", log, cleanup=interrupt))
    m.add_execute_task("stop", anyio.lowlevel.checkpoint, TaskType.STOP_GROUP)
    with pytest.raises(KeyboardInterrupt):
        await m.run()
    assert [e for e in log if "cleanup" in e] == ["b.cleanup", "a.cleanup"]
