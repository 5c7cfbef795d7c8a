"""Conformance rules for leases: :meth:`Backend.extend_leases` and :meth:`Backend.reclaim_expired`."""

from __future__ import annotations

import anyio
import anyio.lowlevel

from ..._backend import Backend
from ..._records import Settlement, TaskState
from .._support import LEASE, T0, OpenBackend, SuiteBase, claim_one, ids_of, new_task, seed

__all__ = ["LeaseRules"]


class LeaseRules(SuiteBase):
    """Heartbeats renew held leases only; expired leases are taken over with a new token, attempts kept."""

    async def test_extend_leases_renews_every_held_lease(self, backend: Backend) -> None:
        tokens = await seed(backend, [(new_task("a"), TaskState.ACTIVE), (new_task("b"), TaskState.ACTIVE)])
        lost = await backend.extend_leases([("a", tokens["a"]), ("b", tokens["b"])], lease_until=T0 + 100)
        assert lost == set()
        for task_id in ("a", "b"):
            record = await backend.get(task_id)
            assert record is not None
            assert (record.state, record.lease_until, record.attempts) == (TaskState.ACTIVE, T0 + 100, 1)

    async def test_extend_leases_of_nothing_loses_nothing(self, backend: Backend) -> None:
        assert await backend.extend_leases([], lease_until=T0 + 100) == set()

    async def test_extend_leases_reports_every_lost_lease(self, backend: Backend) -> None:
        tokens = await seed(
            backend,
            [(new_task("held"), TaskState.ACTIVE), (new_task("stolen"), TaskState.ACTIVE)],
            lease_until=T0 + 40,
        )
        await backend.enqueue_many([new_task("done", queue="other")])
        finished = await claim_one(backend, "done", now=T0 + 11, lease_until=T0 + 41)
        await backend.settle(
            [Settlement(task_id="done", token=finished.token, state=TaskState.SUCCEEDED, at=T0 + 12)]
        )
        lost = await backend.extend_leases(
            [
                ("held", tokens["held"]),
                ("stolen", "not-the-token"),
                ("done", finished.token),
                ("ghost", "no-such-task"),
            ],
            lease_until=T0 + 100,
        )
        assert lost == {"stolen", "done", "ghost"}
        held, stolen = await backend.get("held"), await backend.get("stolen")
        assert held is not None
        assert held.lease_until == T0 + 100
        assert stolen is not None
        assert stolen.lease_until == T0 + 40, "a lost lease must not be extended"
        done = await backend.get("done")
        assert done is not None
        assert done.state is TaskState.SUCCEEDED

    async def test_an_expired_lease_is_still_held_until_another_caller_reclaims_it(
        self, backend: Backend
    ) -> None:
        # A slow worker whose lease ran out may still heartbeat and settle while nobody has taken over:
        # a lease is lost by a new token, never by the clock (backends do not read the clock).
        await backend.enqueue_many([new_task("slow"), new_task("late", queue="other")])
        slow = await claim_one(backend, "slow", now=T0 + 1, lease_until=T0 + 5)
        late = await claim_one(backend, "late", now=T0 + 1, lease_until=T0 + 5)
        assert await backend.extend_leases([("slow", slow.token)], lease_until=T0 + 100) == set()
        verdict = Settlement(task_id="late", token=late.token, state=TaskState.SUCCEEDED, at=T0 + 50)
        assert await backend.settle([verdict]) == set()
        record = await backend.get("late")
        assert record is not None
        assert (record.state, record.finished_at) == (TaskState.SUCCEEDED, T0 + 50)
        assert await backend.reclaim_expired(now=T0 + 60, lease_until=T0 + 90, limit=10) == []

    async def test_reclaim_takes_only_active_tasks_whose_lease_has_expired(self, backend: Backend) -> None:
        await backend.enqueue_many([new_task("a"), new_task("b", queue="b"), new_task("c", queue="c")])
        old_a = await claim_one(backend, "a", now=T0 + 1, lease_until=T0 + 10)
        await claim_one(backend, "b", now=T0 + 1, lease_until=T0 + 20)
        await claim_one(backend, "c", now=T0 + 1, lease_until=T0 + 30)
        await backend.enqueue_many([new_task("pending", run_at=T0)])
        reclaimed = await backend.reclaim_expired(now=T0 + 20, lease_until=T0 + 80, limit=10)
        assert ids_of(reclaimed) == ["a"], "only leases with lease_until < now have expired"
        record = reclaimed[0].record
        assert (record.state, record.attempts, record.lease_until) == (TaskState.ACTIVE, 1, T0 + 80)
        assert reclaimed[0].token != old_a.token, "a reclaimed task needs a fresh token"
        assert await backend.get("a") == record
        pending = await backend.get("pending")
        assert pending is not None
        assert pending.state is TaskState.PENDING
        claimable = await backend.claim(["default"], 10, now=T0 + 20, lease_until=T0 + 80)
        assert ids_of(claimable) == ["pending"], "a reclaimed task stays ACTIVE and cannot be claimed"

    async def test_reclaim_ignores_tasks_that_are_not_active(self, backend: Backend) -> None:
        await seed(
            backend,
            [
                (new_task("s"), TaskState.SUCCEEDED),
                (new_task("d"), TaskState.DEAD),
                (new_task("c"), TaskState.CANCELLED),
                (new_task("p"), TaskState.PENDING),
            ],
        )
        assert await backend.reclaim_expired(now=T0 + 10_000, lease_until=T0 + 20_000, limit=10) == []

    async def test_reclaim_respects_the_limit(self, backend: Backend) -> None:
        await seed(backend, [(new_task(f"t{n}"), TaskState.ACTIVE) for n in range(5)], lease_until=T0 + 20)
        sizes = [
            len(await backend.reclaim_expired(now=T0 + 100, lease_until=T0 + 200, limit=2)) for _ in range(4)
        ]
        assert sizes == [2, 2, 1, 0]

    async def test_reclaim_keeps_attempts_and_invalidates_the_old_token(self, backend: Backend) -> None:
        await backend.enqueue_many([new_task("job")])
        old = await claim_one(backend, "job", now=T0 + 1, lease_until=T0 + 5)
        (new,) = await backend.reclaim_expired(now=T0 + 6, lease_until=T0 + 36, limit=10)
        assert new.record.attempts == 1, "the lost attempt was counted at claim time; reclaim adds none"
        assert await backend.extend_leases([("job", old.token)], lease_until=T0 + 50) == {"job"}
        stale = Settlement(task_id="job", token=old.token, state=TaskState.SUCCEEDED, at=T0 + 7)
        assert await backend.settle([stale]) == {"job"}
        assert await backend.extend_leases([("job", new.token)], lease_until=T0 + 50) == set()
        retry = Settlement(
            task_id="job", token=new.token, state=TaskState.PENDING, at=T0 + 8, run_at=T0 + 9, error="lost"
        )
        assert await backend.settle([retry]) == set()
        again = await claim_one(backend, "job", now=T0 + 9, lease_until=T0 + 39)
        assert again.record.attempts == 2

    async def test_concurrent_reclaimers_never_take_the_same_task(self, open_backend: OpenBackend) -> None:
        backends = [await open_backend() for _ in range(3)]
        task_ids = [f"r{n:03d}" for n in range(60)]
        await backends[0].enqueue_many([new_task(task_id) for task_id in task_ids])
        assert len(await backends[0].claim(["default"], 100, now=T0 + 1, lease_until=T0 + 2)) == 60
        taken: list[str] = []

        async def reclaimer(backend: Backend) -> None:
            while batch := await backend.reclaim_expired(now=T0 + 10, lease_until=T0 + 10 + LEASE, limit=4):
                taken.extend(ids_of(batch))
                await anyio.lowlevel.checkpoint()

        with anyio.fail_after(60):
            async with anyio.create_task_group() as group:
                for backend in backends:
                    for _ in range(2):
                        group.start_soon(reclaimer, backend)
        duplicates = sorted({task_id for task_id in taken if taken.count(task_id) > 1})
        assert not duplicates, f"expired tasks reclaimed more than once: {duplicates}"
        assert sorted(taken) == task_ids
