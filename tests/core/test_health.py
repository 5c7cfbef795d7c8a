"""manager.health(): ready once every task executes; live until something failed for good or got stuck."""

from __future__ import annotations

import anyio
import pytest

import lifecycle
from lifecycle import EventKind, Health, LifecycleEvent, ManagerState, Stage, TaskHealth
from tests.core.lifecycle_testkit import Events, FakeTask, Outcome, manager, raises, run_capturing


async def test_ready_only_when_every_task_is_initialized_and_every_execute_has_started() -> None:
    seen: list[tuple[str, bool]] = []
    events = Events()
    m: lifecycle.TaskManager

    def record(event: LifecycleEvent) -> None:
        events(event)
        if event.kind in (EventKind.STATE_CHANGED, EventKind.TASK_EXECUTING, EventKind.READY):
            label = event.state.value if event.state is not None else f"{event.task_name}:{event.kind.value}"
            seen.append((label, m.health().ready))

    m = lifecycle.TaskManager(on_event=record)
    assert m.health() == Health("lifecycle", ManagerState.NEW, False, True, False, ())
    m.add_task("db", FakeTask("db", []))
    m.add_execute_task("a", anyio.sleep_forever)
    m.add_execute_task("b", anyio.sleep_forever)
    outcome = Outcome()
    async with anyio.create_task_group() as tg:
        tg.start_soon(run_capturing, m, outcome)
        await events.wait(EventKind.READY)
        health = m.health()
        assert (health.ready, health.live, health.draining, health.state) == (
            True,
            True,
            False,
            ManagerState.RUNNING,
        )
        assert [(t.name, t.kind, t.stage, t.state, t.live) for t in health.tasks] == [
            ("db", "task", Stage.EXECUTE, "running", True),
            ("a", "execute", Stage.EXECUTE, "running", True),
            ("b", "execute", Stage.EXECUTE, "running", True),
        ]
        m.shutdown()
    assert await outcome.finished() is None
    labels = [label for label, _ in seen]
    assert labels[:2] == ["initializing", "running"]
    assert sorted(labels[2:5]) == ["a:task_executing", "b:task_executing", "db:task_executing"]
    assert labels[5] == "None:ready"
    assert [ready for _, ready in seen[:5]] == [False] * 5  # not ready until the last execute started
    assert seen[5][1] is True
    final = m.health()
    assert (final.ready, final.live, final.draining, final.state) == (
        False,
        False,
        False,
        ManagerState.STOPPED,
    )


async def test_an_empty_manager_is_ready_as_soon_as_it_runs() -> None:
    m, events = manager()
    outcome = Outcome()
    async with anyio.create_task_group() as tg:
        tg.start_soon(run_capturing, m, outcome)
        await events.wait(EventKind.READY)
        assert m.health().ready
        m.shutdown()
        assert not m.health().ready
        assert m.health().draining
    assert await outcome.finished() is None


async def test_a_task_that_failed_for_good_makes_the_manager_not_live_while_it_stops() -> None:
    cleaning = anyio.Event()
    release = anyio.Event()

    async def slow_cleanup() -> None:
        cleaning.set()
        await release.wait()

    m, _ = manager()
    m.add_task("db", FakeTask("db", [], cleanup=slow_cleanup))
    m.add_execute_task("broken", raises("boom"))
    outcome = Outcome()
    async with anyio.create_task_group() as tg:
        tg.start_soon(run_capturing, m, outcome)
        with anyio.fail_after(10):
            await cleaning.wait()
        health = m.health()
        assert not health.live
        assert not health.ready
        assert health.draining
        assert {t.name: t.live for t in health.tasks} == {"db": True, "broken": False}
        release.set()
    assert isinstance(await outcome.finished(), lifecycle.TaskManagerError)


async def test_a_shutdown_stuck_past_its_timeout_is_not_live() -> None:
    release = anyio.Event()

    async def ignores_cancellation() -> None:
        with anyio.CancelScope(shield=True):
            await release.wait()

    m, events = manager(shutdown_timeout=0.05)
    m.add_execute_task("stubborn", ignores_cancellation)
    outcome = Outcome()
    async with anyio.create_task_group() as tg:
        tg.start_soon(run_capturing, m, outcome)
        await events.wait(EventKind.READY)
        m.shutdown()
        assert m.health().live  # shutting down is not a liveness problem ...
        await events.wait(EventKind.SHUTDOWN_STUCK)
        assert not m.health().live  # ... being stuck in it is
        release.set()
    assert isinstance(await outcome.finished(), lifecycle.TaskManagerError)


def test_health_serialises_to_json_ready_data() -> None:
    health = Health(
        "svc",
        ManagerState.RUNNING,
        False,
        True,
        False,
        (TaskHealth("db", "task", Stage.INITIALIZE, "running", True, 2, True),),
    )
    assert health.to_dict() == {
        "manager": "svc",
        "state": "running",
        "ready": False,
        "live": True,
        "draining": False,
        "tasks": [
            {
                "name": "db",
                "kind": "task",
                "stage": "initialize",
                "state": "running",
                "live": True,
                "restarts": 2,
                "restarting": True,
                "added_while_running": False,
            }
        ],
    }


async def test_status_rows_serialise_with_errors_as_text() -> None:
    m, _ = manager()
    m.add_execute_task("broken", raises("it broke"))
    with pytest.raises(lifecycle.TaskManagerError):
        await m.run()
    [row] = m.status()
    data = row.to_dict()
    assert data["error"] == "Boom: it broke"
    assert data["last_error"] == "Boom: it broke"
    assert (data["task_type"], data["stage"], data["state"], data["restarts"]) == (
        "strict",
        "execute",
        "failed",
        0,
    )
    assert isinstance(data["duration"], float)
