"""Which queues a worker serves and in what order it claims from them: strict priority or weighted."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

from ..._checks import check_count, check_name

__all__ = ["QueueOrder"]


class QueueOrder:
    """The claim order of a worker's queues.

    - A sequence (``["critical", "default", "low"]``) is *strict priority*: every claim takes from the first
      queue that has due work, so a lower queue runs only when the ones before it are empty.
    - A mapping of name -> positive int weight (``{"critical": 6, "default": 3, "low": 1}``) is *weighted*, as
      in asynq: each claim draws a fresh order at random, a queue coming first with probability proportional
      to its weight, so busy high-weight queues never starve the others.

    Raises ``TypeError`` for a bare string, a name that is not a string or a weight that is not an int, and
    ``ValueError`` for an empty collection, an empty name or one holding a NUL, a weight below 1, a repeated
    name.
    """

    def __init__(self, queues: Mapping[str, int] | Sequence[str], rng: random.Random) -> None:
        self._rng = rng
        if isinstance(queues, str | bytes):
            raise TypeError(
                f"queues must be a list of names or a name -> weight mapping, got the string {queues!r}; "
                f"write queues=[{queues!r}]"
            )
        if isinstance(queues, Mapping):
            weights: dict[str, int] = {}
            for name, weight in queues.items():
                check_name(name, "queues: a queue name")
                weights[name] = check_count(weight, f"queues: the weight of queue {name!r}", minimum=1)
            if not weights:
                raise ValueError("queues is empty: give at least one queue name")
            self.names: tuple[str, ...] = tuple(weights)
            self.weights: dict[str, int] | None = weights
        elif isinstance(queues, Sequence):
            names = list(queues)
            for name in names:
                check_name(name, "queues: a queue name")
            if not names:
                raise ValueError("queues is empty: give at least one queue name")
            repeated = sorted({name for name in names if names.count(name) > 1})
            if repeated:
                raise ValueError(f"queues lists {', '.join(map(repr, repeated))} more than once")
            self.names = tuple(names)
            self.weights = None
        else:
            raise TypeError(f"queues must be a list of names or a name -> weight mapping, got {queues!r}")

    @property
    def strict(self) -> bool:
        """True for strict priority order, False for weighted."""
        return self.weights is None

    def next_order(self) -> Sequence[str]:
        """The order for the next claim (a fresh weighted draw each time, or the fixed strict order)."""
        weights = self.weights
        if weights is None or len(self.names) == 1:
            return self.names
        # Weighted sampling without replacement (Efraimidis-Spirakis): sort by u ** (1 / weight).
        rng = self._rng
        return sorted(self.names, key=lambda name: rng.random() ** (1.0 / weights[name]), reverse=True)

    def __repr__(self) -> str:
        return f"QueueOrder({self.weights if self.weights is not None else list(self.names)!r})"
