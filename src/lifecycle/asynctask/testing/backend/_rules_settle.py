"""Conformance rules for :meth:`Backend.settle`: fields per verdict, lost leases, ``then`` follow-ups."""

from __future__ import annotations

from ..._backend import Backend
from ..._records import Settlement, TaskRecord, TaskState
from .._support import T0, OpenBackend, SuiteBase, assert_fresh_record, claim_one, new_task, seed

__all__ = ["SettleRules"]


async def _get(backend: Backend, task_id: str) -> TaskRecord:
    record = await backend.get(task_id)
    assert record is not None, f"get({task_id!r}) returned None for a stored task"
    return record


class SettleRules(SuiteBase):
    """``settle``: applies verdicts only under a held lease, atomically with their ``then`` tasks."""

    async def test_settle_succeeded_stores_the_result_and_the_finish_time(self, backend: Backend) -> None:
        await backend.enqueue_many([new_task("job")])
        claimed = await claim_one(backend, "job", now=T0 + 1, lease_until=T0 + 31)
        result = b"\x80\xff result \x00 bytes"
        verdict = Settlement(
            task_id="job", token=claimed.token, state=TaskState.SUCCEEDED, at=T0 + 2, result=result
        )
        assert await backend.settle([verdict]) == set()
        record = await _get(backend, "job")
        assert record.state is TaskState.SUCCEEDED
        assert (record.result, record.finished_at, record.attempts, record.started_at) == (
            result,
            T0 + 2,
            1,
            T0 + 1,
        )
        assert type(record.result) is bytes
        assert record.last_error is None
        assert record.lease_until is None, "lease_until is only set while a task is ACTIVE"
        assert record.payload == claimed.record.payload

    async def test_settle_succeeded_without_a_result_stores_none(self, backend: Backend) -> None:
        tokens = await seed(backend, [(new_task("job"), TaskState.ACTIVE)])
        verdict = Settlement(task_id="job", token=tokens["job"], state=TaskState.SUCCEEDED, at=T0 + 20)
        assert await backend.settle([verdict]) == set()
        record = await _get(backend, "job")
        assert (record.state, record.result, record.finished_at) == (TaskState.SUCCEEDED, None, T0 + 20)

    async def test_settle_dead_stores_the_error_and_the_finish_time(self, backend: Backend) -> None:
        tokens = await seed(backend, [(new_task("job"), TaskState.ACTIVE)])
        error = "Traceback (most recent call last):\n  ...\nValueError: boom ✗"
        verdict = Settlement(
            task_id="job", token=tokens["job"], state=TaskState.DEAD, at=T0 + 20, error=error
        )
        assert await backend.settle([verdict]) == set()
        record = await _get(backend, "job")
        assert (record.state, record.last_error, record.finished_at) == (TaskState.DEAD, error, T0 + 20)
        assert (record.attempts, record.lease_until, record.result) == (1, None, None)

    async def test_settle_pending_schedules_a_retry_at_run_at(self, backend: Backend) -> None:
        await backend.enqueue_many([new_task("job")])
        claimed = await claim_one(backend, "job", now=T0 + 1, lease_until=T0 + 31)
        retry = Settlement(
            task_id="job",
            token=claimed.token,
            state=TaskState.PENDING,
            at=T0 + 2,
            run_at=T0 + 50,
            error="try 1",
        )
        assert await backend.settle([retry]) == set()
        record = await _get(backend, "job")
        assert (record.state, record.run_at, record.attempts) == (TaskState.PENDING, T0 + 50, 1)
        assert (record.last_error, record.finished_at, record.lease_until) == ("try 1", None, None)
        assert await backend.claim(["default"], 10, now=T0 + 49, lease_until=T0 + 79) == []
        again = await claim_one(backend, "job", now=T0 + 50, lease_until=T0 + 80)
        assert (again.record.attempts, again.record.started_at) == (2, T0 + 50)

    async def test_settle_pending_with_refund_attempt_does_not_count_the_claim(
        self, backend: Backend
    ) -> None:
        await backend.enqueue_many([new_task("job")])
        first = await claim_one(backend, "job", now=T0 + 1, lease_until=T0 + 31)
        release = Settlement(
            task_id="job",
            token=first.token,
            state=TaskState.PENDING,
            at=T0 + 2,
            run_at=T0 + 2,
            refund_attempt=True,
        )
        assert await backend.settle([release]) == set()
        assert (await _get(backend, "job")).attempts == 0
        second = await claim_one(backend, "job", now=T0 + 3, lease_until=T0 + 33)
        assert second.record.attempts == 1
        retry = Settlement(
            task_id="job", token=second.token, state=TaskState.PENDING, at=T0 + 4, run_at=T0 + 4
        )
        assert await backend.settle([retry]) == set()
        third = await claim_one(backend, "job", now=T0 + 5, lease_until=T0 + 35)
        assert third.record.attempts == 2
        refund = Settlement(
            task_id="job",
            token=third.token,
            state=TaskState.PENDING,
            at=T0 + 6,
            run_at=T0 + 6,
            refund_attempt=True,
        )
        assert await backend.settle([refund]) == set()
        assert (await _get(backend, "job")).attempts == 1

    async def test_settle_replaces_last_error_only_when_an_error_is_given(self, backend: Backend) -> None:
        await backend.enqueue_many([new_task("job")])
        steps: list[tuple[TaskState, str | None, str | None]] = [
            (TaskState.PENDING, "first failure", "first failure"),
            (TaskState.PENDING, None, "first failure"),
            (TaskState.PENDING, "second failure", "second failure"),
            (TaskState.SUCCEEDED, None, "second failure"),
        ]
        for step, (state, error, expected) in enumerate(steps):
            now = T0 + 10 * (step + 1)
            claimed = await claim_one(backend, "job", now=now, lease_until=now + 5)
            verdict = Settlement(
                task_id="job", token=claimed.token, state=state, at=now + 1, run_at=now + 1, error=error
            )
            assert await backend.settle([verdict]) == set()
            assert (await _get(backend, "job")).last_error == expected, f"after step {step}"

    async def test_settle_with_a_wrong_token_is_ignored_and_reported(self, backend: Backend) -> None:
        tokens = await seed(backend, [(new_task("a"), TaskState.ACTIVE), (new_task("b"), TaskState.ACTIVE)])
        before = await _get(backend, "a")
        lost = await backend.settle(
            [
                Settlement(task_id="a", token="not-the-token", state=TaskState.SUCCEEDED, at=T0 + 20),
                Settlement(task_id="b", token=tokens["b"], state=TaskState.SUCCEEDED, at=T0 + 20),
                Settlement(
                    task_id="ghost", token="no-such-task", state=TaskState.DEAD, at=T0 + 20, error="x"
                ),
            ]
        )
        assert lost == {"a", "ghost"}
        assert await _get(backend, "a") == before, "a settlement under a wrong token must change nothing"
        assert (await _get(backend, "b")).state is TaskState.SUCCEEDED, "the valid settlement must be applied"
        assert await backend.get("ghost") is None

    async def test_settle_with_a_stale_token_after_a_reclaim_is_ignored(self, backend: Backend) -> None:
        await backend.enqueue_many([new_task("job")])
        old = await claim_one(backend, "job", now=T0 + 1, lease_until=T0 + 2)
        (new,) = await backend.reclaim_expired(now=T0 + 3, lease_until=T0 + 33, limit=1)
        stale = Settlement(task_id="job", token=old.token, state=TaskState.SUCCEEDED, at=T0 + 4)
        assert await backend.settle([stale]) == {"job"}
        assert (await _get(backend, "job")).state is TaskState.ACTIVE
        current = Settlement(task_id="job", token=new.token, state=TaskState.DEAD, at=T0 + 5, error="lost")
        assert await backend.settle([current]) == set()
        assert (await _get(backend, "job")).state is TaskState.DEAD

    async def test_a_settled_lease_cannot_be_settled_again(self, backend: Backend) -> None:
        await backend.enqueue_many([new_task("done"), new_task("retried", queue="other")])
        done = await claim_one(backend, "done", now=T0 + 1, lease_until=T0 + 31)
        retried = await claim_one(backend, "retried", now=T0 + 1, lease_until=T0 + 31)
        first = [
            Settlement(task_id="done", token=done.token, state=TaskState.SUCCEEDED, at=T0 + 2, result=b"r"),
            Settlement(
                task_id="retried", token=retried.token, state=TaskState.PENDING, at=T0 + 2, run_at=T0 + 9
            ),
        ]
        assert await backend.settle(first) == set()
        again = [
            Settlement(task_id="done", token=done.token, state=TaskState.DEAD, at=T0 + 3, error="late"),
            Settlement(task_id="retried", token=retried.token, state=TaskState.SUCCEEDED, at=T0 + 3),
        ]
        assert await backend.settle(again) == {"done", "retried"}
        done_record, retried_record = await _get(backend, "done"), await _get(backend, "retried")
        assert (done_record.state, done_record.result, done_record.last_error) == (
            TaskState.SUCCEEDED,
            b"r",
            None,
        )
        assert (retried_record.state, retried_record.run_at) == (TaskState.PENDING, T0 + 9)

    async def test_settle_of_nothing_loses_nothing(self, backend: Backend) -> None:
        assert await backend.settle([]) == set()

    async def test_settle_enqueues_its_then_tasks(self, open_backend: OpenBackend) -> None:
        worker = await open_backend()
        reader = await open_backend()
        tokens = await seed(worker, [(new_task("step1"), TaskState.ACTIVE)])
        follow_ups = (
            new_task("step2", queue="next", enqueued_at=T0 + 20, meta='{"chain": "c", "step": 2}'),
            new_task("step2b", queue="next", enqueued_at=T0 + 20, run_at=T0 + 30),
        )
        verdict = Settlement(
            task_id="step1", token=tokens["step1"], state=TaskState.SUCCEEDED, at=T0 + 20, then=follow_ups
        )
        assert await worker.settle([verdict]) == set()
        for task in follow_ups:
            assert_fresh_record(await reader.get(task.id), task)
        claimed = await reader.claim(["next"], 10, now=T0 + 30, lease_until=T0 + 60)
        assert [c.record.id for c in claimed] == ["step2", "step2b"]

    async def test_settle_skips_then_tasks_whose_id_exists_in_any_state(self, backend: Backend) -> None:
        tokens = await seed(
            backend,
            [
                (new_task("step1"), TaskState.ACTIVE),
                (new_task("exists-done", payload=b"old"), TaskState.SUCCEEDED),
                (new_task("exists-pending", payload=b"old", run_at=T0 + 500), TaskState.PENDING),
            ],
        )
        before = {task_id: await backend.get(task_id) for task_id in ("exists-done", "exists-pending")}
        fresh = new_task("fresh", enqueued_at=T0 + 20)
        follow_ups = (
            new_task("exists-done", payload=b"new", enqueued_at=T0 + 20),
            new_task("exists-pending", payload=b"new", enqueued_at=T0 + 20),
            fresh,
        )
        verdict = Settlement(
            task_id="step1", token=tokens["step1"], state=TaskState.SUCCEEDED, at=T0 + 20, then=follow_ups
        )
        assert await backend.settle([verdict]) == set(), "an existing follow-up id is skipped, not an error"
        assert (await _get(backend, "step1")).state is TaskState.SUCCEEDED
        for task_id, record in before.items():
            assert await backend.get(task_id) == record, (
                f"follow-up {task_id!r} exists and must be left alone"
            )
        assert_fresh_record(await backend.get("fresh"), fresh)

    async def test_settle_under_a_lost_lease_does_not_enqueue_its_then_tasks(self, backend: Backend) -> None:
        await seed(backend, [(new_task("step1"), TaskState.ACTIVE)])
        verdict = Settlement(
            task_id="step1",
            token="not-the-token",
            state=TaskState.SUCCEEDED,
            at=T0 + 20,
            then=(new_task("step2", enqueued_at=T0 + 20),),
        )
        assert await backend.settle([verdict]) == {"step1"}
        assert await backend.get("step2") is None, (
            "follow-ups belong to the settlement: not applied, not stored"
        )

    async def test_a_lease_taken_by_one_backend_object_is_settled_through_another(
        self, open_backend: OpenBackend
    ) -> None:
        claimer = await open_backend()
        settler = await open_backend()
        await claimer.enqueue_many([new_task("job")])
        claimed = await claim_one(claimer, "job", now=T0 + 1, lease_until=T0 + 31)
        assert await settler.extend_leases([("job", claimed.token)], lease_until=T0 + 61) == set()
        verdict = Settlement(task_id="job", token=claimed.token, state=TaskState.SUCCEEDED, at=T0 + 2)
        assert await settler.settle([verdict]) == set()
        assert (await _get(claimer, "job")).state is TaskState.SUCCEEDED
