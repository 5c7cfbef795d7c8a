"""TaskError, UnexpectedStopError and TaskManagerError: shapes, messages, except*, pickling."""

from __future__ import annotations

import pickle
import sys

import pytest

from lifecycle import Stage, TaskError, TaskManager, TaskManagerError, TaskType, UnexpectedStopError

if sys.version_info >= (3, 11):
    from builtins import ExceptionGroup
else:  # pragma: no cover
    from exceptiongroup import ExceptionGroup

pytestmark = pytest.mark.anyio


def make_group() -> TaskManagerError:
    errors = [
        TaskError("db", Stage.INITIALIZE, TaskType.STRICT, ConnectionError("refused")),
        TaskError("cache", Stage.CLEANUP, TaskType.ERROR, TimeoutError("slow")),
    ]
    return TaskManagerError("task manager 'svc': 2 task errors", errors)


def test_task_error_carries_name_stage_type_and_cause() -> None:
    cause = ConnectionError("refused")
    error = TaskError("db", Stage.INITIALIZE, TaskType.STRICT, cause)
    assert (error.task_name, error.stage, error.task_type, error.__cause__) == (
        "db",
        Stage.INITIALIZE,
        TaskType.STRICT,
        cause,
    )
    assert str(error) == "task 'db' (STRICT) failed in initialize: ConnectionError: refused"
    assert str(TaskError("x", Stage.EXECUTE, TaskType.ERROR)) == "task 'x' (ERROR) failed in execute"


def test_task_error_survives_pickling() -> None:
    error = TaskError("db", Stage.CLEANUP, TaskType.STOP_GROUP, ValueError("bad"))
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.task_name, copy.stage, copy.task_type) == ("db", Stage.CLEANUP, TaskType.STOP_GROUP)
    assert isinstance(copy.__cause__, ValueError)


def test_task_manager_error_is_an_exception_group_of_task_errors() -> None:
    group = make_group()
    assert isinstance(group, ExceptionGroup)
    assert [e.task_name for e in group.errors] == ["db", "cache"]
    assert group.message == "task manager 'svc': 2 task errors"


def test_except_star_and_split_keep_the_type() -> None:
    group = make_group()
    initialize_errors, rest = group.split(lambda e: isinstance(e, TaskError) and e.stage is Stage.INITIALIZE)
    assert isinstance(initialize_errors, TaskManagerError)
    assert isinstance(rest, TaskManagerError)
    assert [e.task_name for e in initialize_errors.errors] == ["db"]
    # What `except* TaskError` relies on (written without except* so the module still imports on 3.10).
    matched = group.subgroup(TaskError)
    assert isinstance(matched, TaskManagerError)
    assert len(matched.exceptions) == 2


def test_unexpected_stop_error_is_a_plain_exception_with_a_message() -> None:
    assert str(UnexpectedStopError("exited with code 3")) == "exited with code 3"


async def test_run_raises_a_message_naming_each_failed_task_and_stage() -> None:
    m = TaskManager(name="svc")

    async def fails() -> None:
        raise OSError("disk")

    m.add_execute_task("writer", fails)
    with pytest.raises(TaskManagerError) as caught:
        await m.run()
    assert caught.value.message == "task manager 'svc': 1 task error: writer in execute (OSError)"
