"""`lifecycle.__all__` is exactly the documented public API (docs/lifecycle.md, "Public API")."""

from __future__ import annotations

import inspect
import re
import sys
from pathlib import Path

import lifecycle

if sys.version_info >= (3, 11):
    from builtins import ExceptionGroup
else:  # pragma: no cover
    from exceptiongroup import ExceptionGroup

DOCUMENTED = (
    "Backoff",
    "EventKind",
    "ExecuteHandle",
    "ExecuteTask",
    "Health",
    "LifecycleEvent",
    "ManagerState",
    "Metrics",
    "Restart",
    "Stage",
    "Task",
    "TaskError",
    "TaskHealth",
    "TaskManager",
    "TaskManagerError",
    "TaskStatus",
    "TaskType",
    "UnexpectedStopError",
    "__version__",
    "run",
)


def test_all_is_exactly_the_documented_api() -> None:
    assert isinstance(lifecycle.__all__, tuple)
    assert lifecycle.__all__ == DOCUMENTED


def test_every_name_in_all_is_importable_and_documented() -> None:
    for name in lifecycle.__all__:
        value = getattr(lifecycle, name)
        if name != "__version__":
            assert inspect.getdoc(value), f"lifecycle.{name} has no docstring"


def test_the_docs_list_the_same_api() -> None:
    docs = Path(__file__).parent.parent / "docs" / "lifecycle.md"
    section = docs.read_text().split("## Public API", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"^\| `([A-Za-z_]+)`", section, flags=re.MULTILINE))
    assert listed == set(DOCUMENTED) - {"__version__"}


def test_the_issue_signatures_are_kept() -> None:
    init = inspect.signature(lifecycle.TaskManager)
    assert list(init.parameters) == [
        "name",
        "initialize_timeout",
        "cleanup_timeout",
        "shutdown_timeout",
        "on_event",
        "drain_delay",
    ]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in init.parameters.values())
    add_task = inspect.signature(lifecycle.TaskManager.add_task)
    assert list(add_task.parameters) == [
        "self",
        "name",
        "task",
        "task_type",
        "initialize_timeout",
        "cleanup_timeout",
        "restart",
    ]
    assert add_task.parameters["initialize_timeout"].default is ...
    add_execute = inspect.signature(lifecycle.TaskManager.add_execute_task)
    assert list(add_execute.parameters) == ["self", "name", "task", "task_type", "restart"]
    run = inspect.signature(lifecycle.run)
    assert list(run.parameters) == ["manager", "backend"]
    assert run.parameters["backend"].default == "asyncio"
    assert [s.value for s in lifecycle.Stage] == ["initialize", "execute", "cleanup"]
    assert issubclass(lifecycle.TaskManagerError, ExceptionGroup)
