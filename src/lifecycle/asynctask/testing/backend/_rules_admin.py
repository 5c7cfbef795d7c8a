"""Conformance rules for operator actions: :meth:`Backend.cancel`, :meth:`Backend.requeue`,
:meth:`Backend.purge`."""

from __future__ import annotations

from ..._backend import Backend
from ..._records import Settlement, TaskRecord, TaskState
from .._support import T0, SuiteBase, claim_one, ids_of, new_task, normalise_stats, seed

__all__ = ["AdminRules"]


async def _get(backend: Backend, task_id: str) -> TaskRecord:
    record = await backend.get(task_id)
    assert record is not None, f"get({task_id!r}) returned None for a stored task"
    return record


class AdminRules(SuiteBase):
    """Cancel pending tasks (active ones are asked to stop); requeue dead or cancelled ones with attempts
    reset; purge what was asked."""

    async def test_cancel_makes_only_pending_tasks_cancelled(self, backend: Backend) -> None:
        await seed(
            backend,
            [
                (new_task("a"), TaskState.ACTIVE),
                (new_task("s"), TaskState.SUCCEEDED),
                (new_task("due"), TaskState.PENDING),
                (new_task("delayed", run_at=T0 + 1000), TaskState.PENDING),
            ],
        )
        untouched = {task_id: await backend.get(task_id) for task_id in ("s",)}
        cancelled = await backend.cancel(["due", "delayed", "a", "s", "ghost"], now=T0 + 70)
        assert cancelled == ["due", "delayed", "a"], (
            "the pending tasks cancelled and the active one asked to stop (see RunningRules), in order"
        )
        active = await _get(backend, "a")
        assert (active.state, active.finished_at) == (TaskState.ACTIVE, None), "an active task stays active"
        for task_id in ("due", "delayed"):
            record = await _get(backend, task_id)
            assert (record.state, record.finished_at, record.attempts) == (TaskState.CANCELLED, T0 + 70, 0)
        for task_id, before in untouched.items():
            assert await backend.get(task_id) == before, f"cancel must leave {task_id!r} as it is"
        assert await backend.get("ghost") is None
        assert await backend.claim(["default"], 10, now=T0 + 2000, lease_until=T0 + 3000) == []
        assert await backend.cancel(["due"], now=T0 + 80) == [], "a cancelled task is not cancelled again"
        assert (await _get(backend, "due")).finished_at == T0 + 70

    async def test_requeue_by_ids_moves_dead_and_cancelled_tasks_back_to_pending(
        self, backend: Backend
    ) -> None:
        await seed(
            backend,
            [
                (new_task("a"), TaskState.ACTIVE),
                (new_task("s"), TaskState.SUCCEEDED),
                (new_task("p", run_at=T0 + 500), TaskState.PENDING),
                (new_task("c"), TaskState.CANCELLED),
            ],
        )
        await backend.enqueue_many([new_task("d", queue="dq")])
        for attempt in range(3):  # three failed attempts, then dead
            now = T0 + 20 + attempt
            claimed = await claim_one(backend, "d", now=now, lease_until=now + 5)
            state = TaskState.DEAD if attempt == 2 else TaskState.PENDING
            verdict = Settlement(
                task_id="d", token=claimed.token, state=state, at=now, run_at=now, error=f"failure {attempt}"
            )
            assert await backend.settle([verdict]) == set()
        assert (await _get(backend, "d")).attempts == 3
        untouched = {task_id: await backend.get(task_id) for task_id in ("a", "s", "p")}
        assert await backend.requeue(["d", "c", "a", "s", "p", "ghost"], now=T0 + 50) == 2
        for task_id, last_error in (("d", "failure 2"), ("c", None)):
            record = await _get(backend, task_id)
            assert (record.state, record.attempts, record.run_at) == (TaskState.PENDING, 0, T0 + 50)
            assert record.last_error == last_error, "requeue keeps last_error"
            assert record.finished_at is None, "a requeued task is not finished"
        for task_id, before in untouched.items():
            assert await backend.get(task_id) == before, f"requeue must leave {task_id!r} as it is"
        requeued = await backend.claim(["dq", "default"], 10, now=T0 + 50, lease_until=T0 + 80)
        assert sorted(ids_of(requeued)) == ["c", "d"]
        assert {c.record.attempts for c in requeued} == {1}

    async def test_requeue_without_ids_moves_every_dead_task_of_the_queue(self, backend: Backend) -> None:
        await seed(
            backend,
            [
                (new_task("d1", queue="q1"), TaskState.DEAD),
                (new_task("d2", queue="q1"), TaskState.DEAD),
                (new_task("d3", queue="q2"), TaskState.DEAD),
                (new_task("c1", queue="q1"), TaskState.CANCELLED),
                (new_task("s1", queue="q1"), TaskState.SUCCEEDED),
            ],
        )
        assert await backend.requeue(None, queue="q1", now=T0 + 50) == 2
        assert normalise_stats(await backend.stats()) == {
            "q1": {TaskState.PENDING: 2, TaskState.CANCELLED: 1, TaskState.SUCCEEDED: 1},
            "q2": {TaskState.DEAD: 1},
        }, "without ids only DEAD tasks move, and only those of the queue given"
        assert await backend.requeue(now=T0 + 60) == 1
        record = await _get(backend, "d3")
        assert (record.state, record.attempts, record.run_at) == (TaskState.PENDING, 0, T0 + 60)
        assert await backend.requeue(now=T0 + 70) == 0

    async def test_purge_deletes_only_records_in_the_given_states(self, backend: Backend) -> None:
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
        assert await backend.purge(states=set()) == 0
        assert await backend.purge(states={TaskState.SUCCEEDED, TaskState.DEAD}) == 2
        assert await backend.get("s") is None
        assert await backend.get("d") is None
        assert normalise_stats(await backend.stats()) == {
            "default": {TaskState.ACTIVE: 1, TaskState.CANCELLED: 1, TaskState.PENDING: 1}
        }

    async def test_purge_deletes_only_records_of_the_given_queue(self, backend: Backend) -> None:
        await seed(
            backend,
            [
                (new_task("s1", queue="q1"), TaskState.SUCCEEDED),
                (new_task("s2", queue="q2"), TaskState.SUCCEEDED),
            ],
        )
        assert await backend.purge(states={TaskState.SUCCEEDED}, queue="q1") == 1
        assert await backend.get("s1") is None
        assert await backend.get("s2") is not None

    async def test_purge_before_compares_finished_at_or_else_enqueued_at(self, backend: Backend) -> None:
        await backend.enqueue_many([new_task("s-old"), new_task("s-new")])
        claimed = await backend.claim(["default"], 2, now=T0, lease_until=T0 + 100)
        finish = {"s-old": T0 + 10, "s-new": T0 + 20}
        verdicts = [
            Settlement(task_id=c.record.id, token=c.token, state=TaskState.SUCCEEDED, at=finish[c.record.id])
            for c in claimed
        ]
        assert await backend.settle(verdicts) == set()
        await backend.enqueue_many(
            [
                new_task("p-old", enqueued_at=T0 + 1, run_at=T0 + 900),
                new_task("p-new", enqueued_at=T0 + 20, run_at=T0 + 900),
            ]
        )
        # s-new was enqueued at T0, long before T0 + 20, but finished at T0 + 20: it must stay.
        assert await backend.purge(states={TaskState.SUCCEEDED, TaskState.PENDING}, before=T0 + 20) == 2
        assert await backend.get("s-old") is None
        assert await backend.get("p-old") is None
        assert await backend.get("s-new") is not None, "purge(before=t) deletes only times earlier than t"
        assert await backend.get("p-new") is not None, "purge(before=t) deletes only times earlier than t"

    async def test_purge_deletes_at_most_limit_records(self, backend: Backend) -> None:
        await seed(backend, [(new_task(f"s{n}"), TaskState.SUCCEEDED) for n in range(5)])
        assert await backend.purge(states={TaskState.SUCCEEDED}, limit=2) == 2
        assert len(await backend.list_records()) == 3
        assert await backend.purge(states={TaskState.SUCCEEDED}, limit=10) == 3
        assert await backend.list_records() == []
