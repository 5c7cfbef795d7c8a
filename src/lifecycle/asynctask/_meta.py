"""The engine's bookkeeping in :attr:`NewTask.meta`: a small JSON object with one section per feature
(``"chain"`` for chain steps, ``"schedule"`` for schedule fires, ``"trace"`` for the W3C trace context of
the enqueuer's span, ``"user"`` for the user's own string metadata: ``Call(..., meta={...})``, hooks'
:func:`~lifecycle.asynctask.with_meta`). Backends store it as opaque text."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

__all__ = [
    "USER",
    "add_sections",
    "check_user_meta",
    "engine_sections",
    "read_meta",
    "read_user_meta",
    "with_user_meta",
    "write_meta",
]

USER = "user"
"""The section holding the user's metadata (``{str: str}``), the only part of the meta users see."""


def read_meta(meta: str | None) -> dict[str, Any]:
    """The sections stored in ``meta`` (``{}`` for none); ``ValueError`` when it is not a JSON object."""
    if not meta:
        return {}
    try:
        value = json.loads(meta)
    except Exception as exc:  # also RecursionError for absurd nesting, TypeError for a non-string
        raise ValueError(f"the task's meta is not JSON ({type(exc).__name__}: {exc})") from None
    if not isinstance(value, dict):
        raise ValueError(f"the task's meta is not a JSON object: {meta[:80]!r}")
    return value


def write_meta(**sections: Any) -> str:
    """``sections`` as meta text (compact JSON)."""
    return json.dumps(sections, separators=(",", ":"), sort_keys=True)


def add_sections(meta: str | None, **sections: Any) -> str:
    """``meta`` with ``sections`` added (replacing sections of the same name); ``ValueError`` as
    :func:`read_meta`."""
    return write_meta(**{**read_meta(meta), **sections})


def engine_sections(meta: str | None) -> dict[str, Any]:
    """Every section of ``meta`` but the user's: what a hook must leave as it is (``ValueError`` as
    :func:`read_meta`)."""
    sections = read_meta(meta)
    sections.pop(USER, None)
    return sections


def read_user_meta(meta: str | None) -> dict[str, str]:
    """The user's metadata stored in ``meta``: ``{}`` when there is none, and for damaged text (a fault of a
    stored record stays with it: the task still runs, showing no metadata). Only ``str`` pairs are kept."""
    try:
        section = read_meta(meta).get(USER)
    except ValueError:
        return {}
    if not isinstance(section, dict):
        return {}
    return {key: value for key, value in section.items() if isinstance(key, str) and isinstance(value, str)}


def with_user_meta(meta: str | None, items: Mapping[str, str]) -> str | None:
    """``meta`` with its user section replaced by ``items`` (removed when ``items`` is empty; the engine's
    sections are kept). ``None`` when nothing is left. ``ValueError`` as :func:`read_meta`."""
    sections = read_meta(meta)
    if items:
        sections[USER] = dict(items)
    else:
        sections.pop(USER, None)
    return write_meta(**sections) if sections else None


def check_user_meta(value: object, where: str) -> dict[str, str]:
    """``value`` as user metadata: a mapping of non-empty ``str`` keys to ``str`` values, none holding a NUL
    character or a lone surrogate. ``TypeError`` for a non-mapping or a non-``str`` key or value,
    ``ValueError`` for an empty key, a NUL or a lone surrogate, each naming ``where``, the item
    and the fix."""
    if not isinstance(value, Mapping):
        raise TypeError(
            f"{where}: meta must be a mapping of str to str, such as meta={{'tenant': 'acme'}}; got {value!r}"
        )
    checked: dict[str, str] = {}
    for key, item in value.items():
        if not isinstance(key, str):
            raise TypeError(f"{where}: meta keys must be str, got the key {key!r}; convert it with str()")
        if not isinstance(item, str):
            raise TypeError(
                f"{where}: meta values must be str, got meta[{key!r}] = {item!r}; convert it with str() "
                "(meta is text for routing and logging; pass data as the task's arguments)"
            )
        if not key:
            raise ValueError(f"{where}: meta keys must be non-empty strings, got ''")
        for text, what in ((key, "key"), (item, f"value of meta[{key!r}]")):
            if "\x00" in text:
                raise ValueError(f"{where}: the meta {what} holds a NUL character ('\\x00'): {text!r}")
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(
                    f"{where}: the meta {what} is not valid Unicode text (a lone surrogate): {text!r}"
                ) from None
        checked[key] = item
    return checked
