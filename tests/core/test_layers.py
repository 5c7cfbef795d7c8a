"""The core's place in the house, checked on the source: ``lifecycle._core`` imports anyio, the standard
library and the bottom modules only (never rich, the CLI, the provided tasks or asynctask); the library
layer (``_run``, ``_console``, ``_metrics``) never imports the CLI; the core, the tasks and the CLI hold no
static import cycle; and ``import lifecycle`` loads neither rich nor the CLI nor asynctask."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import lifecycle

PACKAGE = Path(lifecycle.__file__).parent
#: What the core may import from the package besides itself.
CORE_MAY_IMPORT = {"lifecycle._compat", "lifecycle._checks", "lifecycle._redact"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> Iterator[str]:
    """Every module ``path`` imports (at the top or inside a function), as absolute names."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            yield target
            yield from (f"{target}.{alias.name}" for alias in node.names)


def modules(*packages: str) -> dict[str, Path]:
    found = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    return {name: path for name, path in found.items() if name.startswith(packages)}


def test_the_core_imports_only_anyio_the_standard_library_and_the_bottom_modules() -> None:
    core = modules("lifecycle._core")
    assert "lifecycle._core._manager" in core
    for name, path in core.items():
        for target in imports(path):
            top = target.partition(".")[0]
            if top == "lifecycle":
                allowed = target.startswith("lifecycle._core") or target in CORE_MAY_IMPORT
                allowed = allowed or target.rpartition(".")[0] in CORE_MAY_IMPORT  # from .. import name
                assert allowed, f"{name} imports {target}"
            else:
                assert top == "anyio" or top in sys.stdlib_module_names, f"{name} imports {target}"


def test_the_library_layer_never_imports_the_command_line() -> None:
    for name, path in modules("lifecycle._run", "lifecycle._console", "lifecycle._metrics").items():
        assert not [target for target in imports(path) if target.startswith("lifecycle.cli")], name


def test_no_import_cycle_in_the_core_the_tasks_and_the_cli() -> None:
    # asynctask is the other half of the house (its own check); edges into it are left out here.
    everything = modules("lifecycle").items()
    found = {name: path for name, path in everything if not name.startswith("lifecycle.asynctask")}
    graph = {
        name: {target for target in imports(path) if target in found and target != name}
        for name, path in found.items()
    }
    cycles: list[list[str]] = []

    def visit(name: str, trail: list[str]) -> None:
        for target in sorted(graph[name]):
            if target in trail:
                cycles.append([*trail[trail.index(target) :], target])
            elif target not in done:
                visit(target, [*trail, target])
        done.add(name)

    done: set[str] = set()
    for name in sorted(graph):
        if name not in done:
            visit(name, [name])
    assert cycles == []


def test_importing_lifecycle_loads_neither_rich_nor_the_cli_nor_asynctask() -> None:
    heavy = ("rich", "lifecycle.cli", "lifecycle.asynctask")
    probe = f"import sys, lifecycle; print(sorted(m for m in {heavy!r} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
