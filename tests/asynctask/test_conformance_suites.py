"""The shape of the public conformance suites: each rule set is a whole class of one topic, none re-declares
what another declares (the suite class would silently keep only one of them), and no rule waits on a sleep."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import lifecycle.asynctask.testing
from lifecycle.asynctask.testing import BackendConformance, EngineConformance

SUITE_ROOT = Path(lifecycle.asynctask.testing.__file__).parent


@pytest.mark.parametrize("suite", [BackendConformance, EngineConformance])
def test_no_rule_set_redeclares_what_another_declares(suite: type) -> None:
    declared: dict[str, list[str]] = {}
    for cls in suite.__mro__[1:]:
        if cls is object:
            continue
        for name in vars(cls):
            if not (name.startswith("__") and name.endswith("__")):
                declared.setdefault(name, []).append(cls.__qualname__)
    twice = {name: owners for name, owners in declared.items() if len(owners) > 1}
    assert not twice, f"declared by more than one part of {suite.__name__}: {twice}"
    rule_sets = list(suite.__mro__[1:-2])  # between the suite and the shared base (and object)
    assert len(rule_sets) >= 4, [cls.__name__ for cls in suite.__mro__]
    for rule_set in rule_sets:
        tests = [name for name in vars(rule_set) if name.startswith("test_")]
        assert tests, f"{rule_set.__qualname__} holds no rule"


def sleeps_in(path: Path) -> list[str]:
    """The ``anyio.sleep(...)`` / ``time.sleep(...)`` / ``asyncio.sleep(...)`` calls in a source file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "sleep"
            and isinstance(node.func.value, ast.Name)
        ):
            found.append(f"{path.relative_to(SUITE_ROOT)}:{node.lineno} {node.func.value.id}.sleep")
    return found


def test_no_rule_waits_on_a_sleep() -> None:
    # The one poll step is the harness's `eventually`, which checks a condition each time, bounded by WAIT.
    found = [entry for path in sorted(SUITE_ROOT.rglob("*.py")) for entry in sleeps_in(path)]
    assert len(found) == 1, found
    assert found[0].startswith("engine/_harness.py:"), found
