"""The engine's bookkeeping in :attr:`NewTask.meta`: a small JSON object with one section per feature
(``"chain"`` for chain steps, ``"schedule"`` for schedule fires, ``"trace"`` for the W3C trace context of
the enqueuer's span). Backends store it as opaque text."""

from __future__ import annotations

import json
from typing import Any

__all__ = ["add_sections", "read_meta", "write_meta"]


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
