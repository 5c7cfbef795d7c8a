"""Conformance rules for control of running work: :meth:`Backend.cancel` of ``ACTIVE`` tasks (a request their
worker acts on), :meth:`Backend.cancel_requests`, ``CANCELLED`` settlements, :meth:`Backend.save_progress`,
and the notices of a :class:`NotifyingBackend`.

Every state change is driven by explicit times (``T0`` plus offsets); only the notice rules use real time
(``wait_for_notices`` deals in it, like ``wait_for_work``), with generous bounds.
"""

from __future__ import annotations

import anyio
import pytest

from ..._backend import Backend, NotifyingBackend
from ..._records import Notice, ProgressUpdate, Settlement, TaskRecord, TaskState
from .._support import LEASE, T0, OpenBackend, SuiteBase, claim_one, new_task, seed

__all__ = ["RunningRules"]

NOTICE_WAIT = 20.0
"""The longest a notice rule waits for a notice that should come promptly (generous: a busy machine)."""


async def _get(backend: Backend, task_id: str) -> TaskRecord:
    record = await backend.get(task_id)
    assert record is not None, f"get({task_id!r}) returned None for a stored task"
    return record


def _progress(record: TaskRecord) -> tuple[float | None, float | None, str | None]:
    return record.progress_done, record.progress_total, record.progress_message


class RunningRules(SuiteBase):
    """Cancelling a running task is a stored request (``cancel_requested``) its worker polls and acts on;
    progress is stored under the lease and kept; a backend that can push tells every object about both."""

    # -- cancel of an active task ----------------------------------------------------------------------------

    async def test_cancel_asks_an_active_task_to_stop_and_cancels_a_pending_one_in_the_order_given(
        self, open_backend: OpenBackend
    ) -> None:
        operator = await open_backend()
        worker = await open_backend()
        tokens = await seed(
            operator,
            [
                (new_task("z-active"), TaskState.ACTIVE),
                (new_task("s"), TaskState.SUCCEEDED),
                (new_task("d"), TaskState.DEAD),
                (new_task("a-pending"), TaskState.PENDING),
                (new_task("c"), TaskState.CANCELLED),
            ],
        )
        final = {task_id: await operator.get(task_id) for task_id in ("s", "d", "c")}
        before = await _get(operator, "z-active")
        assert before.cancel_requested is False, "a task nobody asked to cancel has cancel_requested False"
        cancelled = await operator.cancel(["z-active", "s", "ghost", "a-pending", "d", "c"], now=T0 + 70)
        assert cancelled == ["z-active", "a-pending"], (
            "cancel() returns the active tasks it asked to stop and the pending tasks it cancelled, in the "
            "order given; final and unknown ids are left out"
        )
        active = await _get(worker, "z-active")
        assert (active.state, active.cancel_requested) == (TaskState.ACTIVE, True), (
            "an active task stays active with cancel_requested set: its worker stops it"
        )
        assert (active.attempts, active.started_at, active.lease_until, active.finished_at) == (
            before.attempts,
            before.started_at,
            before.lease_until,
            None,
        )
        assert await worker.extend_leases([("z-active", tokens["z-active"])], lease_until=T0 + 99) == set(), (
            "a cancel request does not take the lease away"
        )
        pending = await _get(worker, "a-pending")
        assert (pending.state, pending.finished_at) == (TaskState.CANCELLED, T0 + 70)
        for task_id, record in final.items():
            assert await worker.get(task_id) == record, f"cancel must leave the final {task_id!r} as it is"
        assert await operator.cancel(["z-active"], now=T0 + 80) == ["z-active"], (
            "asking an active task again is still a request, returned again"
        )
        assert (await _get(worker, "z-active")).state is TaskState.ACTIVE

    async def test_cancel_requests_lists_only_the_active_tasks_asked_to_stop(
        self, open_backend: OpenBackend
    ) -> None:
        operator = await open_backend()
        worker = await open_backend()
        tokens = await seed(
            operator,
            [
                (new_task("asked"), TaskState.ACTIVE),
                (new_task("asked-then-done"), TaskState.ACTIVE),
                (new_task("running"), TaskState.ACTIVE),
                (new_task("waiting"), TaskState.PENDING),
            ],
        )
        assert await worker.cancel_requests(["asked", "running", "waiting"]) == set()
        assert sorted(await operator.cancel(["asked", "asked-then-done"], now=T0 + 20)) == [
            "asked",
            "asked-then-done",
        ]
        done = Settlement(
            task_id="asked-then-done", token=tokens["asked-then-done"], state=TaskState.SUCCEEDED, at=T0 + 21
        )
        assert await worker.settle([done]) == set(), "a cancel request does not take the lease away"
        requests = await worker.cancel_requests(["asked", "asked-then-done", "running", "waiting", "ghost"])
        assert isinstance(requests, set)
        assert requests == {"asked"}, (
            "only ACTIVE tasks with cancel_requested: not a running task nobody asked about, not a finished "
            "one, not a pending or unknown id"
        )
        assert await worker.cancel_requests([]) == set()

    async def test_settle_cancelled_ends_the_task_like_dead(self, backend: Backend) -> None:
        tokens = await seed(
            backend, [(new_task("job"), TaskState.ACTIVE), (new_task("quiet"), TaskState.ACTIVE)]
        )
        assert sorted(await backend.cancel(["job", "quiet"], now=T0 + 20)) == ["job", "quiet"]
        verdicts = [
            Settlement(
                task_id="job", token=tokens["job"], state=TaskState.CANCELLED, at=T0 + 21, error="cancelled"
            ),
            Settlement(task_id="quiet", token=tokens["quiet"], state=TaskState.CANCELLED, at=T0 + 22),
        ]
        assert await backend.settle(verdicts) == set()
        record = await _get(backend, "job")
        assert (record.state, record.finished_at, record.last_error) == (
            TaskState.CANCELLED,
            T0 + 21,
            "cancelled",
        )
        assert (record.attempts, record.lease_until, record.result) == (1, None, None)
        assert record.cancel_requested is True, "the record keeps showing that its cancellation was asked"
        quiet = await _get(backend, "quiet")
        assert (quiet.state, quiet.finished_at, quiet.last_error) == (TaskState.CANCELLED, T0 + 22, None)
        assert await backend.cancel_requests(["job", "quiet"]) == set(), "a cancelled task is not active"
        again = Settlement(task_id="job", token=tokens["job"], state=TaskState.CANCELLED, at=T0 + 30)
        assert await backend.settle([again]) == {"job"}, "the lease ended with the settlement"
        assert await backend.cancel(["job"], now=T0 + 31) == [], "a cancelled task is final"

    async def test_settle_cancelled_needs_no_cancel_request(self, backend: Backend) -> None:
        tokens = await seed(backend, [(new_task("job"), TaskState.ACTIVE)])
        verdict = Settlement(task_id="job", token=tokens["job"], state=TaskState.CANCELLED, at=T0 + 21)
        assert await backend.settle([verdict]) == set()
        record = await _get(backend, "job")
        assert (record.state, record.cancel_requested) == (TaskState.CANCELLED, False)

    async def test_a_reclaimed_task_keeps_its_cancel_request(self, open_backend: OpenBackend) -> None:
        worker = await open_backend()
        recovery = await open_backend()
        await worker.enqueue_many([new_task("job")])
        first = await claim_one(worker, "job", now=T0 + 1, lease_until=T0 + 5)
        assert await worker.cancel(["job"], now=T0 + 2) == ["job"]
        (taken,) = await recovery.reclaim_expired(now=T0 + 10, lease_until=T0 + 40, limit=10)
        assert taken.record.id == "job"
        assert taken.record.cancel_requested is True, (
            "a reclaimed record shows the cancel request: recovery settles it cancelled, never retries it"
        )
        assert await recovery.cancel_requests(["job"]) == {"job"}
        stale = Settlement(task_id="job", token=first.token, state=TaskState.SUCCEEDED, at=T0 + 11)
        assert await worker.settle([stale]) == {"job"}
        verdict = Settlement(task_id="job", token=taken.token, state=TaskState.CANCELLED, at=T0 + 12)
        assert await recovery.settle([verdict]) == set()
        assert (await _get(worker, "job")).state is TaskState.CANCELLED

    async def test_a_task_settled_back_to_pending_keeps_its_cancel_request_until_it_ends(
        self, backend: Backend
    ) -> None:
        await backend.enqueue_many([new_task("job")])
        first = await claim_one(backend, "job", now=T0 + 1, lease_until=T0 + 31)
        assert await backend.cancel(["job"], now=T0 + 2) == ["job"]
        retry = Settlement(
            task_id="job", token=first.token, state=TaskState.PENDING, at=T0 + 3, run_at=T0 + 4, error="boom"
        )
        assert await backend.settle([retry]) == set()
        record = await _get(backend, "job")
        assert (record.state, record.cancel_requested) == (TaskState.PENDING, True), (
            "a verdict that raced the request (a retry, a release at shutdown) keeps it: the next claim "
            "hands the task out with cancel_requested set; the engine settles it cancelled without running it"
        )
        second = await claim_one(backend, "job", now=T0 + 4, lease_until=T0 + 34)
        assert second.record.cancel_requested is True
        assert await backend.cancel_requests(["job"]) == {"job"}

    async def test_requeue_clears_the_cancel_request(self, backend: Backend) -> None:
        tokens = await seed(backend, [(new_task("job"), TaskState.ACTIVE)])
        assert await backend.cancel(["job"], now=T0 + 20) == ["job"]
        verdict = Settlement(task_id="job", token=tokens["job"], state=TaskState.CANCELLED, at=T0 + 21)
        assert await backend.settle([verdict]) == set()
        assert await backend.requeue(["job"], now=T0 + 30) == 1
        record = await _get(backend, "job")
        assert (record.state, record.cancel_requested) == (TaskState.PENDING, False)
        again = await claim_one(backend, "job", now=T0 + 30, lease_until=T0 + 60)
        assert again.record.cancel_requested is False, "a requeued task runs as a new one"
        assert await backend.cancel_requests(["job"]) == set()

    async def test_cancel_of_an_active_task_drops_its_debounce_follow_up(self, backend: Backend) -> None:
        await backend.enqueue_many([new_task("job")])
        running = await claim_one(backend, "job", now=T0 + 1, lease_until=T0 + 31)
        follow_up = new_task("job", enqueued_at=T0 + 2, payload=b"later")
        assert await backend.enqueue_many([follow_up], if_exists="debounce") == ["job"]
        assert await backend.cancel(["job"], now=T0 + 3) == ["job"]
        verdict = Settlement(task_id="job", token=running.token, state=TaskState.CANCELLED, at=T0 + 4)
        assert await backend.settle([verdict]) == set()
        record = await _get(backend, "job")
        assert (record.state, record.payload) == (TaskState.CANCELLED, running.record.payload), (
            "the follow-up run goes with the cancelled task"
        )
        assert await backend.claim(["default"], 10, now=T0 + 100, lease_until=T0 + 130) == []

    # -- progress --------------------------------------------------------------------------------------------

    async def test_save_progress_stores_the_last_update_under_a_held_lease(
        self, open_backend: OpenBackend
    ) -> None:
        worker = await open_backend()
        reader = await open_backend()
        tokens = await seed(
            worker, [(new_task("job"), TaskState.ACTIVE), (new_task("other"), TaskState.ACTIVE)]
        )
        assert _progress(await _get(reader, "job")) == (None, None, None), "no progress until one is saved"
        first = ProgressUpdate("job", tokens["job"], done=0.1, total=3e10, message="½ done ✓")
        assert await worker.save_progress([first]) == set()
        assert _progress(await _get(reader, "job")) == (0.1, 3e10, "½ done ✓")
        updates = [
            ProgressUpdate("job", tokens["job"], done=7.0, total=None, message=None),
            ProgressUpdate("other", tokens["other"], done=None, total=None, message="starting"),
            ProgressUpdate("job", tokens["job"], done=8.5, total=10.0, message="almost"),
        ]
        assert await worker.save_progress(updates) == set()
        assert _progress(await _get(reader, "job")) == (8.5, 10.0, "almost"), "the last update of a task wins"
        assert _progress(await _get(reader, "other")) == (None, None, "starting"), "None is stored as given"
        record = await _get(reader, "job")
        assert (record.state, record.attempts) == (TaskState.ACTIVE, 1), "progress changes nothing else"
        assert await worker.save_progress([]) == set()

    async def test_save_progress_without_the_lease_changes_nothing(self, open_backend: OpenBackend) -> None:
        worker = await open_backend()
        recovery = await open_backend()
        await worker.enqueue_many([new_task("job"), new_task("waiting", run_at=T0 + 500)])
        first = await claim_one(worker, "job", now=T0 + 1, lease_until=T0 + 5)
        assert await worker.save_progress([ProgressUpdate("job", first.token, 1.0, 4.0, "one")]) == set()
        (taken,) = await recovery.reclaim_expired(now=T0 + 10, lease_until=T0 + 40, limit=10)
        updates = [
            ProgressUpdate("job", first.token, 2.0, 4.0, "stale"),
            ProgressUpdate("waiting", "no-such-token", 1.0, 1.0, "pending"),
            ProgressUpdate("ghost", "no-such-token", 1.0, 1.0, "unknown"),
        ]
        assert await worker.save_progress(updates) == {"job", "waiting", "ghost"}, (
            "an update whose lease is not held (taken over, a pending task, an unknown id) is not applied"
        )
        assert _progress(await _get(recovery, "job")) == (1.0, 4.0, "one")
        assert _progress(await _get(recovery, "waiting")) == (None, None, None)
        assert await recovery.get("ghost") is None
        assert await recovery.save_progress([ProgressUpdate("job", taken.token, 3.0, 4.0, "new")]) == set()
        assert _progress(await _get(worker, "job")) == (3.0, 4.0, "new")

    async def test_progress_is_kept_after_the_task_ends(self, backend: Backend) -> None:
        tokens = await seed(
            backend,
            [(new_task("done"), TaskState.ACTIVE), (new_task("failed"), TaskState.ACTIVE)],
        )
        updates = [
            ProgressUpdate("done", tokens["done"], 10.0, 10.0, "all"),
            ProgressUpdate("failed", tokens["failed"], 2.0, 10.0, "stuck"),
        ]
        assert await backend.save_progress(updates) == set()
        verdicts = [
            Settlement(task_id="done", token=tokens["done"], state=TaskState.SUCCEEDED, at=T0 + 20),
            Settlement(task_id="failed", token=tokens["failed"], state=TaskState.DEAD, at=T0 + 20, error="x"),
        ]
        assert await backend.settle(verdicts) == set()
        assert _progress(await _get(backend, "done")) == (10.0, 10.0, "all")
        assert _progress(await _get(backend, "failed")) == (2.0, 10.0, "stuck")
        late = ProgressUpdate("done", tokens["done"], 11.0, 10.0, "late")
        assert await backend.save_progress([late]) == {"done"}, "a finished task's lease is gone"
        assert _progress(await _get(backend, "done")) == (10.0, 10.0, "all")
        listed = {record.id: record for record in await backend.list_records()}
        assert _progress(listed["failed"]) == (2.0, 10.0, "stuck"), "list_records() shows progress too"
        await backend.enqueue_many([new_task("done", enqueued_at=T0 + 30)])
        assert _progress(await _get(backend, "done")) == (None, None, None), (
            "a new task replacing a finished record with its id starts without progress"
        )

    async def test_save_progress_takes_a_thousand_updates_in_one_call(self, backend: Backend) -> None:
        count = 1000
        await backend.enqueue_many([new_task(f"t{n:04d}") for n in range(count)])
        claimed = await backend.claim(["default"], count, now=T0 + 1, lease_until=T0 + 1 + LEASE)
        assert len(claimed) == count
        updates = [
            ProgressUpdate(c.record.id, c.token, float(n), float(count), None) for n, c in enumerate(claimed)
        ]
        assert await backend.save_progress(updates) == set()
        for n in (0, count // 2, count - 1):
            record = await _get(backend, claimed[n].record.id)
            assert _progress(record) == (float(n), float(count), None)

    # -- notices (a NotifyingBackend) ------------------------------------------------------------------------

    async def _listener(self, open_backend: OpenBackend) -> NotifyingBackend:
        listener = await open_backend()
        if not isinstance(listener, NotifyingBackend):
            pytest.skip("the backend does not push notices (it is not a NotifyingBackend)")
        await listener.wait_for_notices(timeout=0)  # from here on, every notice is delivered
        return listener

    async def _collect(self, listener: NotifyingBackend, expected: list[Notice]) -> list[Notice]:
        """The notices received until every one of ``expected`` was seen (bounded by :data:`NOTICE_WAIT`)."""
        seen: list[Notice] = []
        with anyio.move_on_after(NOTICE_WAIT):
            while not all(notice in seen for notice in expected):
                batch = await listener.wait_for_notices(timeout=NOTICE_WAIT)
                assert isinstance(batch, list)
                for notice in batch:
                    assert isinstance(notice, Notice), (
                        f"wait_for_notices() must return Notices, got {notice!r}"
                    )
                seen += batch
        missing = [notice for notice in expected if notice not in seen]
        assert not missing, f"not pushed within {NOTICE_WAIT:g} s: {missing} (received {seen})"
        return seen

    async def test_cancel_requests_and_verdicts_are_pushed_to_every_object(
        self, open_backend: OpenBackend
    ) -> None:
        listener = await self._listener(open_backend)
        actor = await open_backend()
        await actor.enqueue_many([new_task("run"), new_task("finish"), new_task("later", run_at=T0 + 500)])
        claimed = {
            c.record.id: c for c in await actor.claim(["default"], 10, now=T0 + 1, lease_until=T0 + 31)
        }
        assert sorted(claimed) == ["finish", "run"]
        assert await actor.cancel(["run"], now=T0 + 2) == ["run"]
        done = Settlement(
            task_id="finish", token=claimed["finish"].token, state=TaskState.SUCCEEDED, at=T0 + 3
        )
        assert await actor.settle([done]) == set()
        assert await actor.cancel(["later"], now=T0 + 4) == ["later"]
        expected = [Notice("cancel", "run"), Notice("settled", "finish"), Notice("settled", "later")]
        seen = await self._collect(listener, expected)
        positions = [seen.index(notice) for notice in expected]
        assert positions == sorted(positions), f"notices of one sender arrive in the order sent: {seen}"
        assert Notice("cancel", "later") not in seen, (
            "a pending task's cancellation is a verdict, not a request"
        )

    async def test_retries_and_cancelled_settlements_are_pushed_as_settled(
        self, open_backend: OpenBackend
    ) -> None:
        listener = await self._listener(open_backend)
        actor = await open_backend()
        await actor.enqueue_many([new_task("retry"), new_task("stop")])
        claimed = {
            c.record.id: c for c in await actor.claim(["default"], 10, now=T0 + 1, lease_until=T0 + 31)
        }
        verdicts = [
            Settlement(
                task_id="retry",
                token=claimed["retry"].token,
                state=TaskState.PENDING,
                at=T0 + 2,
                run_at=T0 + 9,
            ),
            Settlement(task_id="stop", token=claimed["stop"].token, state=TaskState.CANCELLED, at=T0 + 2),
        ]
        assert await actor.settle(verdicts) == set()
        await self._collect(listener, [Notice("settled", "retry"), Notice("settled", "stop")])

    async def test_wait_for_notices_returns_an_empty_list_after_its_timeout(
        self, open_backend: OpenBackend
    ) -> None:
        listener = await self._listener(open_backend)
        with anyio.fail_after(NOTICE_WAIT):
            while await listener.wait_for_notices(timeout=0.05):
                pass  # whatever an earlier rule of this storage left behind
        started = anyio.current_time()
        with anyio.fail_after(NOTICE_WAIT):
            assert await listener.wait_for_notices(timeout=0.2) == []
        assert anyio.current_time() - started >= 0.15, "it waits up to the timeout for a first notice"
