"""Which public objects lack a docstring of their OWN.

``inspect.getdoc`` falls back to inherited text (a method overriding a documented one, a class under a
documented base), and dataclasses and (on Python 3.10) enums get a generated ``__doc__``: none of that
counts here. A public object is a class or function; its public members are the functions, properties,
static and class methods defined by it or by any of its bases from this package (``lifecycle.*``).
"""

from __future__ import annotations

import inspect
from typing import Any

_GENERATED = {"An enumeration."}  # Enum's default docstring on Python 3.10


def _own_text(obj: Any) -> str:
    doc = vars(obj).get("__doc__") if isinstance(obj, type) else getattr(obj, "__doc__", None)
    if not isinstance(doc, str) or doc.strip() in _GENERATED:
        return ""
    if isinstance(obj, type) and doc.startswith(f"{obj.__name__}("):  # a dataclass's generated signature
        return ""
    return doc.strip()


def _members(cls: type) -> dict[str, Any]:
    """Public callables and properties defined by ``cls`` or by its bases from this package."""
    found: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        if not klass.__module__.startswith("lifecycle"):
            continue
        for name, value in vars(klass).items():
            if name.startswith("_"):
                continue
            if isinstance(value, (staticmethod, classmethod)):
                value = value.__func__
            if isinstance(value, property) or inspect.isfunction(value):
                found[name] = value
    return found


def missing_docstrings(namespace: Any, names: tuple[str, ...]) -> list[str]:
    """``module.name`` and ``module.name.member`` of every public object or member without its own text."""
    missing: list[str] = []
    for name in names:
        value = getattr(namespace, name)
        if not _own_text(value):
            missing.append(f"{namespace.__name__}.{name}")
        if isinstance(value, type):
            for member, attribute in _members(value).items():
                text = _own_text(attribute.fget if isinstance(attribute, property) else attribute)
                if not text:
                    missing.append(f"{namespace.__name__}.{name}.{member}")
    return missing
