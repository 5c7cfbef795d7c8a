"""`lifecycle.__all__` is exactly the documented public API (docs/lifecycle.md, "Public API"): each name has a
docstring of its own, reports ``lifecycle`` as its module, and no user-facing text names a private module."""

from __future__ import annotations

import inspect
import pickle
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

import lifecycle
from tests.docstring_check import missing_docstrings

if sys.version_info >= (3, 11):
    from builtins import ExceptionGroup
else:  # pragma: no cover
    from exceptiongroup import ExceptionGroup

DOCUMENTED = (
    "AsyncTasksMetrics",
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


def test_every_public_object_and_method_has_a_docstring_of_its_own() -> None:
    names = tuple(name for name in lifecycle.__all__ if name != "__version__")
    assert missing_docstrings(lifecycle, names) == []


class _DocumentedBase:
    """Documented."""

    def method(self) -> None:
        """Documented."""


class _UndocumentedChild(_DocumentedBase):
    def method(self) -> None:
        pass


def test_the_docstring_check_sees_a_missing_docstring_behind_an_inherited_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # What the old check (inspect.getdoc) saw: the inherited text.
    assert inspect.getdoc(_UndocumentedChild) == "Documented."
    assert inspect.getdoc(_UndocumentedChild.method) == "Documented."
    for cls in (_DocumentedBase, _UndocumentedChild):
        monkeypatch.setattr(cls, "__module__", "lifecycle.fake")
    namespace = SimpleNamespace(__name__="lifecycle.fake", Child=_UndocumentedChild)
    missing = missing_docstrings(namespace, ("Child",))
    assert missing == ["lifecycle.fake.Child", "lifecycle.fake.Child.method"]


def test_every_public_object_reports_the_public_module() -> None:
    for name in lifecycle.__all__:
        value = getattr(lifecycle, name)
        if name != "__version__":
            assert value.__module__ == "lifecycle", name
    assert repr(lifecycle.TaskManager) == "<class 'lifecycle.TaskManager'>"


def test_task_errors_pickle_under_their_public_names() -> None:
    cause = ValueError("disk full")
    error = lifecycle.TaskError("db", lifecycle.Stage.EXECUTE, lifecycle.TaskType.STRICT, cause, 2, "note")
    group = lifecycle.TaskManagerError("task manager 'svc': 1 task error", [error])
    data = pickle.dumps(group)
    assert b"_core" not in data
    assert b"lifecycle\x94\x8c\x10TaskManagerError" in data
    copy = pickle.loads(data)
    assert type(copy) is lifecycle.TaskManagerError
    [inner] = copy.exceptions
    assert type(inner) is lifecycle.TaskError
    assert (inner.task_name, inner.stage, inner.restarts) == ("db", error.stage, 2)
    assert inner.task_type is lifecycle.TaskType.STRICT
    assert str(inner) == str(error)
    assert repr(inner.__cause__) == repr(cause)


_ROOT = Path(__file__).parent.parent
_SOURCE = Path(lifecycle.__file__).parent
#: The one document about the private modules; every other one is read by users.
_ARCHITECTURE = _ROOT / "docs" / "architecture.md"
#: A private module by dotted name or by path (``lifecycle._metrics``, ``lifecycle/asynctask/_engine/``), or
#: a private module's file name on its own (``_observer.py``).
_PRIVATE = re.compile(r"lifecycle(?:[./]\w+)*[./]_[a-z]|(?<![\w./])_[a-z]\w*\.py\b")


def test_the_private_path_pattern_finds_what_it_must() -> None:
    for text in (
        "lifecycle._metrics.AsyncTasksMetrics",
        'File "/srv/venv/lib/python3.12/site-packages/lifecycle/asynctask/_engine/_runner.py", line 9',
        "see `lifecycle/_core/`",
        "lifecycle.asynctask._records",
        "`_observer.py`",
    ):
        assert _PRIVATE.search(text), text
    for text in (
        "lifecycle.asynctask.TaskInfo",
        "lifecycle.lifecycle_tasks",
        "lifecycle.__all__",
        "my_app.py",
    ):
        assert not _PRIVATE.search(text), text


@pytest.mark.parametrize(
    "path",
    [*sorted(p for p in _ROOT.glob("docs/*.md") if p != _ARCHITECTURE), _ROOT / "README.md"],
    ids=lambda path: path.name,
)
def test_no_user_facing_doc_names_a_private_module(path: Path) -> None:
    found = [match.group() for match in _PRIVATE.finditer(path.read_text())]
    assert found == [], f"{path.name} names private modules (name public ones instead): {found}"


def _architecture_tables() -> list[tuple[str, list[str]]]:
    """``(directory, entries)`` of each module table in docs/architecture.md: the directory named by the
    heading above the table (``lifecycle/_core/``), the backticked modules and packages of the table's first
    column, relative to it."""
    tables: list[tuple[str, list[str]]] = []
    directory: str | None = None
    for line in _ARCHITECTURE.read_text().splitlines():
        if line.startswith("#"):
            named = re.findall(r"`(lifecycle/[\w/]*)`", line)
            directory = named[-1] if named else None
            continue
        if directory is None or not line.startswith("| `"):
            continue
        first = line.split("|")[1]
        entries = re.findall(r"`([\w./]+(?:\.py|/))`", first)
        if not tables or tables[-1][0] != directory:
            tables.append((directory, []))
        tables[-1][1].extend(entries)
    return tables


def test_the_architecture_document_names_every_module_and_only_real_ones() -> None:
    tables = _architecture_tables()
    assert [directory for directory, _ in tables][:3] == [
        "lifecycle/",
        "lifecycle/_core/",
        "lifecycle/tasks/",
    ]
    named: set[Path] = set()
    for directory, entries in tables:
        base = _SOURCE.parent / directory
        assert base.is_dir(), f"docs/architecture.md has a table for {directory}, which does not exist"
        named.add(base)
        for entry in entries:
            path = base / entry
            exists = path.is_dir() if entry.endswith("/") else path.is_file()
            assert exists, f"docs/architecture.md names {directory}{entry}, which does not exist"
            named.add(path)
    packages = {init.parent for init in _SOURCE.rglob("__init__.py")}
    modules = {path for path in _SOURCE.rglob("*.py") if path.name != "__init__.py"}
    missing = sorted(str(path.relative_to(_SOURCE.parent)) for path in (packages | modules) - named)
    assert missing == [], f"docs/architecture.md does not mention: {missing}"


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
        "clock",
        "sleep",
        "rng",
        "loop_block_warning",
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
    assert list(run.parameters) == ["manager", "backend", "dump_stacks_on"]
    assert run.parameters["backend"].default == "asyncio"
    assert [s.value for s in lifecycle.Stage] == ["initialize", "execute", "cleanup"]
    assert issubclass(lifecycle.TaskManagerError, ExceptionGroup)
