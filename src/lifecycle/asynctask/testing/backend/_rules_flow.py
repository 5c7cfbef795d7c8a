"""Conformance rules for flow control: priorities, paused queues, rate and concurrency limits checked in the
claim, expiry, uniqueness windows, debounce, and :meth:`Backend.flow_state`.

Every rule is driven by explicit times (``T0`` plus offsets): token buckets refill by the ``now`` the claim is
given, never by the real clock. Limits are checked "across every caller", so the rules that matter for
several processes use several backend objects over the same storage.
"""

from __future__ import annotations

from collections.abc import Mapping

import anyio
import anyio.lowlevel
import pytest

from ..._backend import Backend
from ..._errors import DuplicateTaskError
from ..._records import ClaimedTask, FlowLimits, FlowState, Settlement, TaskRecord, TaskState
from .._support import LEASE, T0, OpenBackend, SuiteBase, assert_fresh_record, ids_of, new_task

__all__ = ["FlowRules"]

LIMITED = "suite.limited"
"""The task name the rules put limits on; ``new_task``'s default name (``suite.job``) stays unlimited."""

EXPIRED = "expired before it started"
"""The ``last_error`` of a task the claim cancelled because its ``expires_at`` passed."""


async def _get(backend: Backend, task_id: str) -> TaskRecord:
    record = await backend.get(task_id)
    assert record is not None, f"get({task_id!r}) returned None"
    return record


async def _claim(
    backend: Backend,
    limits: Mapping[str, FlowLimits] | None,
    now: float,
    limit: int = 10,
    queues: tuple[str, ...] = ("default",),
) -> list[ClaimedTask]:
    return await backend.claim(list(queues), limit, now=now, lease_until=now + LEASE, limits=limits)


def _done(claimed: ClaimedTask, at: float, state: TaskState = TaskState.SUCCEEDED) -> Settlement:
    error = "seeded dead" if state is TaskState.DEAD else None
    return Settlement(task_id=claimed.record.id, token=claimed.token, state=state, at=at, error=error)


def _by_id(claimed: list[ClaimedTask]) -> dict[str, ClaimedTask]:
    return {c.record.id: c for c in claimed}


class FlowRules(SuiteBase):
    """Flow control: what ``claim`` takes (priority, pauses, limits, expiry) and what ``enqueue_many`` refuses
    or merges (uniqueness windows, debounce), all in the same atomic step as the claim or the enqueue."""

    # -- the new fields --------------------------------------------------------------------------------------

    async def test_priority_key_and_expiry_are_stored_and_returned(self, open_backend: OpenBackend) -> None:
        producer = await open_backend()
        reader = await open_backend()
        tasks = [
            new_task("urgent", priority=7, concurrency_key="user:1", expires_at=T0 + 30.5),
            new_task("behind", priority=-3, concurrency_key="", enqueued_at=T0 + 1),
            new_task("plain", enqueued_at=T0 + 2),
        ]
        assert await producer.enqueue_many(tasks) == ["urgent", "behind", "plain"]
        for task in tasks:
            assert_fresh_record(await reader.get(task.id), task)
        claimed = _by_id(await _claim(reader, None, T0 + 5))
        assert (claimed["urgent"].record.priority, claimed["urgent"].record.concurrency_key) == (7, "user:1")
        assert claimed["urgent"].record.expires_at == T0 + 30.5
        assert (claimed["behind"].record.priority, claimed["behind"].record.concurrency_key) == (-3, "")
        assert (claimed["plain"].record.priority, claimed["plain"].record.concurrency_key) == (0, None)

    # -- priorities ------------------------------------------------------------------------------------------

    async def test_claim_takes_the_highest_priority_first_then_the_earliest_run_at_then_enqueue_order(
        self, backend: Backend
    ) -> None:
        expected = ["high-a", "high-b", "mid-early", "mid-late", "low"]
        for queue in ("one-by-one", "batch"):
            await backend.enqueue_many(
                [
                    new_task(f"{queue}:low", queue=queue, priority=-1),
                    new_task(f"{queue}:mid-late", queue=queue, run_at=T0 + 2),
                    new_task(f"{queue}:top-later", queue=queue, priority=9, run_at=T0 + 100),
                    new_task(f"{queue}:high-a", queue=queue, priority=5, enqueued_at=T0 + 1, run_at=T0 + 2),
                ]
            )
            await backend.enqueue_many(
                [
                    new_task(f"{queue}:mid-early", queue=queue, enqueued_at=T0 + 1, run_at=T0 + 1),
                    new_task(f"{queue}:high-b", queue=queue, priority=5, enqueued_at=T0 + 2, run_at=T0 + 2),
                ]
            )
        one_by_one: list[str] = []
        for _ in expected:
            claimed = await _claim(backend, None, T0 + 10, limit=1, queues=("one-by-one",))
            one_by_one += [task_id.split(":")[1] for task_id in ids_of(claimed)]
        assert one_by_one == expected, "higher priority first; equal priorities by run_at, then enqueue order"
        batch = await _claim(backend, None, T0 + 10, queues=("batch",))
        assert [task_id.split(":")[1] for task_id in ids_of(batch)] == expected
        assert await _claim(backend, None, T0 + 99, queues=("one-by-one", "batch")) == [], (
            "a high priority does not make a task due before its run_at"
        )
        later = await _claim(backend, None, T0 + 100, queues=("one-by-one", "batch"))
        assert ids_of(later) == ["one-by-one:top-later", "batch:top-later"]

    async def test_queue_order_comes_before_task_priority(self, backend: Backend) -> None:
        await backend.enqueue_many(
            [new_task("urgent-elsewhere", queue="second", priority=100), new_task("plain", queue="first")]
        )
        first = await _claim(backend, None, T0 + 1, limit=1, queues=("first", "second"))
        assert ids_of(first) == ["plain"], "queues[0] is emptied first, whatever the priorities"
        assert ids_of(await _claim(backend, None, T0 + 1, queues=("first", "second"))) == ["urgent-elsewhere"]

    # -- pause -----------------------------------------------------------------------------------------------

    async def test_a_paused_queue_is_skipped_by_every_caller_until_it_is_resumed(
        self, open_backend: OpenBackend
    ) -> None:
        operator = await open_backend()
        worker = await open_backend()
        assert await worker.paused() == set()
        await operator.enqueue_many([new_task("held-1", queue="held"), new_task("free-1", queue="free")])
        await operator.pause("held")
        await operator.pause("held")  # idempotent
        assert await worker.paused() == {"held"}, "a pause is stored: every backend object sees it"
        assert isinstance(await worker.paused(), set)
        assert ids_of(await _claim(worker, None, T0 + 1, queues=("held", "free"))) == ["free-1"]

        await worker.enqueue_many([new_task("held-2", queue="held", enqueued_at=T0 + 1)])
        assert (await _get(operator, "held-2")).state is TaskState.PENDING, (
            "enqueue into a paused queue works"
        )
        await operator.close()
        later = await open_backend()  # a worker started later, after the pausing process went away
        assert await later.paused() == {"held"}, "a pause outlives the object (the process) that made it"
        assert await _claim(later, None, T0 + 2, queues=("held", "free")) == []
        assert (await _get(later, "held-1")).attempts == 0, "a task of a paused queue is left untouched"

        await later.pause("other")
        await later.resume("held")
        await later.resume("held")  # idempotent
        await later.resume("never-paused")
        assert await worker.paused() == {"other"}
        assert ids_of(await _claim(worker, None, T0 + 3, queues=("held", "free"))) == ["held-1", "held-2"]
        await worker.resume("other")
        assert await later.paused() == set()

    # -- the rate limit --------------------------------------------------------------------------------------

    async def test_a_rate_limit_bucket_starts_full_and_holds_the_rest_pending_without_blocking_others(
        self, open_backend: OpenBackend
    ) -> None:
        first = await open_backend()
        second = await open_backend()
        limits = {LIMITED: FlowLimits(rate=2, per=8.0)}  # a token every 4 s, at most 2 in the bucket
        await first.enqueue_many(
            [new_task(f"r{n}", name=LIMITED) for n in range(6)] + [new_task("o0"), new_task("o1")]
        )
        claimed = await _claim(first, limits, T0, limit=4)
        assert ids_of(claimed) == ["r0", "r1", "o0", "o1"], (
            "the bucket starts full (2 tokens); the held tasks stay pending and the claim goes on with the "
            "tasks of other names behind them, filling the batch"
        )
        held = await _get(second, "r2")
        assert (held.state, held.attempts, held.started_at, held.lease_until) == (
            TaskState.PENDING,
            0,
            None,
            None,
        )

        assert await _claim(second, limits, T0 + 3.5) == [], "0.875 tokens: not one whole token yet"
        assert ids_of(await _claim(second, limits, T0 + 4)) == ["r2"], "one token refilled after 4 s"
        assert await _claim(first, limits, T0 + 4) == [], (
            "the bucket is stored: the other object took its token"
        )
        assert ids_of(await _claim(first, limits, T0 + 1000)) == ["r3", "r4"], (
            "the bucket holds at most `rate`"
        )
        assert await _claim(second, limits, T0 + 1000) == []
        assert ids_of(await _claim(second, None, T0 + 1000)) == ["r5"], "limits=None: nothing is held back"
        state = await first.flow_state(LIMITED, None, now=T0 + 1000, limits=limits[LIMITED])
        assert state.refused == 6, (
            "every claim (of either object) that held back a due task for want of a token counts once"
        )

    async def test_flow_state_reports_the_bucket_refilled_at_now_and_changes_nothing(
        self, open_backend: OpenBackend
    ) -> None:
        worker = await open_backend()
        reader = await open_backend()
        rated = FlowLimits(rate=2, per=8.0)
        limits = {LIMITED: rated}
        state = await reader.flow_state(LIMITED, None, now=T0, limits=rated)
        assert isinstance(state, FlowState)
        assert state == FlowState(running=0, running_for_key=0, tokens=2.0), "a bucket never used is full"
        await worker.enqueue_many([new_task(f"r{n}", name=LIMITED) for n in range(4)])
        assert len(await _claim(worker, limits, T0)) == 2
        assert await reader.flow_state(LIMITED, None, now=T0, limits=rated) == FlowState(2, 0, 0.0, refused=1)
        at_two = await reader.flow_state(LIMITED, None, now=T0 + 2, limits=rated)
        assert at_two.tokens == pytest.approx(0.5)
        capped = await reader.flow_state(LIMITED, None, now=T0 + 100, limits=rated)
        assert capped.tokens == pytest.approx(2.0), "the bucket holds at most `rate` tokens"
        assert await _claim(worker, limits, T0 + 2) == [], (
            "flow_state() must not store the refill it computed (a claim at an earlier now found 2 tokens)"
        )
        unrated = await reader.flow_state(LIMITED, None, now=T0, limits=FlowLimits(max_running=5))
        assert unrated == FlowState(running=2, running_for_key=0, tokens=None), "no rate: tokens is None"

    # -- max_running, max_running_per_key --------------------------------------------------------------------

    async def test_max_running_holds_across_every_caller_and_a_settlement_gives_the_slot_back(
        self, open_backend: OpenBackend
    ) -> None:
        first = await open_backend()
        second = await open_backend()
        limits = {LIMITED: FlowLimits(max_running=2)}
        await first.enqueue_many([new_task(f"r{n}", name=LIMITED) for n in range(4)] + [new_task("other")])
        claimed = await _claim(first, limits, T0 + 1)
        assert ids_of(claimed) == ["r0", "r1", "other"]
        assert await _claim(second, limits, T0 + 1) == [], "2 of the name are active: the others stay pending"
        r0, r1 = claimed[0], claimed[1]
        assert await second.settle([_done(r0, T0 + 2)]) == set()
        assert ids_of(await _claim(second, limits, T0 + 3)) == ["r2"], "a settled task gives its slot back"
        assert await _claim(first, limits, T0 + 3) == []
        release = Settlement(task_id="r1", token=r1.token, state=TaskState.PENDING, at=T0 + 4, run_at=T0 + 4)
        assert await first.settle([release]) == set()
        assert ids_of(await _claim(first, limits, T0 + 5)) == ["r3"], "one slot: the earliest run_at first"

    async def test_max_running_per_key_limits_each_key_and_leaves_keyless_tasks_alone(
        self, open_backend: OpenBackend
    ) -> None:
        first = await open_backend()
        second = await open_backend()
        limits = {LIMITED: FlowLimits(max_running_per_key=1)}
        await first.enqueue_many(
            [
                new_task("k1-a", name=LIMITED, concurrency_key="k1"),
                new_task("k1-b", name=LIMITED, concurrency_key="k1"),
                new_task("k2-a", name=LIMITED, concurrency_key="k2"),
                new_task("free-a", name=LIMITED),
                new_task("other-k1", concurrency_key="k1"),
                new_task("free-b", name=LIMITED),
                new_task("k2-b", name=LIMITED, concurrency_key="k2"),
            ]
        )
        claimed = _by_id(await _claim(first, limits, T0 + 1))
        assert list(claimed) == ["k1-a", "k2-a", "free-a", "other-k1", "free-b"], (
            "one per key at once; tasks without a key, and tasks of names without limits, are not held"
        )
        assert await _claim(second, limits, T0 + 1) == []
        assert await second.settle([_done(claimed["k1-a"], T0 + 2)]) == set()
        assert ids_of(await _claim(second, limits, T0 + 3)) == ["k1-b"], "the key's slot came back"
        state = await first.flow_state(LIMITED, "k2", now=T0 + 3, limits=limits[LIMITED])
        assert state == FlowState(running=4, running_for_key=1, tokens=None)
        assert (
            await first.flow_state(LIMITED, None, now=T0 + 3, limits=limits[LIMITED])
        ).running_for_key == 0
        assert (
            await first.flow_state(LIMITED, "k9", now=T0 + 3, limits=limits[LIMITED])
        ).running_for_key == 0

    async def test_limits_combine_and_each_holds_back_its_tasks(self, backend: Backend) -> None:
        limits = {LIMITED: FlowLimits(rate=3, per=60.0, max_running=2, max_running_per_key=1)}
        await backend.enqueue_many(
            [
                new_task("k1-a", name=LIMITED, concurrency_key="k1"),
                new_task("k1-b", name=LIMITED, concurrency_key="k1"),
                new_task("k2-a", name=LIMITED, concurrency_key="k2"),
                new_task("k3-a", name=LIMITED, concurrency_key="k3"),
            ]
        )
        claimed = await _claim(backend, limits, T0)
        assert ids_of(claimed) == ["k1-a", "k2-a"], "k1-b waits on its key, k3-a on max_running"
        assert await backend.settle([_done(c, T0 + 1) for c in claimed]) == set()
        assert ids_of(await _claim(backend, limits, T0 + 1)) == ["k1-b"], (
            "the third token; k3-a then finds the bucket empty"
        )
        assert await _claim(backend, limits, T0 + 2) == []
        assert ids_of(await _claim(backend, limits, T0 + 30)) == ["k3-a"], "1.5 tokens again"

    async def test_a_lease_reclaimed_after_it_expired_keeps_one_slot_until_it_is_settled(
        self, open_backend: OpenBackend
    ) -> None:
        dead_worker = await open_backend()
        survivor = await open_backend()
        limits = {LIMITED: FlowLimits(max_running=2, max_running_per_key=1)}
        await dead_worker.enqueue_many(
            [
                new_task("lost", name=LIMITED, concurrency_key="k"),
                new_task("same-key", name=LIMITED, concurrency_key="k"),
                new_task("b", name=LIMITED),
                new_task("c", name=LIMITED),
            ]
        )
        (lost,) = await dead_worker.claim(["default"], 1, now=T0, lease_until=T0 + 30, limits=limits)
        assert lost.record.id == "lost"
        reclaimed = await survivor.reclaim_expired(now=T0 + 40, lease_until=T0 + 70, limit=10)
        assert ids_of(reclaimed) == ["lost"]
        assert ids_of(await _claim(survivor, limits, T0 + 40)) == ["b"], (
            "a reclaimed task is still active and counts once: one slot of 2 left, and none for its key"
        )
        stale = Settlement(task_id="lost", token=lost.token, state=TaskState.SUCCEEDED, at=T0 + 41)
        assert await dead_worker.settle([stale]) == {"lost"}, "the dead worker's token is no longer held"
        assert await _claim(survivor, limits, T0 + 41) == [], "a lost settlement gives no slot back"
        retry = Settlement(
            task_id="lost", token=reclaimed[0].token, state=TaskState.PENDING, at=T0 + 42, run_at=T0 + 500
        )
        assert await survivor.settle([retry]) == set()
        assert ids_of(await _claim(survivor, limits, T0 + 43)) == ["same-key"], (
            "the settlement after the reclaim gives back the slot and the key's slot"
        )
        state = await survivor.flow_state(LIMITED, "k", now=T0 + 43, limits=limits[LIMITED])
        assert state == FlowState(running=2, running_for_key=1, tokens=None), (
            "nothing counted twice or leaked"
        )

    async def test_concurrent_claimers_never_exceed_the_limits(self, open_backend: OpenBackend) -> None:
        backends = [await open_backend() for _ in range(3)]
        limits = {
            "suite.capped": FlowLimits(max_running=5),
            "suite.rated": FlowLimits(rate=7, per=3600.0),
            "suite.keyed": FlowLimits(max_running_per_key=1),
        }
        tasks = [new_task(f"cap{n:02d}", name="suite.capped") for n in range(30)]
        tasks += [new_task(f"rate{n:02d}", name="suite.rated") for n in range(30)]
        tasks += [new_task(f"key{n:02d}", name="suite.keyed", concurrency_key=f"k{n % 4}") for n in range(30)]
        await backends[0].enqueue_many(tasks)
        claimed: list[ClaimedTask] = []

        async def claimer(backend: Backend) -> None:
            while batch := await backend.claim(["default"], 2, now=T0, lease_until=T0 + LEASE, limits=limits):
                claimed.extend(batch)
                await anyio.lowlevel.checkpoint()

        with anyio.fail_after(60):
            async with anyio.create_task_group() as group:
                for backend in backends:
                    for _ in range(3):
                        group.start_soon(claimer, backend)
        names = [c.record.name for c in claimed]
        assert names.count("suite.capped") == 5, "max_running=5 across every caller"
        assert names.count("suite.rated") == 7, "a bucket of 7 tokens across every caller"
        keys = sorted(c.record.concurrency_key or "" for c in claimed if c.record.name == "suite.keyed")
        assert keys == ["k0", "k1", "k2", "k3"], "one task per key across every caller"
        assert len({c.record.id for c in claimed}) == len(claimed), "no task claimed twice"

    # -- expiry ----------------------------------------------------------------------------------------------

    async def test_a_due_task_past_its_expiry_is_cancelled_by_the_claim_instead_of_started(
        self, open_backend: OpenBackend
    ) -> None:
        worker = await open_backend()
        reader = await open_backend()
        await worker.enqueue_many(
            [
                new_task("stale", expires_at=T0 + 10),
                new_task("fresh", expires_at=T0 + 10.5),
                new_task("forever"),
                new_task("later", run_at=T0 + 50, expires_at=T0 + 15),
            ]
        )
        assert ids_of(await _claim(worker, None, T0 + 10)) == ["fresh", "forever"], (
            "a task whose expires_at <= now is never started"
        )
        stale = await _get(reader, "stale")
        assert (stale.state, stale.attempts, stale.finished_at) == (TaskState.CANCELLED, 0, T0 + 10)
        assert (stale.last_error, stale.started_at, stale.lease_until) == (EXPIRED, None, None)
        later = await _get(reader, "later")
        assert later.state is TaskState.PENDING, (
            "a task not due yet is left alone by the claim, expired or not"
        )
        assert await _claim(worker, None, T0 + 50) == []
        later = await _get(reader, "later")
        assert (later.state, later.finished_at, later.last_error) == (TaskState.CANCELLED, T0 + 50, EXPIRED)

    async def test_expiry_keeps_the_attempts_of_a_task_waiting_for_a_retry(self, backend: Backend) -> None:
        await backend.enqueue_many([new_task("flaky", expires_at=T0 + 20)])
        (claimed,) = await _claim(backend, None, T0)
        retry = Settlement(
            task_id="flaky",
            token=claimed.token,
            state=TaskState.PENDING,
            at=T0 + 1,
            run_at=T0 + 30,
            error="boom",
        )
        assert await backend.settle([retry]) == set()
        assert await _claim(backend, None, T0 + 30) == []
        record = await _get(backend, "flaky")
        assert (record.state, record.attempts, record.last_error) == (TaskState.CANCELLED, 1, EXPIRED)

    async def test_expired_tasks_take_no_room_in_the_batch_and_no_token_or_slot(
        self, backend: Backend
    ) -> None:
        limits = {LIMITED: FlowLimits(rate=1, per=60.0, max_running=1)}
        await backend.enqueue_many(
            [new_task(f"gone{n}", name=LIMITED, priority=1, expires_at=T0 + 5) for n in range(3)]
            + [new_task("kept", name=LIMITED), new_task("other")]
        )
        assert ids_of(await _claim(backend, limits, T0 + 10, limit=2)) == ["kept", "other"]
        states = {r.id: r.state for r in await backend.list_records()}
        assert states == {
            "gone0": TaskState.CANCELLED,
            "gone1": TaskState.CANCELLED,
            "gone2": TaskState.CANCELLED,
            "kept": TaskState.ACTIVE,
            "other": TaskState.ACTIVE,
        }

    # -- uniqueness windows ----------------------------------------------------------------------------------

    async def test_a_uniqueness_window_refuses_an_equal_task_until_it_ends_even_after_the_first_finished(
        self, open_backend: OpenBackend
    ) -> None:
        first = await open_backend()
        second = await open_backend()
        await first.enqueue_many([new_task("u1", unique_key="report", unique_until=T0 + 60)])
        (claimed,) = await _claim(first, None, T0 + 1)
        assert await first.settle([_done(claimed, T0 + 2)]) == set()

        with pytest.raises(DuplicateTaskError) as raised:
            await second.enqueue_many(
                [
                    new_task("unrelated", enqueued_at=T0 + 30),
                    new_task("u2", unique_key="report", unique_until=T0 + 90, enqueued_at=T0 + 30),
                ]
            )
        assert raised.value.task_id == "u2"
        assert raised.value.task_ids == ("u2",)
        assert await second.get("unrelated") is None, "nothing of a refused batch is stored"
        assert await second.get("u2") is None
        with pytest.raises(DuplicateTaskError):  # the same id, though its record is finished
            await second.enqueue_many(
                [new_task("u1", unique_key="report", unique_until=T0 + 99, enqueued_at=T0 + 3)]
            )
        assert await first.purge(states=[TaskState.SUCCEEDED]) == 1
        with pytest.raises(DuplicateTaskError):  # windows outlive the records
            await first.enqueue_many(
                [new_task("u3", unique_key="report", unique_until=T0 + 99, enqueued_at=T0 + 59.5)]
            )
        assert await second.enqueue_many(
            [new_task("u4", unique_key="report", unique_until=T0 + 120, enqueued_at=T0 + 60)]
        ) == ["u4"], "the window ends at unique_until"
        with pytest.raises(DuplicateTaskError):  # u4 opened a new window
            await first.enqueue_many(
                [new_task("u5", unique_key="report", unique_until=T0 + 150, enqueued_at=T0 + 100)]
            )
        assert await first.enqueue_many([new_task("u6", enqueued_at=T0 + 100)]) == ["u6"], (
            "a task without a unique key is never refused by a window"
        )

    async def test_a_refused_batch_opens_no_window_and_one_batch_cannot_hold_two_equal_tasks(
        self, backend: Backend
    ) -> None:
        await backend.enqueue_many([new_task("a", unique_key="A", unique_until=T0 + 60)])
        with pytest.raises(DuplicateTaskError) as raised:
            await backend.enqueue_many(
                [
                    new_task("b", unique_key="B", unique_until=T0 + 60, enqueued_at=T0 + 1),
                    new_task("a2", unique_key="A", unique_until=T0 + 60, enqueued_at=T0 + 1),
                ]
            )
        assert raised.value.task_id == "a2"
        assert await backend.enqueue_many(
            [new_task("b", unique_key="B", unique_until=T0 + 60, enqueued_at=T0 + 2)]
        ) == ["b"], "the refused batch must not have opened its other tasks' windows"
        with pytest.raises(DuplicateTaskError) as raised:
            await backend.enqueue_many(
                [
                    new_task("c1", unique_key="C", unique_until=T0 + 60, enqueued_at=T0 + 3),
                    new_task("c2", unique_key="C", unique_until=T0 + 60, enqueued_at=T0 + 3),
                ]
            )
        assert raised.value.task_id == "c2", "the first task of the batch opens the window the second finds"
        assert await backend.get("c1") is None

    async def test_skip_leaves_out_the_tasks_a_window_refuses(self, backend: Backend) -> None:
        await backend.enqueue_many([new_task("first", unique_key="K", unique_until=T0 + 60)])
        stored = await backend.enqueue_many(
            [new_task("again", unique_key="K", unique_until=T0 + 70, enqueued_at=T0 + 5), new_task("fresh")],
            if_exists="skip",
        )
        assert stored == ["fresh"]
        assert await backend.get("again") is None

    # -- debounce --------------------------------------------------------------------------------------------

    async def test_debounce_replaces_a_pending_task_keeping_its_attempts_and_enqueue_time(
        self, open_backend: OpenBackend
    ) -> None:
        producer = await open_backend()
        worker = await open_backend()
        await producer.enqueue_many([new_task("d", payload=b"one", run_at=T0 + 5)])
        replacement = new_task(
            "d",
            payload=b"two",
            enqueued_at=T0 + 2,
            run_at=T0 + 7,
            priority=3,
            concurrency_key="k",
            expires_at=T0 + 100,
            max_retries=9,
            timeout=4.0,
            meta="m2",
        )
        assert await worker.enqueue_many([replacement], if_exists="debounce") == ["d"]
        record = await _get(producer, "d")
        assert record == TaskRecord(
            id="d",
            name=replacement.name,
            queue="default",
            payload=b"two",
            state=TaskState.PENDING,
            attempts=0,
            max_retries=9,
            timeout=4.0,
            enqueued_at=T0,
            run_at=T0 + 7,
            meta="m2",
            priority=3,
            concurrency_key="k",
            expires_at=T0 + 100,
        ), "the pending task takes the new fields; attempts and enqueued_at stay"
        assert await _claim(worker, None, T0 + 6) == [], "the start was pushed back to the new run_at"
        (claimed,) = await _claim(worker, None, T0 + 7)
        assert (claimed.record.payload, claimed.record.attempts) == (b"two", 1)
        assert await worker.settle([_done(claimed, T0 + 8)]) == set()

        again = new_task("d", payload=b"three", enqueued_at=T0 + 9)
        assert await producer.enqueue_many([again], if_exists="debounce") == ["d"]
        assert_fresh_record(await worker.get("d"), again)  # a finished record is replaced, as with "error"
        missing = new_task("new", enqueued_at=T0 + 9)
        assert await producer.enqueue_many([missing], if_exists="debounce") == ["new"]
        assert_fresh_record(await worker.get("new"), missing)

    async def test_debounce_of_a_pending_retry_keeps_its_attempts(self, backend: Backend) -> None:
        await backend.enqueue_many([new_task("d", payload=b"one")])
        (claimed,) = await _claim(backend, None, T0)
        retry = Settlement(
            task_id="d", token=claimed.token, state=TaskState.PENDING, at=T0 + 1, run_at=T0 + 60, error="boom"
        )
        assert await backend.settle([retry]) == set()
        await backend.enqueue_many(
            [new_task("d", payload=b"two", enqueued_at=T0 + 2, run_at=T0 + 5)], if_exists="debounce"
        )
        record = await _get(backend, "d")
        assert (record.state, record.attempts, record.payload, record.run_at) == (
            TaskState.PENDING,
            1,
            b"two",
            T0 + 5,
        )

    async def test_debounce_of_an_active_task_keeps_one_follow_up_run_for_after_its_settlement(
        self, open_backend: OpenBackend
    ) -> None:
        worker = await open_backend()
        producer = await open_backend()
        await worker.enqueue_many([new_task("d", payload=b"one")])
        (running,) = await _claim(worker, None, T0 + 1)
        assert await producer.enqueue_many(
            [new_task("d", payload=b"two", enqueued_at=T0 + 2, run_at=T0 + 20)], if_exists="debounce"
        ) == ["d"]
        record = await _get(producer, "d")
        assert (record.state, record.payload, record.attempts) == (TaskState.ACTIVE, b"one", 1), (
            "the running attempt goes on untouched"
        )
        assert await worker.extend_leases([("d", running.token)], lease_until=T0 + 50) == set()
        follow_up = new_task("d", payload=b"three", enqueued_at=T0 + 3, run_at=T0 + 25, priority=2)
        assert await producer.enqueue_many([follow_up], if_exists="debounce") == ["d"], (
            "a later debounce replaces the follow-up"
        )
        assert await _claim(worker, None, T0 + 30) == [], "the follow-up is not a second task to claim"

        assert await worker.settle([_done(running, T0 + 10)]) == set()
        record = await _get(producer, "d")
        assert (record.state, record.attempts, record.payload) == (TaskState.PENDING, 0, b"three")
        assert (record.run_at, record.priority, record.lease_until, record.finished_at) == (
            T0 + 25,
            2,
            None,
            None,
        )
        assert await _claim(worker, None, T0 + 24) == []
        (second_run,) = await _claim(worker, None, T0 + 25)
        assert (second_run.record.payload, second_run.record.attempts) == (b"three", 1)
        assert await worker.settle([_done(second_run, T0 + 26)]) == set()
        assert (await _get(producer, "d")).state is TaskState.SUCCEEDED, "one follow-up run, not more"

    @pytest.mark.parametrize("verdict", [TaskState.PENDING, TaskState.DEAD])
    async def test_a_follow_up_run_starts_no_earlier_than_the_retry_and_follows_any_verdict(
        self, backend: Backend, verdict: TaskState
    ) -> None:
        await backend.enqueue_many([new_task("d", payload=b"one")])
        (running,) = await _claim(backend, None, T0)
        await backend.enqueue_many(
            [new_task("d", payload=b"two", enqueued_at=T0 + 1, run_at=T0 + 5)], if_exists="debounce"
        )
        settlement = Settlement(
            task_id="d",
            token=running.token,
            state=verdict,
            at=T0 + 2,
            run_at=T0 + 40 if verdict is TaskState.PENDING else None,
            error="boom",
        )
        assert await backend.settle([settlement]) == set()
        record = await _get(backend, "d")
        expected_run_at = T0 + 40 if verdict is TaskState.PENDING else T0 + 5
        assert (record.state, record.attempts, record.payload, record.run_at) == (
            TaskState.PENDING,
            0,
            b"two",
            expected_run_at,
        )

    async def test_a_follow_up_survives_a_reclaim_and_only_the_held_lease_applies_it(
        self, open_backend: OpenBackend
    ) -> None:
        dead_worker = await open_backend()
        survivor = await open_backend()
        await dead_worker.enqueue_many([new_task("d", payload=b"one")])
        (running,) = await dead_worker.claim(["default"], 1, now=T0, lease_until=T0 + 30)
        await survivor.enqueue_many([new_task("d", payload=b"two", enqueued_at=T0 + 1)], if_exists="debounce")
        (reclaimed,) = await survivor.reclaim_expired(now=T0 + 40, lease_until=T0 + 70, limit=10)
        assert reclaimed.record.payload == b"one"
        stale = Settlement(task_id="d", token=running.token, state=TaskState.SUCCEEDED, at=T0 + 41)
        assert await dead_worker.settle([stale]) == {"d"}
        assert (await _get(survivor, "d")).state is TaskState.ACTIVE, "a lost settlement applies no follow-up"
        assert await survivor.settle([_done(reclaimed, T0 + 42, TaskState.DEAD)]) == set()
        record = await _get(dead_worker, "d")
        assert (record.state, record.attempts, record.payload) == (TaskState.PENDING, 0, b"two")

    async def test_debounce_is_refused_by_a_uniqueness_window(self, backend: Backend) -> None:
        await backend.enqueue_many([new_task("d", unique_key="d", unique_until=T0 + 60)])
        with pytest.raises(DuplicateTaskError):
            await backend.enqueue_many(
                [new_task("d", payload=b"late", unique_key="d", unique_until=T0 + 70, enqueued_at=T0 + 10)],
                if_exists="debounce",
            )
        assert (await _get(backend, "d")).payload == b"payload of d"
