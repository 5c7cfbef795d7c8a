"""The Redis backend's inspection and operator actions: listing, stats, cancel, requeue, purge, clear.

Each function works through a :class:`ScriptRunner`; the scripts are in ``_redis_lua_admin``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Collection, Sequence

from ..._records import TaskRecord, TaskState
from ._codec import STATE_NAMES, records, sortable_time, time_text
from ._conn import ScriptRunner

__all__ = ["cancel", "clear", "list_records", "purge", "requeue", "stats"]

_ALL_STATES = tuple(TaskState)
_PURGE_CHUNK = 500
_REQUEUE_CHUNK = 500


async def list_records(
    runner: ScriptRunner,
    states: Collection[TaskState] | None,
    queue: str | None,
    limit: int,
    offset: int,
) -> list[TaskRecord]:
    """See :meth:`RedisBackend.list_records`."""
    chosen = _ALL_STATES if states is None else tuple(dict.fromkeys(TaskState(s) for s in states))
    if not chosen or limit <= 0:
        return []
    args = [
        str(int(limit)),
        str(max(0, int(offset))),
        "0" if queue is None else "1",
        "" if queue is None else queue,
        *(STATE_NAMES[state] for state in chosen),
    ]
    return records(await runner.run("list", args))


async def stats(runner: ScriptRunner) -> dict[str, dict[TaskState, int]]:
    """See :meth:`RedisBackend.stats`."""
    reply = await runner.run("stats", [])
    counts: dict[str, dict[TaskState, int]] = {}
    width = 1 + len(_ALL_STATES)
    for start in range(0, len(reply), width):
        row = reply[start + 1 : start + width]
        numbers = {state: int(n) for state, n in zip(_ALL_STATES, row, strict=True) if n}
        if numbers:
            counts[reply[start].decode("utf-8", "replace")] = numbers
    return counts


async def cancel(
    runner: ScriptRunner, task_ids: Sequence[str], now: float, call_id: Callable[[], str]
) -> list[str]:
    """See :meth:`RedisBackend.cancel`."""
    unique = list(dict.fromkeys(task_ids))
    if not unique:
        return []
    done = await runner.run("cancel", [time_text(now), call_id(), *unique])
    return [task_id.decode() for task_id in done]


async def requeue(
    runner: ScriptRunner,
    task_ids: Sequence[str] | None,
    queue: str | None,
    now: float,
    call_id: Callable[[], str],
) -> int:
    """See :meth:`RedisBackend.requeue`."""
    if task_ids is not None:
        unique = list(dict.fromkeys(task_ids))
        if not unique:
            return 0
        args = [time_text(now), sortable_time(now), call_id(), *unique]
        return int(await runner.run("requeue_ids", args))
    moved = 0
    while True:
        args = [
            time_text(now),
            sortable_time(now),
            call_id(),
            str(_REQUEUE_CHUNK),
            "0" if queue is None else "1",
            "" if queue is None else queue,
        ]
        batch, examined = await runner.run("requeue_dead", args)
        moved += int(batch)
        if int(examined) < _REQUEUE_CHUNK:
            return moved


async def purge(
    runner: ScriptRunner,
    states: Collection[TaskState],
    queue: str | None,
    before: float | None,
    limit: int | None,
) -> int:
    """See :meth:`RedisBackend.purge`: per queue and state, batches of candidates oldest first."""
    chosen = tuple(dict.fromkeys(TaskState(s) for s in states))
    remaining = math.inf if limit is None else int(limit)
    if not chosen or remaining <= 0:
        return 0
    if queue is not None:
        queues = [queue]
    else:
        key = f"{runner.prefix}queues"
        members = await runner.retrying(lambda: runner.client.smembers(key), "purge")
        queues = sorted(member.decode() for member in members)
    before_text = "" if before is None else time_text(before)
    if queue is None:
        await _purge_groups(runner, chosen, before_text)
    deleted = 0
    for name in queues:
        for state in chosen:
            offset = 0  # candidates examined and kept (a finished_at not before `before`) are skipped
            while remaining > 0:
                chunk = int(min(_PURGE_CHUNK, remaining))
                args = [name, STATE_NAMES[state], before_text, str(offset), str(chunk)]
                gone, kept, examined = await runner.run("purge", args)
                deleted += gone
                remaining -= gone
                offset += kept
                if examined < chunk:
                    break
    return deleted


_GROUP_OUTCOMES = (TaskState.SUCCEEDED, TaskState.DEAD, TaskState.CANCELLED)


async def _purge_groups(runner: ScriptRunner, states: Collection[TaskState], before: str) -> None:
    """Delete the groups that ended in one of ``states`` (before ``before`` unless it is empty), in
    batches."""
    for state in states:
        if state in _GROUP_OUTCOMES:
            while int(await runner.run("purge_groups", [STATE_NAMES[state], before, str(_PURGE_CHUNK)])) >= (
                _PURGE_CHUNK
            ):
                pass


async def clear(runner: ScriptRunner) -> int:
    """See :meth:`RedisBackend.clear`."""
    pattern = re.sub(r"([*?\[\]\\])", r"\\\1", runner.prefix) + "*"
    client = runner.client
    deleted = 0
    batch: list[bytes] = []
    async for key in client.scan_iter(match=pattern, count=1000):
        batch.append(key)
        if len(batch) >= 1000:
            deleted += int(await client.unlink(*batch))
            batch = []
    if batch:
        deleted += int(await client.unlink(*batch))
    return deleted
