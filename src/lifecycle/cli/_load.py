"""The one loader of ``MODULE:ATTR`` targets, for every command that takes one (``run``, ``worker``,
``tasks --app``), with errors that say what is wrong and what to do.

A target is the object itself (a ``TaskManager``, an ``AsyncTasks``) or a zero-argument callable returning
one. Every message starts ``cannot load 'MODULE:ATTR': `` and names what was found instead.
"""

from __future__ import annotations

import importlib
import os
import sys
from types import ModuleType
from typing import TYPE_CHECKING, TypeVar

from rich.console import Console
from rich.text import Text
from rich.traceback import Traceback

from .._core._manager import TaskManager
from .._redact import redact

if TYPE_CHECKING:
    from ..asynctask import AsyncTasks

__all__ = ["LoadError", "a_or_an", "load_async_tasks", "load_manager", "load_object", "print_load_error"]

_T = TypeVar("_T")


def a_or_an(word: str) -> str:
    """``word`` with its indefinite article, for type names in messages: ``"an int"``, ``"a str"``."""
    return f"{'an' if word[:1].lower() in 'aeiou' else 'a'} {word}"


class LoadError(Exception):
    """A ``MODULE:ATTR`` target could not be loaded; the message says why, ``__cause__`` holds any error."""


def _import(module_name: str, spec: str) -> ModuleType:
    # Like `python -m`, find modules in the current directory first (console scripts do not add it).
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if missing == module_name or module_name.startswith(missing + "."):
            raise LoadError(
                f"cannot load {spec!r}: there is no module named {missing!r}. Check the spelling, install "
                f"the package, or run lifecycle from the directory that contains it"
            ) from None
        raise LoadError(
            f"cannot load {spec!r}: importing {module_name!r} failed: {redact(str(exc))}"
        ) from exc
    except Exception as exc:
        raise LoadError(
            f"cannot load {spec!r}: importing {module_name!r} raised {type(exc).__name__}: {redact(str(exc))}"
        ) from exc


def load_object(spec: str, *, looking_for: type | None = None, label: str = "") -> object:
    """Import ``MODULE`` and return its attribute ``ATTR`` (dotted paths like ``app:services.main`` work).

    With ``looking_for`` (and its plural ``label``), a missing attribute's message lists the module's
    objects of that type. Raises :class:`LoadError` for a malformed spec, a module that cannot be imported
    (with the import error as ``__cause__``) or a missing attribute.
    """
    module_name, colon, attr = spec.partition(":")
    if not colon or not module_name or not attr:
        raise LoadError(
            f"{spec!r} is not a MODULE:ATTR target; write it like 'myservice.main:manager' "
            "(a module path, a colon, and the name of an object or of a function returning one)"
        )
    value: object = _import(module_name, spec)
    walked = module_name
    for part in attr.split("."):
        try:
            value = getattr(value, part)
        except AttributeError:
            hint = _candidates(value, looking_for, label) if walked == module_name else ""
            raise LoadError(f"cannot load {spec!r}: {walked!r} has no attribute {part!r}{hint}") from None
        walked = f"{walked}.{part}"
    return value


def _load(spec: str, expected: type[_T], name: str, label: str) -> _T:
    """The ``expected`` object at ``spec``: the attribute itself, or what calling it with no arguments
    returns. ``name`` is how messages call the type (``lifecycle.TaskManager``)."""
    value = load_object(spec, looking_for=expected, label=label)
    if isinstance(value, expected):
        return value
    if not callable(value):
        raise LoadError(
            f"cannot load {spec!r}: it is {a_or_an(type(value).__name__)}, not {a_or_an(name)} or a "
            "zero-argument function returning one"
        )
    try:
        result = value()
    except Exception as exc:
        raise LoadError(
            f"cannot load {spec!r}: calling it raised {type(exc).__name__}: {redact(str(exc))}"
        ) from exc
    if not isinstance(result, expected):
        raise LoadError(
            f"cannot load {spec!r}: calling it returned {a_or_an(type(result).__name__)}, expected "
            f"{a_or_an(name)}"
        )
    return result


def load_manager(spec: str) -> TaskManager:
    """The :class:`~lifecycle.TaskManager` at ``spec`` (``lifecycle run``). Raises :class:`LoadError`."""
    return _load(spec, TaskManager, "lifecycle.TaskManager", "TaskManagers")


def load_async_tasks(spec: str) -> AsyncTasks:
    """The ``AsyncTasks`` at ``spec`` (``lifecycle worker``, ``lifecycle tasks --app``). Raises
    :class:`LoadError`."""
    from ..asynctask import AsyncTasks

    return _load(spec, AsyncTasks, "lifecycle.asynctask.AsyncTasks", "AsyncTasks")


def _candidates(module: object, looking_for: type | None, label: str) -> str:
    if looking_for is None:
        return ""
    names = sorted(name for name, value in vars(module).items() if isinstance(value, looking_for))
    if not names:
        return ""
    return f"; {label} found there: " + ", ".join(names)


def print_load_error(console: Console, error: LoadError) -> None:
    """Print why a ``MODULE:ATTR`` target could not be loaded, with the underlying traceback if any."""
    console.print(Text.assemble(("error: ", "bold red"), str(error)), soft_wrap=True)
    cause = error.__cause__
    if cause is not None and cause.__traceback__ is not None:
        console.print(Traceback.from_exception(type(cause), cause, cause.__traceback__))
