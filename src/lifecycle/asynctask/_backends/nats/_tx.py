"""A transaction being planned: the changes one call makes, kept beside the replica (never in it) until the
log accepted them; then they are the ops every replica applies (see ``_state``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ._codec import (
    G_ENDED,
    G_FINISHED_AT,
    G_ID,
    G_OUTCOME,
    G_RESULTS,
    G_THEN_ID,
    ID,
    Group,
    Op,
    copy_group,
)
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
        "groups",
        "new",
        "new_groups",
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
        self.groups: dict[str, Group | None] = {}  # None: deleted
        self.new_groups: set[str] = set()

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

    # -- groups ----------------------------------------------------------------------------------------------

    def group(self, group_id: str) -> Group | None:
        """The group ``group_id`` as this transaction leaves it, or ``None``."""
        if group_id in self.groups:
            return self.groups[group_id]
        return self.state.groups.get(group_id)

    def member_index(self, group_id: str, task_id: str) -> int | None:
        """The place of ``task_id`` among the members of the stored group ``group_id``, or ``None``."""
        if group_id in self.new_groups:
            group = self.groups[group_id]
            return None if group is None else _index_of(group, task_id)
        members = self.state.members.get(group_id)
        return None if members is None else members.get(task_id)

    def edit_group(self, group_id: str) -> Group:
        """The group ``group_id`` (which must exist) to change in place."""
        group = self.groups.get(group_id)
        if group is None:
            group = self.groups[group_id] = copy_group(self.state.groups[group_id])
        return group

    def insert_group(self, group: Group) -> None:
        """Store ``group`` whole."""
        self.groups[group[G_ID]] = group
        self.new_groups.add(group[G_ID])

    def delete_group(self, group_id: str) -> None:
        self.groups[group_id] = None
        self.new_groups.discard(group_id)

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
        groups = self.state.groups
        for group_id, group in self.groups.items():
            old_group = groups.get(group_id)
            if group is None:
                if old_group is not None:
                    ops.append(["gd", group_id])
            elif old_group is None or group_id in self.new_groups:
                ops.append(["g", group_id, group])
            else:
                ops += _group_changes(group, old_group)
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


def _index_of(group: Group, task_id: str) -> int | None:
    try:
        return list(group[1]).index(task_id)
    except ValueError:
        return None


def _group_changes(group: Group, old: Group) -> list[Op]:
    group_id = group[G_ID]
    ops: list[Op] = []
    for index, (ended, result) in enumerate(zip(group[G_ENDED], group[G_RESULTS], strict=True)):
        if _changed(ended, old[G_ENDED][index]) or _changed(result, old[G_RESULTS][index]):
            ops.append(["gm", group_id, index, ended, result])
    final = (group[G_OUTCOME], group[G_FINISHED_AT], group[G_THEN_ID])
    fields = (G_OUTCOME, G_FINISHED_AT, G_THEN_ID)
    if any(_changed(value, old[field]) for value, field in zip(final, fields, strict=True)):
        ops.append(["go", group_id, *final])
    return ops
