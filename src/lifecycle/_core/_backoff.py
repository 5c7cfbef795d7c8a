"""Exponential backoff with full jitter, shared by task restarts and async-task retries."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from datetime import timedelta

from .._checks import check_seconds

__all__ = ["Backoff"]


@dataclass(frozen=True, slots=True, init=False)
class Backoff:
    """Exponential backoff with optional full jitter.

    The ceiling for attempt ``n`` (1-based) is ``min(cap, initial * multiplier ** (n - 1))``; with ``jitter``
    the delay is drawn uniformly from ``[0, ceiling]`` ("full jitter", which spreads retries of many tasks
    that failed together), otherwise it is the ceiling itself.

    ``initial`` and ``cap`` are seconds (numbers or ``timedelta``, kept as ``float``).

    Raises ``TypeError`` for an ``initial``, ``cap`` or ``multiplier`` that is not a number (``bool`` is not
    one); ``ValueError`` for NaN or infinity, a negative ``initial``, a ``cap`` below ``initial`` or a
    ``multiplier`` below 1.

    Example::

        >>> Backoff(initial=1.0, cap=60.0, jitter=False).delay(3)
        4.0
    """

    initial: float
    cap: float
    multiplier: float
    jitter: bool

    # An __init__ of its own (not the dataclass's): it takes a timedelta where the field keeps a float.
    def __init__(
        self,
        initial: float | timedelta = 0.1,
        cap: float | timedelta = 30.0,
        multiplier: float = 2.0,
        jitter: bool = True,
    ) -> None:
        seconds = check_seconds(initial, "Backoff initial", allow_zero=True)
        ceiling = check_seconds(cap, "Backoff cap", allow_zero=True)
        if ceiling < seconds:
            raise ValueError(f"Backoff cap ({cap!r}) must be >= initial ({initial!r})")
        if isinstance(multiplier, bool) or not isinstance(multiplier, int | float):
            raise TypeError(
                f"Backoff multiplier must be a number of at least 1 (an int or float), got {multiplier!r}"
            )
        if not math.isfinite(multiplier) or multiplier < 1:
            raise ValueError(f"Backoff multiplier must be a finite number of at least 1, got {multiplier!r}")
        object.__setattr__(self, "initial", seconds)
        object.__setattr__(self, "cap", ceiling)
        object.__setattr__(self, "multiplier", multiplier)
        object.__setattr__(self, "jitter", jitter)

    def ceiling(self, attempt: int) -> float:
        """The largest delay for the ``attempt``-th retry (1-based)."""
        exponent = max(attempt, 1) - 1
        try:
            return min(self.cap, self.initial * self.multiplier**exponent)
        except OverflowError:  # a huge attempt count: far past the cap anyway
            return self.cap

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """The delay before the ``attempt``-th retry; ``rng`` supplies the jitter (tests seed it)."""
        ceiling = self.ceiling(attempt)
        if not self.jitter:
            return ceiling
        return (rng or random).uniform(0.0, ceiling)
