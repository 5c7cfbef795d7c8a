"""A transaction being planned: the changes one call makes, kept beside the replica (never in it) until the
log accepted them; then they are the ops every replica applies (see ``_state``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ._codec import ID, Op
from ._state import State, refill

__all__ = ["ORDER_SHIFT", "Tx"]

ORDER_SHIFT = 24
"""A task stored by the transaction at log sequence ``seq`` gets the order ``seq << ORDER_SHIFT`` plus its
place in the transaction: enqueue order across the store, unique, and the same in every replica."""


class Tx:
    """The changes of one call, planned against ``state`` as of its sequence; committed (or not) as a whole.

    ``seq`` is the log sequence the transaction's first message will have if the log accepts it.
    """

    __slots__ = (
        "_next_order",
        "buckets",
        "new",
        "paused",
        "rows",
        "running",
        "running_keys",
        "state",
        "windows",
    )

    def __init__(self, state: State, seq: int) -> None:
        self.state = state
        self._next_order = seq << ORDER_SHIFT
        self.rows: dict[str, list[Any] | None] = {}  # None: deleted
        self.new: set[str] = set()  # stored whole (new, or replacing a row)
        self.windows: dict[str, float | None] = {}
        self.buckets: dict[str, tuple[float | None, float | None, int]] = {}
        self.paused: dict[str, bool] = {}
        self.running: dict[str, int] = {}  # changes of State.running made by this transaction
        self.running_keys: dict[tuple[str, str], int] = {}

    # -- rows ------------------------------------------------------------------------------------------------

    def get(self, task_id: str) -> Sequence[Any] | None:
        """The row of ``task_id`` as this transaction leaves it, or ``None``."""
        if task_id in self.rows:
            return self.rows[task_id]
        return self.state.rows.get(task_id)

    def edit(self, task_id: str) -> list[Any]:
        """The row of ``task_id`` (which must exist) to change in place."""
        row = self.rows.get(task_id)
        if row is None:
            row = self.rows[task_id] = list(self.state.rows[task_id])
        return row

    def insert(self, row: list[Any]) -> None:
        """Store ``row`` whole (a new task, or one replacing a finished record with its id)."""
        self.rows[row[ID]] = row
        self.new.add(row[ID])

    def delete(self, task_id: str) -> None:
        """Delete ``task_id``."""
        self.rows[task_id] = None
        self.new.discard(task_id)

    def order(self) -> int:
        """The enqueue order of the next task this transaction stores."""
        order = self._next_order
        self._next_order += 1
        return order

    # -- the rest of the state -------------------------------------------------------------------------------

    def window(self, key: str) -> float | None:
        """The end of the uniqueness window ``key``, or ``None``."""
        if key in self.windows:
            return self.windows[key]
        return self.state.windows.get(key)

    def is_paused(self, queue: str) -> bool:
        return self.paused.get(queue, queue in self.state.paused)

    def stored_bucket(self, name: str) -> tuple[float | None, float | None, int] | None:
        if name in self.buckets:
            return self.buckets[name]
        return self.state.buckets.get(name)

    def bucket(self, name: str, rate: int, per: float | None, now: float) -> tuple[float, float]:
        return refill(self.stored_bucket(name), rate, per, now)

    def set_tokens(self, name: str, tokens: float, at: float) -> None:
        stored = self.stored_bucket(name)
        self.buckets[name] = (tokens, at, 0 if stored is None else stored[2])

    def add_refused(self, name: str) -> None:
        stored = self.stored_bucket(name)
        if stored is None:
            self.buckets[name] = (None, None, 1)
        else:
            self.buckets[name] = (stored[0], stored[1], stored[2] + 1)

    def running_of(self, name: str) -> int:
        return self.state.running.get(name, 0) + self.running.get(name, 0)

    def running_for(self, name: str, key: str) -> int:
        pair = (name, key)
        return self.state.running_keys.get(pair, 0) + self.running_keys.get(pair, 0)

    def count_running(self, name: object, key: object) -> None:
        """One more active task of ``name`` (and ``key``), started by this transaction."""
        if type(name) is not str:
            return
        self.running[name] = self.running.get(name, 0) + 1
        if type(key) is str:
            pair = (name, key)
            self.running_keys[pair] = self.running_keys.get(pair, 0) + 1

    # -- the result ------------------------------------------------------------------------------------------

    def ops(self) -> list[Op]:
        """The changes as ops (see ``_codec.Op``), the smallest that say them: only the values that change."""
        ops: list[Op] = []
        stored = self.state.rows
        for task_id, row in self.rows.items():
            old = stored.get(task_id)
            if row is None:
                if old is not None:
                    ops.append(["d", task_id])
            elif old is None or task_id in self.new:
                ops.append(["n", task_id, tuple(row)])
            else:
                changes = {index: value for index, value in enumerate(row) if _changed(value, old[index])}
                if changes:
                    ops.append(["u", task_id, changes])
        for key, until in self.windows.items():
            ops.append(["w", key, until])
        for name, (tokens, at, refused) in self.buckets.items():
            ops.append(["b", name, tokens, at, refused])
        for queue, paused in self.paused.items():
            if paused != (queue in self.state.paused):
                ops.append(["p", queue, int(paused)])
        return ops


def _changed(value: Any, old: Any) -> bool:
    if value is old:
        return False
    return type(value) is not type(old) or value != old
