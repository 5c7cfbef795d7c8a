"""The layers of ``lifecycle.asynctask``, read from the source (``TYPE_CHECKING`` imports included): no import
cycle; the engine never imports a backend; a backend imports only the storage contract, the package's bottom
modules and the other backend modules; the durable-task layer imports nothing above it (metrics, provided
tasks, CLI, rich)."""

from __future__ import annotations

import ast
from pathlib import Path

import lifecycle

ROOT = Path(lifecycle.__file__).parent
PACKAGE = "lifecycle.asynctask"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in ROOT.rglob("*.py")}


def imports_of(name: str) -> set[str]:
    """Every module ``name`` imports (a ``lifecycle`` module where one is named, else the top-level name)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                found.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in MODULES else target)
    return found


GRAPH = {name: imports_of(name) for name in MODULES if name.startswith(PACKAGE)}


def test_the_check_reads_the_package() -> None:
    assert f"{PACKAGE}._async_tasks" in GRAPH
    assert f"{PACKAGE}._engine._worker" in GRAPH[f"{PACKAGE}._async_tasks"]
    assert f"{PACKAGE}._records" in GRAPH[f"{PACKAGE}._backends.postgres._ops"], "from ... import _records"


def test_no_import_cycle_in_the_durable_task_package() -> None:
    internal = {name: {m for m in targets if m in GRAPH} for name, targets in GRAPH.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(name: str) -> None:
        state[name] = 1
        path.append(name)
        for target in sorted(internal[name]):
            if state.get(target) == 1:
                cycle = [*path[path.index(target) :], target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        path.pop()
        state[name] = 2

    for name in sorted(internal):
        if name not in state:
            visit(name)


def test_the_engine_never_imports_a_backend() -> None:
    for name, targets in GRAPH.items():
        if name.startswith(f"{PACKAGE}._engine"):
            assert not [t for t in targets if t.startswith(f"{PACKAGE}._backends")], name


def test_backends_import_only_the_storage_contract_and_the_bottom_modules() -> None:
    allowed = {
        f"{PACKAGE}._backend",
        f"{PACKAGE}._records",
        f"{PACKAGE}._errors",
        f"{PACKAGE}._extras",
        "lifecycle._compat",
        "lifecycle._checks",
        "lifecycle._redact",
    }
    for name, targets in GRAPH.items():
        if not name.startswith(f"{PACKAGE}._backends"):
            continue
        for target in targets:
            if target.startswith("lifecycle"):
                ok = target in allowed or target.startswith(f"{PACKAGE}._backends")
                assert ok, f"{name} imports {target}: move what it needs into the contract or _backends/"


def test_the_durable_task_layer_imports_nothing_above_it() -> None:
    above = ("lifecycle._metrics", "lifecycle._run", "lifecycle.tasks", "lifecycle.cli", "rich")
    for name, targets in GRAPH.items():
        for target in targets:
            assert target != "lifecycle", f"{name} imports the top-level package"
            assert not target.startswith(above), f"{name} imports {target}"
