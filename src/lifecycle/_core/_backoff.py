"""Exponential backoff with full jitter, shared by task restarts and async-task retries."""

from __future__ import annotations

import random
from dataclasses import dataclass

__all__ = ["Backoff"]


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff with optional full jitter.

    The ceiling for attempt ``n`` (1-based) is ``min(cap, initial * multiplier ** (n - 1))``; with ``jitter``
    the delay is drawn uniformly from ``[0, ceiling]`` ("full jitter", which spreads retries of many tasks
    that failed together), otherwise it is the ceiling itself.

    Raises ``ValueError`` for a negative ``initial``, a ``cap`` below ``initial`` or a ``multiplier`` below 1.

    Example::

        >>> Backoff(initial=1.0, cap=60.0, jitter=False).delay(3)
        4.0
    """

    initial: float = 0.1
    cap: float = 30.0
    multiplier: float = 2.0
    jitter: bool = True

    def __post_init__(self) -> None:
        if self.initial < 0:
            raise ValueError(f"Backoff initial must be >= 0, got {self.initial!r}")
        if self.cap < self.initial:
            raise ValueError(f"Backoff cap ({self.cap!r}) must be >= initial ({self.initial!r})")
        if self.multiplier < 1:
            raise ValueError(f"Backoff multiplier must be >= 1, got {self.multiplier!r}")

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
