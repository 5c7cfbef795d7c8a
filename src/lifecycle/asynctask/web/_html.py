"""A tiny HTML builder that escapes by default: every value put into markup is escaped unless it is
:class:`Markup` (markup this package built). No template engine is needed for a few server-rendered pages,
and the rule "escape unless proven safe" is the one that matters: a task name, argument, error or queue name
containing ``<script>`` renders as text."""

from __future__ import annotations

import html
import string
from collections.abc import Iterable
from typing import Any

__all__ = ["Markup", "escape", "html_join", "render"]


class Markup(str):
    """Text that is already HTML (built by :func:`render` or :func:`escape`): inserted as it is."""

    __slots__ = ()


def escape(value: object) -> Markup:
    """``value`` as HTML text: :class:`Markup` as it is, anything else as its ``str`` with ``& < > " '``
    escaped (so it is safe in element content and in quoted attribute values)."""
    if isinstance(value, Markup):
        return value
    return Markup(html.escape(str(value), quote=True))


def html_join(parts: Iterable[object], separator: str = "") -> Markup:
    """The parts escaped (unless markup) and joined."""
    return Markup(separator.join(escape(part) for part in parts))


class _EscapingFormatter(string.Formatter):
    def format_field(self, value: Any, format_spec: str) -> str:
        if isinstance(value, Markup) and not format_spec:
            return value
        return escape(format(value, format_spec))


_FORMATTER = _EscapingFormatter()


def render(template: str, /, **values: object) -> Markup:
    """``template`` (trusted markup written in this package) with each ``{name}`` replaced by the escaped
    value (:class:`Markup` values as they are).

    Example::

        render('<a href="{href}">{text}</a>', href="/task?id=1", text="<b>")
        # '<a href="/task?id=1">&lt;b&gt;</a>'
    """
    return Markup(_FORMATTER.format(template, **values))
