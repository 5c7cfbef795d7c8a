"""`lifecycle.tasks` exposes exactly the documented provided tasks, each documented."""

from __future__ import annotations

import inspect

import lifecycle.tasks

DOCUMENTED = ("HealthServer", "Interruptible", "ProcessExitedError", "Repeat", "Subprocess", "Timer")


def test_all_is_exactly_the_documented_api() -> None:
    assert isinstance(lifecycle.tasks.__all__, tuple)
    assert sorted(lifecycle.tasks.__all__) == sorted(DOCUMENTED)
    for name in DOCUMENTED:
        assert getattr(lifecycle.tasks, name).__module__.startswith("lifecycle.tasks.")


def test_every_public_object_and_method_has_a_docstring() -> None:
    for name in DOCUMENTED:
        cls = getattr(lifecycle.tasks, name)
        assert inspect.getdoc(cls), name
        for attribute, value in vars(cls).items():
            if attribute.startswith("_"):
                continue
            if callable(value) or isinstance(value, property):
                assert inspect.getdoc(value), f"{name}.{attribute}"
