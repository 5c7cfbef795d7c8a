"""Semantics 2: execute tasks queued before run and during initialize, started at once while running."""

from __future__ import annotations

import threading

import anyio
import pytest

from lifecycle import EventKind, ManagerState, TaskManager, TaskType
from tests.core.lifecycle_testkit import (
    Events,
    FakeTask,
    Outcome,
    manager,
    returns,
    run_capturing,
    task_errors,
)

# Explicit, so the anyio plugin combines its backend parameter with each test's own parameters.
pytestmark = pytest.mark.anyio


async def test_execute_tasks_added_before_run_start_after_initialize_in_add_order(anyio_backend: str) -> None:
    log: list[str] = []
    m, events = manager()

    def recorder(name: str) -> object:
        async def work() -> None:
            log.append(f"{name}.execute")
            await anyio.sleep_forever()

        return work

    m.add_execute_task("first", recorder("first"))  # type: ignore[arg-type]
    m.add_task("a", FakeTask("a", log))
    m.add_execute_task("second", recorder("second"))  # type: ignore[arg-type]
    outcome = Outcome()
    async with anyio.create_task_group() as tg:
        tg.start_soon(run_capturing, m, outcome)
        await events.wait(EventKind.TASK_EXECUTING, "second")
        m.shutdown()
    assert await outcome.finished() is None
    # Initialize first, then every execute stage; they are spawned in add order, which asyncio keeps
    # (FIFO) while trio deliberately shuffles the first run of tasks spawned together.
    assert log[0] == "a.initialize"
    assert sorted(log[1:4]) == ["a.execute", "first.execute", "second.execute"]
    if anyio_backend == "asyncio":
        assert log[1:4] == ["first.execute", "a.execute", "second.execute"]


async def test_add_while_initializing_is_queued_without_blocking_the_caller() -> None:
    log: list[str] = []
    m, _events = manager()
    started = anyio.Event()
    handles = []

    async def queued_work() -> None:
        log.append("queued.execute")
        started.set()
        await anyio.sleep_forever()

    async def initialize() -> None:
        assert m.state is ManagerState.INITIALIZING
        handles.append(m.add_execute_task("queued", queued_work))
        log.append("added")  # the call returned at once, inside initialize

    m.add_task("a", FakeTask("a", log, initialize=initialize))
    m.add_task("b", FakeTask("b", log))
    outcome = Outcome()
    async with anyio.create_task_group() as tg:
        tg.start_soon(run_capturing, m, outcome)
        with anyio.fail_after(5):
            await started.wait()
        m.shutdown()
    assert await outcome.finished() is None
    assert log.index("added") < log.index("b.initialize") < log.index("queued.execute")
    assert handles[0].done


async def test_add_while_running_starts_at_once_and_is_cancelled_at_shutdown() -> None:
    m, events = manager()
    started = anyio.Event()
    cancelled: list[str] = []

    async def connection() -> None:
        started.set()
        try:
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            cancelled.append("conn")
            raise

    outcome = Outcome()
    async with anyio.create_task_group() as tg:
        tg.start_soon(run_capturing, m, outcome)
        await events.running()
        handle = m.add_execute_task("conn", connection)
        with anyio.fail_after(5):
            await started.wait()
        assert not handle.done
        m.shutdown()
        with anyio.fail_after(5):
            await handle.wait()
    assert await outcome.finished() is None
    assert cancelled == ["conn"]
    assert handle.done


async def test_add_after_shutdown_began_or_stopped_raises_runtime_error() -> None:
    m, events = manager()
    outcome = Outcome()
    async with anyio.create_task_group() as tg:
        tg.start_soon(run_capturing, m, outcome)
        await events.running()
        m.shutdown()
        assert m.state is ManagerState.STOPPING
        with pytest.raises(RuntimeError, match="shutting down"):
            m.add_execute_task("late", returns)
    assert await outcome.finished() is None
    with pytest.raises(RuntimeError, match="shutting down"):
        m.add_execute_task("later", returns)


async def test_shutdown_before_run_ends_the_run_at_once_and_refuses_new_work() -> None:
    log: list[str] = []
    m = TaskManager()
    m.add_task("a", FakeTask("a", log))
    m.shutdown()
    m.shutdown()  # idempotent
    with pytest.raises(RuntimeError):
        m.add_execute_task("late", returns)
    await m.run()
    assert log == []
    assert m.state is ManagerState.STOPPED
    assert [row.state for row in m.status()] == ["skipped"]


async def test_an_execute_task_object_and_a_plain_async_function_are_both_accepted() -> None:
    ran: list[str] = []

    class Work:
        async def execute(self) -> None:
            ran.append("object")

    async def work() -> None:
        ran.append("function")

    m = TaskManager()
    m.add_execute_task("object", Work(), TaskType.STOP_GROUP)
    m.add_execute_task("function", work, TaskType.STOP_GROUP)
    m.add_execute_task("lambda", lambda: work(), TaskType.STOP_GROUP)
    await m.run()
    assert sorted(ran) == ["function", "function", "object"]


async def test_every_task_type_can_be_added_while_running_including_stop_group() -> None:
    m, events = manager()
    release = anyio.Event()
    outcome = Outcome()

    async def job() -> None:
        await release.wait()

    async with anyio.create_task_group() as tg:
        tg.start_soon(run_capturing, m, outcome)
        await events.running()
        m.add_execute_task("strict", anyio.sleep_forever, TaskType.STRICT)
        m.add_execute_task("error", anyio.sleep_forever, TaskType.ERROR)
        m.add_execute_task("job", job, TaskType.STOP_GROUP)
        await events.wait(EventKind.TASK_EXECUTING, "job")
        assert m.state is ManagerState.RUNNING
        release.set()  # the only STOP_GROUP member returns: graceful shutdown
    assert await outcome.finished() is None
    stop = next(e for e in events.events if e.kind is EventKind.SHUTDOWN_REQUESTED)
    assert "STOP_GROUP" in (stop.detail or "")


async def test_execute_tasks_added_while_running_leave_status_when_done_and_free_their_name() -> None:
    m, events = manager()
    outcome = Outcome()
    async with anyio.create_task_group() as tg:
        tg.start_soon(run_capturing, m, outcome)
        await events.running()
        handle = m.add_execute_task("req", returns, TaskType.ERROR)
        await handle.wait()
        assert [row.name for row in m.status()] == []
        second = m.add_execute_task("req", returns, TaskType.ERROR)
        await second.wait()
        m.shutdown()
    assert await outcome.finished() is None


async def test_handle_cancel_stops_one_execute_task_without_error_even_strict() -> None:
    m, events = manager()
    outcome = Outcome()
    async with anyio.create_task_group() as tg:
        tg.start_soon(run_capturing, m, outcome)
        await events.running()
        other = m.add_execute_task("other", anyio.sleep_forever)
        handle = m.add_execute_task("victim", anyio.sleep_forever)
        await events.wait(EventKind.TASK_EXECUTING, "victim")
        handle.cancel()
        await handle.wait()
        assert handle.done
        assert not other.done
        assert m.state is ManagerState.RUNNING
        handle.cancel()  # no-op once ended
        m.shutdown()
    assert await outcome.finished() is None
    assert events.kinds("victim") == ["task_executing", "task_cancelled"]


async def test_handle_cancel_before_start_means_it_never_starts() -> None:
    ran: list[str] = []

    async def work() -> None:
        ran.append("ran")

    m = TaskManager()
    handle = m.add_execute_task("queued", work)
    handle.cancel()
    m.add_execute_task("stop", returns, TaskType.STOP_GROUP)
    await m.run()
    assert ran == []
    assert handle.done
    assert "cancelled" in repr(handle)
    assert next(r for r in m.status() if r.name == "queued").state == "cancelled"


async def test_cancelling_the_last_stop_group_member_stops_the_manager() -> None:
    m, events = manager()
    outcome = Outcome()
    async with anyio.create_task_group() as tg:
        tg.start_soon(run_capturing, m, outcome)
        await events.running()
        handle = m.add_execute_task("job", anyio.sleep_forever, TaskType.STOP_GROUP)
        await events.wait(EventKind.TASK_EXECUTING, "job")
        handle.cancel()
    assert await outcome.finished() is None
    assert m.state is ManagerState.STOPPED


async def test_calls_from_a_foreign_thread_are_refused_with_a_pointer_to_the_portal() -> None:
    m, events = manager()
    outcome = Outcome()
    errors: list[BaseException] = []

    def from_thread() -> None:
        for call in (lambda: m.add_execute_task("x", returns), m.shutdown):
            try:
                call()
            except RuntimeError as exc:
                errors.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(run_capturing, m, outcome)
        await events.running()
        await anyio.to_thread.run_sync(from_thread)
        assert m.state is ManagerState.RUNNING
        m.shutdown()
    assert await outcome.finished() is None
    assert len(errors) == 2
    assert all("anyio.from_thread.run_sync" in str(e) for e in errors)
    assert threading.current_thread() is threading.main_thread()


async def test_fallback_without_task_handles_uses_a_scope_per_execute_task(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # anyio < 4.14 has no TaskHandle: the manager then wraps each execute task in its own cancel scope.
    import lifecycle._core._manager as manager_module

    monkeypatch.setattr(manager_module, "_OWN_SCOPE", True)
    events = Events()
    m = TaskManager(on_event=events)
    outcome = Outcome()
    async with anyio.create_task_group() as tg:
        tg.start_soon(run_capturing, m, outcome)
        await events.running()
        handle = m.add_execute_task("victim", anyio.sleep_forever)
        await events.wait(EventKind.TASK_EXECUTING, "victim")
        handle.cancel()
        await handle.wait()
        assert m.state is ManagerState.RUNNING
        returned = m.add_execute_task("strict", returns)  # STRICT returning early is still an error
        await returned.wait()
    error = await outcome.finished()
    assert error is not None
    assert [e.task_name for e in task_errors(error)] == ["strict"]
    assert events.kinds("victim")[-1] == "task_cancelled"
