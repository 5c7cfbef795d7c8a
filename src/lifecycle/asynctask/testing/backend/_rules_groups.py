"""Conformance rules for groups: :meth:`Backend.enqueue_group`, :meth:`Backend.get_group`, the group
bookkeeping :meth:`Backend.settle`, :meth:`Backend.cancel` and :meth:`Backend.claim` (expiry) do in the same
atomic step as the member's change, ``then_groups`` in a settlement, and :meth:`Backend.purge` of groups.

The fan-in promise these rules pin down: a group's ``then`` task is stored exactly once, in the same atomic
step as the settlement that makes the last member succeed, whatever order, batching or repetition the
settlements come in, and never once a member ended dead or cancelled.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pytest

from ..._backend import Backend
from ..._errors import DuplicateTaskError
from ..._records import ClaimedTask, GroupRecord, NewGroup, NewTask, Settlement, TaskRecord, TaskState
from .._support import LEASE, T0, OpenBackend, SuiteBase, assert_fresh_record, ids_of, new_task

__all__ = ["GroupRules"]


def _members(group_id: str, count: int) -> tuple[NewTask, ...]:
    return tuple(new_task(f"{group_id}-m{n}", enqueued_at=T0, group_id=group_id) for n in range(count))


def _group(group_id: str, count: int = 3, *, then: bool = True, meta: str | None = None) -> NewGroup:
    return NewGroup(
        id=group_id,
        members=_members(group_id, count),
        then=new_task(f"{group_id}-then", enqueued_at=T0) if then else None,
        created_at=T0,
        meta=meta,
    )


async def _get(backend: Backend, task_id: str) -> TaskRecord:
    record = await backend.get(task_id)
    assert record is not None, f"get({task_id!r}) returned None for a stored task"
    return record


async def _group_record(backend: Backend, group_id: str) -> GroupRecord:
    group = await backend.get_group(group_id)
    assert group is not None, f"get_group({group_id!r}) returned None for a stored group"
    assert isinstance(group, GroupRecord), f"get_group() must return a GroupRecord, got {group!r}"
    return group


def _counts(group: GroupRecord) -> dict[TaskState, int]:
    """``counts`` without zero entries (a backend may leave states with no member out)."""
    return {TaskState(state): count for state, count in group.counts.items() if count}


async def _claim_all(backend: Backend, count: int, now: float = T0 + 1) -> dict[str, ClaimedTask]:
    claimed = await backend.claim(["default"], count, now=now, lease_until=now + LEASE)
    assert len(claimed) == count, f"expected to claim {count} tasks, got {ids_of(claimed)}"
    return {c.record.id: c for c in claimed}


def _verdict(
    claimed: ClaimedTask,
    state: TaskState,
    at: float,
    *,
    result: bytes | None = None,
    error: str | None = None,
) -> Settlement:
    return Settlement(
        task_id=claimed.record.id, token=claimed.token, state=state, at=at, result=result, error=error
    )


def _success(claimed: Mapping[str, ClaimedTask], task_id: str, at: float, result: bytes | None) -> Settlement:
    return _verdict(claimed[task_id], TaskState.SUCCEEDED, at, result=result)


class GroupRules(SuiteBase):
    """Groups: stored whole or not at all; members' verdicts fill the group in call order; ``then`` stored
    exactly once with the last success; a dead or cancelled member decides the outcome for good."""

    # -- storing a group -------------------------------------------------------------------------------------

    async def test_enqueue_group_stores_the_members_and_keeps_then_with_the_group(
        self, open_backend: OpenBackend
    ) -> None:
        producer = await open_backend()
        reader = await open_backend()
        group = _group("g", meta='{"chain": 1}')
        assert await producer.enqueue_group(group) == "g"
        for member in group.members:
            assert_fresh_record(await reader.get(member.id), member)
        assert await reader.get("g-then") is None, "then is not stored as a task until the group succeeds"
        stored = await _group_record(reader, "g")
        assert stored.id == "g"
        assert stored.task_ids == ("g-m0", "g-m1", "g-m2"), "members in call order"
        assert isinstance(stored.task_ids, tuple)
        assert (stored.outcome, stored.results, stored.created_at) == (None, (None, None, None), T0)
        assert (stored.finished_at, stored.then_id, stored.meta) == (None, None, '{"chain": 1}')
        assert _counts(stored) == {TaskState.PENDING: 3}
        assert await reader.get_group("ghost") is None
        assert await reader.get_group("g-m0") is None, "a member's id is not a group id"
        claimed = await reader.claim(["default"], 10, now=T0 + 1, lease_until=T0 + 31)
        assert ids_of(claimed) == ["g-m0", "g-m1", "g-m2"], "members are ordinary tasks to claim"
        assert {c.record.group_id for c in claimed} == {"g"}

    async def test_a_group_without_then_is_stored_too(self, backend: Backend) -> None:
        assert await backend.enqueue_group(_group("bare", 2, then=False)) == "bare"
        claimed = await _claim_all(backend, 2)
        verdicts = [_success(claimed, task_id, T0 + 2, b"r") for task_id in sorted(claimed)]
        assert await backend.settle(verdicts) == set()
        group = await _group_record(backend, "bare")
        assert (group.outcome, group.then_id, group.finished_at) == (TaskState.SUCCEEDED, None, T0 + 2)

    async def test_enqueue_group_stores_nothing_when_a_member_id_is_live(self, backend: Backend) -> None:
        await backend.enqueue_many([new_task("g-m1", payload=b"the live one")])
        with pytest.raises(DuplicateTaskError) as caught:
            await backend.enqueue_group(_group("g"))
        assert caught.value.task_id == "g-m1"
        assert await backend.get_group("g") is None, "a refused group is not stored"
        assert await backend.get("g-m0") is None, "no member of a refused group is stored"
        assert await backend.get("g-m2") is None
        assert (await _get(backend, "g-m1")).payload == b"the live one"

        repeated = NewGroup(
            id="twice",
            members=(new_task("same", group_id="twice"), new_task("same", group_id="twice")),
            then=None,
            created_at=T0,
        )
        with pytest.raises(DuplicateTaskError):
            await backend.enqueue_group(repeated)
        assert await backend.get_group("twice") is None
        assert await backend.get("same") is None

    async def test_a_finished_task_with_a_member_id_is_replaced(self, backend: Backend) -> None:
        await backend.enqueue_many([new_task("g-m0", payload=b"old")])
        assert await backend.cancel(["g-m0"], now=T0 + 1) == ["g-m0"]
        group = _group("g", 2)
        assert await backend.enqueue_group(group) == "g"
        assert_fresh_record(await backend.get("g-m0"), group.members[0])

    async def test_a_group_id_that_exists_is_refused(self, backend: Backend) -> None:
        assert await backend.enqueue_group(_group("g", 2)) == "g"
        other = NewGroup(id="g", members=_members("other", 2), then=None, created_at=T0 + 1)
        with pytest.raises(DuplicateTaskError):
            await backend.enqueue_group(other)
        assert await backend.get("other-m0") is None, "nothing of the refused group is stored"
        assert (await _group_record(backend, "g")).task_ids == ("g-m0", "g-m1")

    # -- fan-in ----------------------------------------------------------------------------------------------

    async def test_results_fill_in_call_order_and_then_is_stored_with_the_last_success(
        self, open_backend: OpenBackend
    ) -> None:
        worker = await open_backend()
        reader = await open_backend()
        group = _group("g")
        await worker.enqueue_group(group)
        claimed = await _claim_all(worker, 3)
        assert _counts(await _group_record(reader, "g")) == {TaskState.ACTIVE: 3}
        assert await worker.settle([_success(claimed, "g-m2", T0 + 2, b"two")]) == set()
        state = await _group_record(reader, "g")
        assert (state.outcome, state.results) == (None, (None, None, b"two"))
        assert _counts(state) == {TaskState.ACTIVE: 2, TaskState.SUCCEEDED: 1}
        assert await worker.settle([_success(claimed, "g-m0", T0 + 3, None)]) == set()
        assert await reader.get("g-then") is None, "then waits for every member"
        assert await worker.settle([_success(claimed, "g-m1", T0 + 4, b"\x00one\xff")]) == set()
        done = await _group_record(reader, "g")
        assert done.outcome is TaskState.SUCCEEDED
        assert done.results == (None, b"\x00one\xff", b"two"), "each member's result in its call-order slot"
        assert (done.finished_at, done.then_id) == (T0 + 4, "g-then")
        assert _counts(done) == {TaskState.SUCCEEDED: 3}
        assert group.then is not None
        assert_fresh_record(await reader.get("g-then"), group.then)

    async def test_the_last_two_successes_in_one_settle_batch_store_then_once(self, backend: Backend) -> None:
        await backend.enqueue_group(_group("g"))
        claimed = await _claim_all(backend, 3)
        assert await backend.settle([_success(claimed, "g-m1", T0 + 2, b"1")]) == set()
        batch = [_success(claimed, "g-m2", T0 + 3, b"2"), _success(claimed, "g-m0", T0 + 3, b"0")]
        assert await backend.settle(batch) == set()
        group = await _group_record(backend, "g")
        assert (group.outcome, group.results, group.then_id) == (
            TaskState.SUCCEEDED,
            (b"0", b"1", b"2"),
            "g-then",
        )
        then = [record for record in await backend.list_records() if record.id == "g-then"]
        assert len(then) == 1
        assert then[0].state is TaskState.PENDING

    async def test_every_member_in_one_settle_batch_stores_then_once(self, backend: Backend) -> None:
        await backend.enqueue_group(_group("g", 4))
        claimed = await _claim_all(backend, 4)
        batch = [_success(claimed, f"g-m{n}", T0 + 2, str(n).encode()) for n in (3, 1, 0, 2)]
        assert await backend.settle(batch) == set()
        group = await _group_record(backend, "g")
        assert (group.outcome, group.results) == (TaskState.SUCCEEDED, (b"0", b"1", b"2", b"3"))
        assert (await _get(backend, "g-then")).state is TaskState.PENDING

    async def test_a_settlement_applied_twice_or_without_its_lease_changes_nothing_in_the_group(
        self, open_backend: OpenBackend
    ) -> None:
        worker = await open_backend()
        recovery = await open_backend()
        await worker.enqueue_group(_group("g"))
        claimed = await _claim_all(worker, 3)
        assert await worker.settle([_success(claimed, "g-m0", T0 + 2, b"first")]) == set()
        assert await worker.settle([_success(claimed, "g-m0", T0 + 3, b"again")]) == {"g-m0"}, (
            "a settlement applied a second time finds its lease gone"
        )
        assert (await _group_record(worker, "g")).results[0] == b"first"

        # g-m1's worker is presumed dead: recovery takes its lease over; the old worker's verdict is lost.
        taken = await recovery.reclaim_expired(now=T0 + 100, lease_until=T0 + 200, limit=10)
        by_id = {c.record.id: c for c in taken}
        assert sorted(by_id) == ["g-m1", "g-m2"]
        late = [_success(claimed, "g-m1", T0 + 101, b"late"), _success(claimed, "g-m2", T0 + 101, b"late")]
        assert await worker.settle(late) == {"g-m1", "g-m2"}
        group = await _group_record(worker, "g")
        assert (group.outcome, group.results) == (None, (b"first", None, None))
        assert await worker.get("g-then") is None, "verdicts whose lease was lost never complete the group"

        last = [_success(by_id, "g-m1", T0 + 102, b"one"), _success(by_id, "g-m2", T0 + 102, b"two")]
        assert await recovery.settle(last + last) == {"g-m1", "g-m2"}, (
            "the repeated half of the batch is lost"
        )
        group = await _group_record(worker, "g")
        assert (group.outcome, group.results) == (TaskState.SUCCEEDED, (b"first", b"one", b"two"))
        assert await recovery.settle(last) == {"g-m1", "g-m2"}
        then = [record for record in await worker.list_records() if record.id == "g-then"]
        assert len(then) == 1, "then is stored exactly once"

    async def test_a_retry_changes_nothing_in_the_group(self, backend: Backend) -> None:
        await backend.enqueue_group(_group("g", 2))
        claimed = await _claim_all(backend, 2)
        retry = Settlement(
            task_id="g-m0", token=claimed["g-m0"].token, state=TaskState.PENDING, at=T0 + 2, run_at=T0 + 3
        )
        assert await backend.settle([retry, _success(claimed, "g-m1", T0 + 2, b"1")]) == set()
        group = await _group_record(backend, "g")
        assert (group.outcome, group.results) == (None, (None, b"1"))
        assert _counts(group) == {TaskState.PENDING: 1, TaskState.SUCCEEDED: 1}
        again = await backend.claim(["default"], 10, now=T0 + 3, lease_until=T0 + 33)
        assert ids_of(again) == ["g-m0"]
        assert await backend.settle([_verdict(again[0], TaskState.SUCCEEDED, T0 + 4, result=b"0")]) == set()
        assert (await _group_record(backend, "g")).outcome is TaskState.SUCCEEDED
        assert (await _get(backend, "g-then")).state is TaskState.PENDING

    # -- dead and cancelled members --------------------------------------------------------------------------

    @pytest.mark.parametrize("ending", [TaskState.DEAD, TaskState.CANCELLED])
    async def test_a_member_that_ends_dead_or_cancelled_decides_the_outcome_and_then_never_runs(
        self, backend: Backend, ending: TaskState
    ) -> None:
        await backend.enqueue_group(_group("g"))
        claimed = await _claim_all(backend, 3)
        assert await backend.settle([_success(claimed, "g-m0", T0 + 2, b"0")]) == set()
        assert await backend.settle([_verdict(claimed["g-m1"], ending, T0 + 3, error="it ended")]) == set()
        group = await _group_record(backend, "g")
        assert (group.outcome, group.finished_at) == (ending, T0 + 3)
        assert await backend.settle([_success(claimed, "g-m2", T0 + 4, b"2")]) == set()
        group = await _group_record(backend, "g")
        assert (group.outcome, group.finished_at, group.then_id) == (ending, T0 + 3, None), (
            "the first member that ended so decided the outcome; later successes change nothing"
        )
        assert group.results == (b"0", None, b"2"), "results are still stored in their slots"
        assert _counts(group) == {TaskState.SUCCEEDED: 2, ending: 1}
        assert await backend.get("g-then") is None, "then is never stored for a dead or cancelled group"

        assert await backend.requeue(["g-m1"], now=T0 + 5) == 1
        assert _counts(await _group_record(backend, "g")) == {TaskState.SUCCEEDED: 2, TaskState.PENDING: 1}
        again = await backend.claim(["default"], 10, now=T0 + 5, lease_until=T0 + 35)
        assert await backend.settle([_verdict(again[0], TaskState.SUCCEEDED, T0 + 6, result=b"1")]) == set()
        group = await _group_record(backend, "g")
        assert (group.outcome, group.then_id) == (ending, None), (
            "a requeued member leaves the outcome as it is"
        )
        assert group.results == (b"0", b"1", b"2")
        assert await backend.get("g-then") is None

    async def test_cancelling_a_pending_member_cancels_the_group(self, open_backend: OpenBackend) -> None:
        operator = await open_backend()
        worker = await open_backend()
        await operator.enqueue_group(_group("g", 3))
        assert await operator.cancel(["g-m1"], now=T0 + 5) == ["g-m1"]
        group = await _group_record(worker, "g")
        assert (group.outcome, group.finished_at) == (TaskState.CANCELLED, T0 + 5)
        assert _counts(group) == {TaskState.PENDING: 2, TaskState.CANCELLED: 1}, "the other members are left"
        claimed = await _claim_all(worker, 2, now=T0 + 6)
        verdicts = [_success(claimed, task_id, T0 + 7, b"r") for task_id in ("g-m0", "g-m2")]
        assert await worker.settle(verdicts) == set()
        assert (await _group_record(operator, "g")).outcome is TaskState.CANCELLED
        assert await operator.get("g-then") is None

    async def test_cancelling_an_active_member_changes_the_group_only_when_it_is_settled(
        self, backend: Backend
    ) -> None:
        await backend.enqueue_group(_group("g", 2))
        claimed = await _claim_all(backend, 2)
        assert await backend.cancel(["g-m0"], now=T0 + 2) == ["g-m0"]
        assert (await _group_record(backend, "g")).outcome is None, "a cancel request is not an ending"
        stop = _verdict(claimed["g-m0"], TaskState.CANCELLED, T0 + 3)
        assert await backend.settle([stop]) == set()
        group = await _group_record(backend, "g")
        assert (group.outcome, group.finished_at) == (TaskState.CANCELLED, T0 + 3)

    async def test_a_member_that_expires_before_it_starts_cancels_the_group(self, backend: Backend) -> None:
        group = NewGroup(
            id="g",
            members=(new_task("g-m0", group_id="g"), new_task("g-m1", group_id="g", expires_at=T0 + 10)),
            then=new_task("g-then"),
            created_at=T0,
        )
        await backend.enqueue_group(group)
        claimed = await backend.claim(["default"], 10, now=T0 + 20, lease_until=T0 + 50)
        assert ids_of(claimed) == ["g-m0"], "the expired member is not claimed"
        stored = await _group_record(backend, "g")
        assert (stored.outcome, stored.finished_at) == (TaskState.CANCELLED, T0 + 20), (
            "the claim that expires a member cancels its group in the same step"
        )
        assert await backend.settle([_verdict(claimed[0], TaskState.SUCCEEDED, T0 + 21)]) == set()
        assert await backend.get("g-then") is None

    # -- groups stored by a settlement -----------------------------------------------------------------------

    async def test_then_groups_are_stored_with_the_settlement_and_once(self, backend: Backend) -> None:
        await backend.enqueue_many([new_task("a"), new_task("b")])
        claimed = await _claim_all(backend, 2)
        fan_out = _group("g2", 2)
        first = Settlement(
            task_id="a",
            token=claimed["a"].token,
            state=TaskState.SUCCEEDED,
            at=T0 + 2,
            then_groups=(fan_out,),
        )
        assert await backend.settle([first]) == set()
        for member in fan_out.members:
            assert_fresh_record(await backend.get(member.id), member)
        assert (await _group_record(backend, "g2")).task_ids == ("g2-m0", "g2-m1")
        duplicate = NewGroup(id="g2", members=_members("dup", 2), then=None, created_at=T0 + 3)
        second = Settlement(
            task_id="b",
            token=claimed["b"].token,
            state=TaskState.SUCCEEDED,
            at=T0 + 3,
            then_groups=(duplicate,),
        )
        assert await backend.settle([second]) == set(), "a group whose id exists is skipped, not an error"
        assert await backend.get("dup-m0") is None, "nothing of a skipped group is stored"
        assert (await _group_record(backend, "g2")).task_ids == ("g2-m0", "g2-m1")

        members = await _claim_all(backend, 2, now=T0 + 4)
        verdicts = [_success(members, task_id, T0 + 5, task_id.encode()) for task_id in ("g2-m0", "g2-m1")]
        assert await backend.settle(verdicts) == set()
        assert (await _group_record(backend, "g2")).then_id == "g2-then"
        assert (await _get(backend, "g2-then")).state is TaskState.PENDING

    async def test_then_is_skipped_when_a_task_with_its_id_exists(self, backend: Backend) -> None:
        await backend.enqueue_many([new_task("g-then", payload=b"already here", run_at=T0 + 500)])
        await backend.enqueue_group(_group("g", 2))
        claimed = await _claim_all(backend, 2)
        verdicts = [_success(claimed, task_id, T0 + 2, None) for task_id in ("g-m0", "g-m1")]
        assert await backend.settle(verdicts) == set()
        assert (await _group_record(backend, "g")).outcome is TaskState.SUCCEEDED
        assert (await _get(backend, "g-then")).payload == b"already here", "an existing then is left as it is"

    # -- counts, purge ---------------------------------------------------------------------------------------

    async def test_counts_keep_members_whose_records_were_purged(self, backend: Backend) -> None:
        await backend.enqueue_group(_group("g", 4))
        claimed = await _claim_all(backend, 4)
        verdicts = [
            _success(claimed, "g-m0", T0 + 2, b"0"),
            _verdict(claimed["g-m1"], TaskState.DEAD, T0 + 2, error="x"),
        ]
        assert await backend.settle(verdicts) == set()
        group = await _group_record(backend, "g")
        assert _counts(group) == {TaskState.SUCCEEDED: 1, TaskState.DEAD: 1, TaskState.ACTIVE: 2}
        assert await backend.purge(states={TaskState.SUCCEEDED, TaskState.DEAD}, queue="default") == 2
        group = await _group_record(backend, "g")
        assert _counts(group) == {TaskState.SUCCEEDED: 1, TaskState.DEAD: 1, TaskState.ACTIVE: 2}, (
            "a member removed by retention counts in the state it ended in"
        )
        assert group.results[0] == b"0", "results outlive the members' records"

    async def test_purge_removes_final_groups_by_outcome_and_age(self, backend: Backend) -> None:
        for group_id in ("won", "lost", "open"):
            await backend.enqueue_group(_group(group_id, 1, then=False))
        claimed = await _claim_all(backend, 3)
        verdicts = [
            _success(claimed, "won-m0", T0 + 20, b"w"),
            _verdict(claimed["lost-m0"], TaskState.DEAD, T0 + 30, error="x"),
        ]
        assert await backend.settle(verdicts) == set()

        assert await backend.purge(states={TaskState.SUCCEEDED}, before=T0 + 20) == 0
        assert await backend.get_group("won") is not None, "finished at the cut-off: kept"
        assert await backend.purge(states={TaskState.SUCCEEDED}, queue="default", before=T0 + 100) == 1, (
            "groups are not counted: purge returns how many task records it deleted"
        )
        assert await backend.get_group("won") is not None, "purge with a queue leaves groups alone"
        assert await backend.purge(states={TaskState.SUCCEEDED}, before=T0 + 21) == 0
        assert await backend.get_group("won") is None, "a succeeded group finished before `before` is removed"
        assert await backend.get_group("lost") is not None, "a dead group is not in states={SUCCEEDED}"
        assert await backend.purge(states=set(TaskState) - {TaskState.ACTIVE}) == 1
        assert await backend.get_group("lost") is None
        assert await backend.get_group("open") is not None, "a group that is not final is never purged"
        assert _counts(await _group_record(backend, "open")) == {TaskState.ACTIVE: 1}

    async def test_groups_take_many_members(self, backend: Backend) -> None:
        count = 500
        group = _group("big", count)
        assert await backend.enqueue_group(group) == "big"
        claimed = await _claim_all(backend, count)
        verdicts: Sequence[Settlement] = [
            _success(claimed, member.id, T0 + 2, str(n).encode()) for n, member in enumerate(group.members)
        ]
        half = count // 2
        assert await backend.settle(verdicts[half:]) == set()
        assert await backend.settle(verdicts[:half]) == set()
        stored = await _group_record(backend, "big")
        assert stored.outcome is TaskState.SUCCEEDED
        assert stored.results == tuple(str(n).encode() for n in range(count))
        assert stored.task_ids == tuple(member.id for member in group.members)
