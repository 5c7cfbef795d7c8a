"""`lifecycle.tasks` exposes exactly the documented provided tasks, each documented and reporting its public
module."""

from __future__ import annotations

import pickle

import lifecycle.tasks
from tests.docstring_check import missing_docstrings

DOCUMENTED = (
    "ASGIServer",
    "HealthServer",
    "Interruptible",
    "ProcessExitedError",
    "Repeat",
    "Subprocess",
    "Timer",
)


def test_all_is_exactly_the_documented_api() -> None:
    assert isinstance(lifecycle.tasks.__all__, tuple)
    assert sorted(lifecycle.tasks.__all__) == sorted(DOCUMENTED)
    for name in DOCUMENTED:
        assert getattr(lifecycle.tasks, name).__module__ == "lifecycle.tasks"


def test_every_public_object_and_method_has_a_docstring_of_its_own() -> None:
    assert missing_docstrings(lifecycle.tasks, DOCUMENTED) == []


def test_a_process_error_pickles_under_its_public_name() -> None:
    error = lifecycle.tasks.ProcessExitedError("redis exited with code 1", 1, ["bye"])
    data = pickle.dumps(error)
    assert b"lifecycle.tasks\x94\x8c\x12ProcessExitedError" in data
    copy = pickle.loads(data)
    assert (type(copy), str(copy), copy.returncode, copy.output) == (type(error), str(error), 1, ("bye",))
