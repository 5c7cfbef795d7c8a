"""Load ``package.module:attr`` targets for the CLI, with errors that say what is wrong and what to do."""

from __future__ import annotations

import importlib
import os
import sys
from types import ModuleType

from .._core._manager import TaskManager
from .._redact import redact

__all__ = ["LoadError", "a_or_an", "load_manager", "load_object"]


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


def load_object(spec: str) -> object:
    """Import ``MODULE`` and return its attribute ``ATTR`` (dotted paths like ``app:services.main`` work).

    Raises :class:`LoadError` for a malformed spec, a module that cannot be imported (with the import
    error as ``__cause__``) or a missing attribute.
    """
    module_name, colon, attr = spec.partition(":")
    if not colon or not module_name or not attr:
        raise LoadError(
            f"{spec!r} is not a MODULE:ATTR target; write it like 'myservice.main:manager' "
            "(a module path, a colon, and the name of a TaskManager or of a function returning one)"
        )
    value: object = _import(module_name, spec)
    walked = module_name
    for part in attr.split("."):
        try:
            value = getattr(value, part)
        except AttributeError:
            hint = _candidates(value) if walked == module_name else ""
            raise LoadError(f"cannot load {spec!r}: {walked!r} has no attribute {part!r}{hint}") from None
        walked = f"{walked}.{part}"
    return value


def load_manager(spec: str) -> TaskManager:
    """Load a :class:`~lifecycle.TaskManager` from ``spec``: the attribute itself, or the result of calling
    it with no arguments. Raises :class:`LoadError` when it is neither."""
    value = load_object(spec)
    if isinstance(value, TaskManager):
        return value
    if not callable(value):
        raise LoadError(
            f"cannot run {spec!r}: it is {a_or_an(type(value).__name__)}, not a lifecycle.TaskManager or a "
            "zero-argument function returning one"
        )
    try:
        result = value()
    except Exception as exc:
        raise LoadError(
            f"cannot run {spec!r}: calling it raised {type(exc).__name__}: {redact(str(exc))}"
        ) from exc
    if not isinstance(result, TaskManager):
        raise LoadError(
            f"cannot run {spec!r}: calling it returned {a_or_an(type(result).__name__)}, expected a "
            "lifecycle.TaskManager"
        )
    return result


def _candidates(module: object) -> str:
    names = sorted(name for name, value in vars(module).items() if isinstance(value, TaskManager))
    if not names:
        return ""
    return "; TaskManagers found there: " + ", ".join(names)
