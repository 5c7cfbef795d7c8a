"""Conformance rules for batch sizes: every batch method accepts batches far beyond SQL parameter limits."""

from __future__ import annotations

from ..._backend import Backend
from ..._records import Settlement, TaskState
from .._support import T0, SuiteBase, ids_of, new_task, normalise_stats

__all__ = ["BatchRules"]

BIG_BATCH = 4_000
"""Larger than SQLite's old 999-parameter limit, and at ~9 values per row far beyond 32 766 parameters in one
multi-row statement: a backend has to chunk, or bind differently, to pass."""


class BatchRules(SuiteBase):
    """The engine hands over whole batches (a user's ``enqueue_many``, a full claim, a settle buffer)."""

    async def test_every_batch_method_accepts_a_large_batch(self, backend: Backend) -> None:
        task_ids = [f"big-{n:05d}" for n in range(BIG_BATCH)]
        tasks = [new_task(task_id, enqueued_at=T0 + n / 1000) for n, task_id in enumerate(task_ids)]
        assert await backend.enqueue_many(tasks) == task_ids
        assert await backend.enqueue_many(tasks, if_exists="skip") == []
        claimed = await backend.claim(["default"], BIG_BATCH, now=T0 + 10, lease_until=T0 + 40)
        assert ids_of(claimed) == task_ids
        leases = [(c.record.id, c.token) for c in claimed]
        assert await backend.extend_leases(leases, lease_until=T0 + 70) == set()
        half, at = BIG_BATCH // 2, T0 + 11
        verdicts = [
            Settlement(task_id=c.record.id, token=c.token, state=TaskState.DEAD, at=at, error="e")
            for c in claimed[:half]
        ]
        verdicts += [
            Settlement(task_id=c.record.id, token=c.token, state=TaskState.PENDING, at=at, run_at=T0 + 99)
            for c in claimed[half:]
        ]
        assert await backend.settle(verdicts) == set()
        assert sorted(await backend.cancel(task_ids, now=T0 + 12)) == task_ids[half:]
        assert await backend.requeue(task_ids, now=T0 + 13) == BIG_BATCH
        assert normalise_stats(await backend.stats()) == {"default": {TaskState.PENDING: BIG_BATCH}}
        assert await backend.purge(states={TaskState.PENDING}) == BIG_BATCH
        assert normalise_stats(await backend.stats()) == {}
