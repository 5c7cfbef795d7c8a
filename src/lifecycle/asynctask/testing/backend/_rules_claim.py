"""Conformance rules for :meth:`Backend.claim`: order, due times, limits, lease fields, exclusive claims."""

from __future__ import annotations

import anyio
import anyio.lowlevel

from ..._backend import Backend
from ..._records import ClaimedTask, Settlement, TaskRecord, TaskState
from .._support import LEASE, T0, OpenBackend, SuiteBase, ids_of, new_task, seed

__all__ = ["ClaimRules"]


class ClaimRules(SuiteBase):
    """``claim``: priority across queues, FIFO inside one, only due ``PENDING`` tasks, each to one caller."""

    async def test_claim_leases_the_task_to_the_caller(self, open_backend: OpenBackend) -> None:
        worker = await open_backend()
        reader = await open_backend()
        task = new_task("job", max_retries=4, timeout=9.5, meta="m")
        await worker.enqueue_many([task])
        claimed = await worker.claim(["default"], 10, now=T0 + 5, lease_until=T0 + 35)
        assert len(claimed) == 1
        assert isinstance(claimed[0], ClaimedTask)
        token = claimed[0].token
        assert isinstance(token, str), f"a lease token must be a str, got {type(token).__name__}"
        assert token, "a lease token must not be empty"
        expected = TaskRecord(
            id="job",
            name=task.name,
            queue="default",
            payload=task.payload,
            state=TaskState.ACTIVE,
            attempts=1,
            max_retries=4,
            timeout=9.5,
            enqueued_at=T0,
            run_at=T0,
            started_at=T0 + 5,
            lease_until=T0 + 35,
            meta="m",
        )
        assert claimed[0].record == expected
        assert await reader.get("job") == expected, "the claim must be stored, not only returned"

    async def test_claim_takes_queues_in_the_given_priority_order(self, backend: Backend) -> None:
        await backend.enqueue_many(
            [
                new_task("low1", queue="low"),
                new_task("low2", queue="low", enqueued_at=T0 + 1),
                new_task("high1", queue="high", enqueued_at=T0 + 2),
                new_task("high2", queue="high", enqueued_at=T0 + 3, run_at=T0 + 4),
                new_task("other", queue="other"),
            ]
        )
        first = await backend.claim(["high", "low"], 3, now=T0 + 10, lease_until=T0 + 40)
        assert set(ids_of(first)) == {"high1", "high2", "low1"}, "queues[0] must be emptied first"
        assert ids_of(first) == ["high1", "high2", "low1"], "claimed tasks must come back in claim order"
        assert ids_of(await backend.claim(["high", "low"], 10, now=T0 + 10, lease_until=T0 + 40)) == ["low2"]
        assert ids_of(await backend.claim(["other"], 10, now=T0 + 10, lease_until=T0 + 40)) == ["other"]

    async def test_claim_within_a_queue_takes_the_earliest_run_at_then_enqueue_order(
        self, backend: Backend
    ) -> None:
        expected = ["early", "b1", "b2", "b3", "late"]
        for queue in ("one-by-one", "batch"):
            await backend.enqueue_many(
                [
                    new_task(f"{queue}:late", queue=queue, enqueued_at=T0, run_at=T0 + 5),
                    new_task(f"{queue}:b1", queue=queue, enqueued_at=T0 + 1, run_at=T0 + 2),
                    new_task(f"{queue}:b2", queue=queue, enqueued_at=T0 + 1, run_at=T0 + 2),
                    new_task(f"{queue}:early", queue=queue, enqueued_at=T0 + 2, run_at=T0 + 1),
                ]
            )
            await backend.enqueue_many(
                [new_task(f"{queue}:b3", queue=queue, enqueued_at=T0 + 3, run_at=T0 + 2)]
            )
        one_by_one = []
        for _ in expected:
            claimed = await backend.claim(["one-by-one"], 1, now=T0 + 10, lease_until=T0 + 40)
            one_by_one += [task_id.split(":")[1] for task_id in ids_of(claimed)]
        assert one_by_one == expected
        batch = await backend.claim(["batch"], 10, now=T0 + 10, lease_until=T0 + 40)
        assert [task_id.split(":")[1] for task_id in ids_of(batch)] == expected

    async def test_claim_leaves_tasks_whose_run_at_is_later_than_now(self, backend: Backend) -> None:
        await backend.enqueue_many(
            [new_task("later", run_at=T0 + 100), new_task("due-exactly", run_at=T0 + 10)]
        )
        assert await backend.claim(["default"], 10, now=T0 + 9.5, lease_until=T0 + 40) == []
        assert ids_of(await backend.claim(["default"], 10, now=T0 + 10, lease_until=T0 + 40)) == [
            "due-exactly"
        ], "a task is due when run_at <= now"
        assert await backend.claim(["default"], 10, now=T0 + 99, lease_until=T0 + 129) == []
        assert ids_of(await backend.claim(["default"], 10, now=T0 + 100, lease_until=T0 + 130)) == ["later"]

    async def test_claim_respects_the_limit(self, backend: Backend) -> None:
        await backend.enqueue_many([new_task(f"t{n}", enqueued_at=T0 + n) for n in range(5)])
        assert await backend.claim(["default"], 0, now=T0 + 10, lease_until=T0 + 40) == []
        got = [
            ids_of(await backend.claim(["default"], 2, now=T0 + 10, lease_until=T0 + 40)) for _ in range(4)
        ]
        assert got == [["t0", "t1"], ["t2", "t3"], ["t4"], []]

    async def test_claim_takes_only_pending_tasks(self, backend: Backend) -> None:
        await seed(
            backend,
            [
                (new_task("a"), TaskState.ACTIVE),
                (new_task("s"), TaskState.SUCCEEDED),
                (new_task("d"), TaskState.DEAD),
                (new_task("c"), TaskState.CANCELLED),
                (new_task("p"), TaskState.PENDING),
            ],
        )
        assert ids_of(await backend.claim(["default"], 10, now=T0 + 1000, lease_until=T0 + 2000)) == ["p"]

    async def test_claim_takes_nothing_from_queues_not_asked_for(self, backend: Backend) -> None:
        await backend.enqueue_many([new_task("elsewhere", queue="elsewhere")])
        assert await backend.claim(["default"], 10, now=T0 + 10, lease_until=T0 + 40) == []
        assert await backend.claim([], 10, now=T0 + 10, lease_until=T0 + 40) == []
        record = await backend.get("elsewhere")
        assert record is not None
        assert record.state is TaskState.PENDING

    async def test_every_claim_gets_a_fresh_unique_token(self, backend: Backend) -> None:
        await backend.enqueue_many([new_task(f"t{n}") for n in range(10)])
        first = await backend.claim(["default"], 10, now=T0 + 1, lease_until=T0 + 31)
        assert len({c.token for c in first}) == 10, "every claimed task needs its own token"
        released = [
            Settlement(task_id=c.record.id, token=c.token, state=TaskState.PENDING, at=T0 + 2, run_at=T0 + 2)
            for c in first
        ]
        assert await backend.settle(released) == set()
        second = await backend.claim(["default"], 10, now=T0 + 3, lease_until=T0 + 33)
        assert len({c.token for c in second}) == 10
        assert not {c.token for c in first} & {c.token for c in second}, "a new claim must get a new token"

    async def test_concurrent_claimers_never_receive_the_same_task(self, open_backend: OpenBackend) -> None:
        backends = [await open_backend() for _ in range(3)]
        task_ids = [f"c{n:03d}" for n in range(300)]
        await backends[0].enqueue_many(
            [new_task(task_id, queue=("q1", "q2")[n % 2]) for n, task_id in enumerate(task_ids)]
        )
        claimed: list[str] = []

        async def claimer(backend: Backend) -> None:
            while batch := await backend.claim(["q1", "q2"], 7, now=T0 + 1, lease_until=T0 + 1 + LEASE):
                claimed.extend(ids_of(batch))
                await anyio.lowlevel.checkpoint()

        with anyio.fail_after(60):
            async with anyio.create_task_group() as group:
                for backend in backends:
                    for _ in range(3):
                        group.start_soon(claimer, backend)
        duplicates = sorted({task_id for task_id in claimed if claimed.count(task_id) > 1})
        assert not duplicates, f"tasks claimed more than once: {duplicates}"
        assert sorted(claimed) == task_ids
