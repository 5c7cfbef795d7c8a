"""One validator family for the numbers and names users pass: seconds, counts and names.

One rule everywhere: a ``bool`` is never a number; a value of the wrong type is a ``TypeError``; NaN, infinity
and negative numbers are a ``ValueError`` (``None`` means "no limit" where a limit is optional, never
``inf``); zero is accepted only where the caller says it means something. Every message names the argument,
repeats the value and says what to pass instead.
"""

from __future__ import annotations

import math
from datetime import timedelta

__all__ = ["check_count", "check_name", "check_optional_seconds", "check_seconds"]


def check_seconds(value: object, what: str, *, allow_zero: bool = False) -> float:
    """``value`` (a number of seconds or a ``timedelta``) as a finite ``float``.

    Raises ``TypeError`` for anything that is not an ``int``, ``float`` or ``timedelta`` (``bool`` included),
    ``ValueError`` for NaN, infinity, negative values, and zero unless ``allow_zero``.

    >>> check_seconds(timedelta(minutes=1), "Repeat interval")
    60.0
    """
    bound = "zero or more" if allow_zero else "greater than zero"
    seconds = value.total_seconds() if isinstance(value, timedelta) else value
    if isinstance(seconds, bool) or not isinstance(seconds, int | float):
        raise TypeError(
            f"{what} must be a number of seconds {bound} (an int, float or timedelta), got {value!r}"
        )
    if not math.isfinite(seconds) or seconds < 0 or (seconds == 0 and not allow_zero):
        raise ValueError(f"{what} must be a finite number of seconds {bound}, got {value!r}")
    return float(seconds)


def check_optional_seconds(value: object, what: str, *, allow_zero: bool = False) -> float | None:
    """Like :func:`check_seconds`, with ``None`` accepted (and returned) for "no limit".

    >>> check_optional_seconds(None, "shutdown_timeout") is None
    True
    """
    if value is None:
        return None
    try:
        return check_seconds(value, what, allow_zero=allow_zero)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"{exc} (or None for no limit)") from None


def check_count(value: object, what: str, *, minimum: int = 0) -> int:
    """``value`` as an ``int`` of at least ``minimum``.

    Raises ``TypeError`` for anything but an ``int`` (``bool`` included), ``ValueError`` below ``minimum``.

    >>> check_count(3, "max_retries")
    3
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be a whole number of at least {minimum} (an int), got {value!r}")
    if value < minimum:
        raise ValueError(f"{what} must be at least {minimum}, got {value!r}")
    return value


def check_name(value: object, what: str) -> str:
    """``value`` as a name: a non-empty ``str`` without NUL characters (no store can keep those).

    Raises ``TypeError`` for a non-string, ``ValueError`` for an empty string or one holding a NUL.

    >>> check_name("emails", "queue")
    'emails'
    """
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a non-empty string, got {value!r}")
    if not value:
        raise ValueError(f"{what} must be a non-empty string, got ''")
    if "\x00" in value:
        raise ValueError(f"{what} must not contain NUL characters ('\\x00'), got {value!r}")
    return value
