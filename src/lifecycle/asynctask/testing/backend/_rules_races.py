"""Conformance rules for races between processes: two state changes of one task never both apply."""

from __future__ import annotations

import anyio
import anyio.lowlevel

from ..._backend import Backend
from ..._records import ClaimedTask, Settlement, TaskState
from .._support import LEASE, T0, OpenBackend, SuiteBase, ids_of, new_task

__all__ = ["RaceRules"]


class RaceRules(SuiteBase):
    """Check-then-act across processes must be atomic: cancel vs claim, settle vs reclaim."""

    async def test_cancel_racing_claims_never_cancels_a_claimed_task_only_asks_it_to_stop(
        self, open_backend: OpenBackend
    ) -> None:
        canceller, *claimers = [await open_backend() for _ in range(3)]
        task_ids = [f"r{n:03d}" for n in range(200)]
        await canceller.enqueue_many([new_task(task_id) for task_id in task_ids])
        cancelled: list[str] = []
        claimed: list[str] = []

        async def cancel_all() -> None:
            for start in range(0, len(task_ids), 10):
                cancelled.extend(await canceller.cancel(task_ids[start : start + 10], now=T0 + 2))
                await anyio.lowlevel.checkpoint()

        async def claim_all(backend: Backend) -> None:
            while batch := await backend.claim(["default"], 5, now=T0 + 1, lease_until=T0 + 1 + LEASE):
                claimed.extend(ids_of(batch))
                await anyio.lowlevel.checkpoint()

        with anyio.fail_after(60):
            async with anyio.create_task_group() as group:
                group.start_soon(cancel_all)
                for backend in claimers:
                    group.start_soon(claim_all, backend)
        assert len(claimed) == len(set(claimed)), "a task was claimed twice"
        assert len(cancelled) == len(set(cancelled)), "a task was cancelled twice"
        assert sorted(set(cancelled) | set(claimed)) == task_ids, "every task is cancelled or claimed"
        for task_id in task_ids:
            record = await canceller.get(task_id)
            assert record is not None
            if task_id in claimed:
                # A cancel that came after the claim is a request the worker acts on: the task stays active.
                assert record.state is TaskState.ACTIVE, f"claimed {task_id!r} is {record.state}"
                assert record.cancel_requested is (task_id in cancelled), f"{task_id!r}: {record}"
            else:
                assert record.state is TaskState.CANCELLED, f"unclaimed {task_id!r} is {record.state}"

    async def test_settle_racing_reclaim_applies_exactly_one_of_them(self, open_backend: OpenBackend) -> None:
        worker, reclaimer = await open_backend(), await open_backend()
        task_ids = [f"r{n:03d}" for n in range(100)]
        await worker.enqueue_many([new_task(task_id) for task_id in task_ids])
        leases = await worker.claim(["default"], 100, now=T0 + 1, lease_until=T0 + 5)
        assert len(leases) == 100
        lost: set[str] = set()
        reclaimed: list[ClaimedTask] = []

        async def settle_all() -> None:
            for start in range(0, len(leases), 5):
                verdicts = [
                    Settlement(task_id=c.record.id, token=c.token, state=TaskState.SUCCEEDED, at=T0 + 10)
                    for c in leases[start : start + 5]
                ]
                lost.update(await worker.settle(verdicts))
                await anyio.lowlevel.checkpoint()

        async def reclaim_all() -> None:
            while batch := await reclaimer.reclaim_expired(now=T0 + 10, lease_until=T0 + 40, limit=5):
                reclaimed.extend(batch)
                await anyio.lowlevel.checkpoint()

        with anyio.fail_after(60):
            async with anyio.create_task_group() as group:
                group.start_soon(settle_all)
                group.start_soon(reclaim_all)
        taken = {c.record.id for c in reclaimed}
        assert len(taken) == len(reclaimed), "a task was reclaimed twice"
        assert taken == lost, "a settlement is lost exactly when its task was reclaimed first"
        for task_id in task_ids:
            record = await worker.get(task_id)
            assert record is not None
            expected = TaskState.ACTIVE if task_id in taken else TaskState.SUCCEEDED
            assert record.state is expected, f"{task_id!r} is {record.state}, expected {expected}"
