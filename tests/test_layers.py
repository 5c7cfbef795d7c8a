"""No import cycle anywhere in ``lifecycle``, read from the source by grimp (import-linter's graph).

Imports under ``TYPE_CHECKING`` are left out: naming a type for the checker is how a cycle is broken, and
they do not run. The layers themselves (which package may import which) are import-linter's contracts in
pyproject.toml, checked by ``lint-imports`` in CI (.ci/run); this file checks what contracts cannot say:
that no two modules lean on each other, whatever their layer, and what ``import lifecycle`` loads at run
time."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping, Set

import grimp


def import_graph() -> dict[str, set[str]]:
    """Every ``lifecycle`` module and the ``lifecycle`` modules it imports at run time."""
    graph = grimp.build_graph("lifecycle", exclude_type_checking_imports=True)
    return {module: set(graph.find_modules_directly_imported_by(module)) for module in graph.modules}


def cycles(graph: Mapping[str, Set[str]]) -> list[list[str]]:
    """The strongly connected parts of ``graph`` that hold a cycle, each as a cycle through its first
    module (Tarjan's algorithm, iterative, then a shortest way back), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, targets = work[-1]
            target = next(targets, None)
            if target is not None:
                if target not in index:
                    index[target] = low[target] = len(index)
                    stack.append(target)
                    on_stack.add(target)
                    work.append((target, iter(sorted(graph.get(target, ())))))
                elif target in on_stack:
                    low[node] = min(low[node], index[target])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                part: set[str] = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    part.add(member)
                    if member == node:
                        break
                if len(part) > 1 or node in graph[node]:
                    found.append(_cycle_through(min(part), part, graph))
    return sorted(found)


def _cycle_through(start: str, part: Set[str], graph: Mapping[str, Set[str]]) -> list[str]:
    """A shortest import path from ``start`` back to itself inside one strongly connected ``part``."""
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following: list[str] = []
        for node in frontier:
            for target in sorted(graph[node] & part):
                if target == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [*reversed(path), start]
                if target not in previous:
                    previous[target] = node
                    following.append(target)
        frontier = following
    raise AssertionError(f"{start} is in no cycle of {sorted(part)}")  # pragma: no cover


def test_the_cycle_finder_finds_a_cycle_and_names_it() -> None:
    graph = {
        "a": {"b"},
        "b": {"c", "d"},
        "c": {"a"},
        "d": set(),
        "e": {"e"},
        "f": {"d"},
    }
    assert cycles(graph) == [["a", "b", "c", "a"], ["e", "e"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_is_read_from_the_source() -> None:
    graph = import_graph()
    assert "lifecycle._core._manager" in graph["lifecycle"]
    assert "lifecycle.asynctask._engine._worker" in graph["lifecycle.asynctask._async_tasks"]
    assert "lifecycle.asynctask._records" in graph["lifecycle.asynctask._backends.postgres._ops"]
    assert "lifecycle.cli._tasks._list" in graph["lifecycle.cli._tasks"]


def test_no_import_cycle_anywhere_in_lifecycle() -> None:
    found = cycles(import_graph())
    assert found == [], "import cycles (move the shared definition below both modules):\n" + "\n".join(
        " -> ".join(cycle) for cycle in found
    )


def test_importing_lifecycle_loads_neither_rich_nor_the_cli_nor_asynctask() -> None:
    heavy = ("rich", "lifecycle.cli", "lifecycle.asynctask")
    probe = f"import sys, lifecycle; print(sorted(m for m in {heavy!r} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
