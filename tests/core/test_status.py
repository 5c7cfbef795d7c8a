"""The state property and status() rows: kind, type, stage / end state, times and error."""

from __future__ import annotations

import time

import anyio
import pytest

from lifecycle import (
    EventKind,
    ManagerState,
    Stage,
    TaskManagerError,
    TaskStatus,
    TaskType,
    UnexpectedStopError,
)
from tests.core.lifecycle_testkit import FakeTask, Outcome, manager, raises, returns, run_capturing

pytestmark = pytest.mark.anyio


async def test_status_rows_while_running_and_after_stopping() -> None:
    m, events = manager()
    before = time.time()
    m.add_task("db", FakeTask("db", []))
    m.add_execute_task("worker", anyio.sleep_forever, TaskType.ERROR)
    m.add_execute_task("done", returns, TaskType.ERROR)
    [pending, *_] = m.status()
    assert (pending.stage, pending.state, pending.started_at, pending.ended_at) == (
        None,
        "pending",
        None,
        None,
    )

    outcome = Outcome()
    async with anyio.create_task_group() as tg:
        tg.start_soon(run_capturing, m, outcome)
        await events.wait(EventKind.TASK_RETURNED, "done")
        assert m.state is ManagerState.RUNNING
        rows = {row.name: row for row in m.status()}
        assert rows["db"] == TaskStatus(
            "db", "task", TaskType.STRICT, Stage.EXECUTE, "running", rows["db"].started_at, None, None
        )
        assert rows["worker"].kind == "execute"
        assert rows["worker"].state == "running"
        assert rows["done"].state == "done"
        assert rows["done"].ended_at is not None
        m.shutdown()
    assert await outcome.finished() is None
    after = time.time()
    rows = {row.name: row for row in m.status()}
    assert list(rows) == ["db", "worker", "done"]  # add order
    assert (rows["db"].stage, rows["db"].state) == (Stage.CLEANUP, "done")
    assert (rows["worker"].stage, rows["worker"].state) == (Stage.EXECUTE, "cancelled")
    for row in rows.values():
        assert row.started_at is not None
        assert row.ended_at is not None
        assert before <= row.started_at <= row.ended_at <= after
        assert row.duration is not None
        assert row.duration >= 0
        assert row.error is None


async def test_failed_rows_carry_their_error() -> None:
    m, _ = manager()
    m.add_task("db", FakeTask("db", [], cleanup=raises("close failed")))
    m.add_execute_task("strict", returns)
    with pytest.raises(TaskManagerError) as caught:
        await m.run()
    rows = {row.name: row for row in m.status()}
    assert rows["strict"].state == "failed"
    assert isinstance(rows["strict"].error.__cause__, UnexpectedStopError)  # type: ignore[union-attr]
    assert (rows["db"].stage, rows["db"].state) == (Stage.CLEANUP, "failed")
    assert rows["db"].error is caught.value.exceptions[1]


def test_duration_is_none_until_ended() -> None:
    row = TaskStatus("x", "execute", TaskType.ERROR, Stage.EXECUTE, "running", 1.0, None, None)
    assert row.duration is None
    assert TaskStatus("x", "execute", TaskType.ERROR, None, "pending", None, None, None).duration is None
