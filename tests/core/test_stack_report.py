"""TaskManager.stack_report(): where every task stage and every task of the event loop waits, while the
service runs (asyncio and trio); lifecycle.run's dump_stacks_on is checked before anything starts."""

from __future__ import annotations

import signal
import threading

import anyio
import pytest

import lifecycle

WAIT = 10.0


async def waiting_for_orders(ready: anyio.Event) -> None:
    ready.set()
    await anyio.sleep_forever()


async def test_the_report_shows_each_stage_and_every_loop_task_with_its_await_stack() -> None:
    manager = lifecycle.TaskManager(name="shop")
    ready = anyio.Event()
    helper_ready = anyio.Event()
    reports: list[str] = []

    async def orders() -> None:
        await waiting_for_orders(ready)

    async def report() -> None:
        await ready.wait()
        async with anyio.create_task_group() as group:  # a task of the loop that is not a manager stage

            async def helper_waiting_on_a_socket() -> None:
                helper_ready.set()
                await anyio.sleep_forever()

            group.start_soon(helper_waiting_on_a_socket, name="socket-reader")
            await helper_ready.wait()
            reports.append(manager.stack_report())
            group.cancel_scope.cancel()
        manager.shutdown()

    manager.add_execute_task("orders", orders)
    manager.add_execute_task("reporter", report, lifecycle.TaskType.ERROR)
    with anyio.fail_after(WAIT):
        await manager.run()
    [text] = reports
    lines = text.splitlines()
    assert lines[0] == "shop: stack report: 2 task stage(s) running"
    assert any(line.startswith("  task 'orders' (STRICT) still in execute after") for line in lines)
    assert any(line.endswith("in waiting_for_orders") and __file__ in line for line in lines)
    assert any(line.startswith("  every task of the event loop (") for line in lines)
    assert "  socket-reader:" in lines
    assert any(line.endswith("in helper_waiting_on_a_socket") for line in lines)


async def test_the_report_masks_passwords() -> None:
    manager = lifecycle.TaskManager(name="shop")
    reports: list[str] = []

    async def report() -> None:
        reports.append(manager.stack_report("connected to postgresql://app:hunter2@db/shop"))
        manager.shutdown()

    manager.add_execute_task("reporter", report, lifecycle.TaskType.ERROR)
    with anyio.fail_after(WAIT):
        await manager.run()
    assert "hunter2" not in reports[0]
    assert "postgresql://app:***@db/shop" in reports[0]


async def test_the_report_is_refused_from_another_thread() -> None:
    manager = lifecycle.TaskManager(name="shop")
    errors: list[BaseException] = []

    async def report_from_a_thread() -> None:
        def call() -> None:
            try:
                manager.stack_report()
            except RuntimeError as exc:
                errors.append(exc)

        thread = threading.Thread(target=call)
        thread.start()
        await anyio.to_thread.run_sync(thread.join)
        manager.shutdown()

    manager.add_execute_task("reporter", report_from_a_thread, lifecycle.TaskType.ERROR)
    with anyio.fail_after(WAIT):
        await manager.run()
    [error] = errors
    assert "stack_report() was called from a thread that is not running task manager 'shop'" in str(error)


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ("SIGTERM", "SIGTERM cannot dump stacks"),
        (signal.SIGINT, "SIGINT cannot dump stacks"),
        ("SIGKILL", "SIGKILL cannot dump stacks"),
        ("SIGNOPE", "not a signal of this platform"),
        (10, "not a signal of this platform"),
    ],
)
def test_run_refuses_a_dump_signal_it_cannot_use(value: object, match: str) -> None:
    manager = lifecycle.TaskManager(name="shop")
    with pytest.raises(ValueError, match=match):
        lifecycle.run(manager, dump_stacks_on=value)  # type: ignore[arg-type]
    assert manager.state is lifecycle.ManagerState.NEW, "nothing started"
