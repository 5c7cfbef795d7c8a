"""Conformance rules for damaged records: a stored record the backend cannot read whole comes back with a
``fault`` naming the field, is never dropped, never fails a call for the other records, and ends dead.

The rules are optional: they write raw values into storage through the test class's :meth:`corrupt_field`
hook and skip when the class does not implement it (or when the storage cannot hold any of a rule's values,
such as text in a typed number column).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import pytest

from ..._backend import Backend
from ..._records import ClaimedTask, Settlement, TaskRecord, TaskState
from .._support import T0, SuiteBase, ids_of, new_task

__all__ = ["DamageRules"]

RawValue = str | bytes | int | float | None
"""What :meth:`DamageRules.corrupt_field` writes: text, bytes, a number, or ``None`` (no value at all)."""

_NAN = math.nan

#: Fields a claim leaves as they are, and values no backend can read in them, tried in order.
_CLAIM_DAMAGE: dict[str, tuple[RawValue, ...]] = {
    "name": (b"\xff\xfe", None),
    "payload": (None, 5),
    "attempts": ("x", -1, 2.5, None),
    "max_retries": ("many", -1, 2.5, None),
    "timeout": ("soon", _NAN, -1.0),
    "enqueued_at": ("yesterday", _NAN, None),
    "last_error": (b"\xff\xfe",),
    "meta": (b"\xff\xfe",),
    "cancel_requested": ("yes", 2, b"\xff\xfe"),
    "progress_done": ("half", _NAN, math.inf),
    "progress_total": ("all", _NAN, math.inf),
    "progress_message": (b"\xff\xfe",),
    "group_id": (b"\xff\xfe",),
}

#: Fields that decide whether a pending task is claimed at all, and unreadable values for them.
_SELECTION_DAMAGE: dict[str, tuple[RawValue, ...]] = {
    "state": ("bogus", b"\xff\xfe", None),
    "queue": (b"\xff\xfe", b"default", None),
    "run_at": ("soon", b"\x00", _NAN, math.inf, None),
    "priority": ("high", 2.5, b"\xff\xfe"),
    "concurrency_key": (b"\xff\xfe",),
    "expires_at": ("soon", b"\xff\xfe", _NAN),
}

_LEASE_DAMAGE: tuple[RawValue, ...] = (None, "later", _NAN)


def _total(stats: Mapping[str, Mapping[TaskState, int]]) -> dict[TaskState, int]:
    """Counts per state over every queue (a damaged queue name may be counted under a placeholder)."""
    totals: dict[TaskState, int] = {}
    for counts in stats.values():
        for state, count in counts.items():
            if count:
                totals[TaskState(state)] = totals.get(TaskState(state), 0) + count
    return totals


async def _stored(backend: Backend, task_id: str) -> TaskRecord:
    record = await backend.get(task_id)
    assert record is not None, f"get({task_id!r}) returned None: a damaged record must never vanish"
    return record


def _names(fault: str | None, field: str) -> bool:
    return fault is not None and f"{field!r}" in fault


def _verdicts(claimed: Sequence[ClaimedTask], damaged: str, at: float) -> list[Settlement]:
    """Succeed every healthy task, and make the damaged one dead, as the engine does."""
    return [
        Settlement(task_id=c.record.id, token=c.token, state=TaskState.DEAD, at=at, error=c.record.fault)
        if c.record.id == damaged
        else Settlement(task_id=c.record.id, token=c.token, state=TaskState.SUCCEEDED, at=at, result=b"r")
        for c in claimed
    ]


class DamageRules(SuiteBase):
    """A damaged stored record (written by hand, by another program, or by a storage fault) never takes the
    worker or its batch down: it comes back with ``TaskRecord.fault``, the others go on, and it ends dead.

    Implement :meth:`corrupt_field` in the test class to run these rules; without it they skip.
    """

    async def corrupt_field(self, backend: Backend, task_id: str, field: str, raw_value: RawValue) -> bool:
        """Write ``raw_value`` into the stored ``field`` of task ``task_id``, directly in the storage and past
        every check of the backend; return ``False`` when the storage cannot hold that value in that field
        (a typed column or a constraint refuses it).

        ``field`` is a :class:`TaskRecord` field name other than ``id``. ``raw_value`` is text, bytes, a
        number, or ``None`` for no value (``NULL``, or a deleted field). A backend's test class implements
        this to run the damaged-record rules; the default skips them.

        Example (SQLite)::

            async def corrupt_field(self, backend, task_id, field, raw_value):
                with sqlite3.connect(backend.path) as db:
                    db.execute(f"UPDATE lifecycle_tasks SET {field} = ? WHERE id = ?", (raw_value, task_id))
                return True
        """
        raise NotImplementedError

    async def _damage(
        self, backend: Backend, task_id: str, field: str, values: Sequence[RawValue]
    ) -> RawValue:
        """Write the first of ``values`` the storage accepts; skip the test when the hook is missing or the
        storage accepts none."""
        for value in values:
            try:
                written = await self.corrupt_field(backend, task_id, field, value)
            except NotImplementedError:
                pytest.skip("the test class does not implement corrupt_field(), the damage rules' hook")
            if written:
                return value
        pytest.skip(f"the storage cannot hold any of {list(values)!r} in the field {field!r}")

    async def _assert_visible(self, backend: Backend, task_id: str, field: str, count: int) -> TaskRecord:
        record = await backend.get(task_id)
        assert record is not None, f"get() must return a damaged record (its {field!r} damaged), not None"
        assert _names(record.fault, field), f"the fault must name the damaged {field!r}: {record.fault!r}"
        listed = {r.id: r for r in await backend.list_records()}
        assert task_id in listed, "list_records() must list a damaged record too"
        assert listed[task_id].fault == record.fault, "list_records() and get() must report the same fault"
        assert sum(_total(await backend.stats()).values()) == count, "stats() must count a damaged record"
        return record

    @pytest.mark.parametrize("field", sorted(_CLAIM_DAMAGE))
    async def test_a_damaged_record_comes_back_with_a_fault_and_does_not_block_its_batch(
        self, backend: Backend, field: str
    ) -> None:
        ids = ["healthy-1", "damaged", "healthy-2"]
        tasks = [new_task(task_id, enqueued_at=T0 + n) for n, task_id in enumerate(ids)]
        await backend.enqueue_many(tasks)
        value = await self._damage(backend, "damaged", field, _CLAIM_DAMAGE[field])
        await self._assert_visible(backend, "damaged", field, 3)

        claimed = await backend.claim(["default"], 10, now=T0 + 10, lease_until=T0 + 40)
        assert ids_of(claimed) == ids, "the damaged record is claimed in its place, and the others with it"
        for task, c in zip(tasks, claimed, strict=True):
            if c.record.id == "damaged":
                assert _names(c.record.fault, field), (
                    f"a claimed record whose {field!r} holds {value!r} must name it in its fault, got "
                    f"{c.record.fault!r}"
                )
            else:
                assert c.record.fault is None, f"a healthy record must have no fault, got {c.record.fault!r}"
                assert (c.record.name, c.record.payload, c.record.attempts) == (task.name, task.payload, 1)

        assert await backend.settle(_verdicts(claimed, "damaged", T0 + 11)) == set(), (
            "settle() must apply every verdict, the damaged record's too"
        )
        record = await _stored(backend, "damaged")
        assert record.state is TaskState.DEAD
        assert field in (record.last_error or ""), "the dead record's last_error must say what was damaged"
        assert _total(await backend.stats()) == {TaskState.SUCCEEDED: 2, TaskState.DEAD: 1}

    @pytest.mark.parametrize("field", sorted(_SELECTION_DAMAGE))
    async def test_a_pending_record_that_cannot_be_selected_is_handed_out_by_claim_or_recovery(
        self, backend: Backend, field: str
    ) -> None:
        ids = ["healthy-1", "damaged", "healthy-2"]
        await backend.enqueue_many([new_task(task_id, enqueued_at=T0 + n) for n, task_id in enumerate(ids)])
        await self._damage(backend, "damaged", field, _SELECTION_DAMAGE[field])
        await self._assert_visible(backend, "damaged", field, 3)

        claimed = await backend.claim(["default"], 10, now=T0 + 10, lease_until=T0 + 1000)
        assert {"healthy-1", "healthy-2"} <= set(ids_of(claimed)), "the healthy tasks must be claimed"
        reclaimed = await backend.reclaim_expired(now=T0 + 20, lease_until=T0 + 1000, limit=10)
        assert not {"healthy-1", "healthy-2"} & set(ids_of(reclaimed)), (
            "reclaim_expired() must not take over a lease that has not expired"
        )
        handed = [c for c in [*claimed, *reclaimed] if c.record.id == "damaged"]
        assert len(handed) == 1, (
            f"a pending record whose {field!r} cannot be read must be handed out once, by claim() or else by "
            f"reclaim_expired() (recovery), so that it ends; it was handed out {len(handed)} times"
        )
        fault = handed[0].record.fault
        assert fault is None or _names(fault, field), f"the fault must name {field!r}, got {fault!r}"
        assert await backend.settle(_verdicts([*claimed, *reclaimed], "damaged", T0 + 30)) == set()
        assert (await _stored(backend, "damaged")).state is TaskState.DEAD
        assert _total(await backend.stats()) == {TaskState.SUCCEEDED: 2, TaskState.DEAD: 1}

    async def test_an_active_record_whose_lease_cannot_be_read_is_taken_over_by_recovery(
        self, backend: Backend
    ) -> None:
        await backend.enqueue_many([new_task("healthy"), new_task("damaged", enqueued_at=T0 + 1)])
        claimed = await backend.claim(["default"], 10, now=T0 + 10, lease_until=T0 + 100)
        assert ids_of(claimed) == ["healthy", "damaged"]
        await self._damage(backend, "damaged", "lease_until", _LEASE_DAMAGE)
        await self._assert_visible(backend, "damaged", "lease_until", 2)

        reclaimed = await backend.reclaim_expired(now=T0 + 500, lease_until=T0 + 1000, limit=10)
        assert sorted(ids_of(reclaimed)) == ["damaged", "healthy"], "both leases ended: both are taken over"
        for c in reclaimed:
            if c.record.id == "damaged":
                assert c.record.fault is None or _names(c.record.fault, "lease_until"), c.record.fault
        assert await backend.settle(_verdicts(reclaimed, "damaged", T0 + 501)) == set()
        stale = Settlement(task_id="damaged", token=claimed[1].token, state=TaskState.SUCCEEDED, at=T0 + 502)
        assert await backend.settle([stale]) == {"damaged"}, "the lease taken over is lost to the old token"
        assert (await _stored(backend, "damaged")).state is TaskState.DEAD

    async def test_operator_actions_and_settlements_work_on_damaged_records(self, backend: Backend) -> None:
        ids = ["cancel-me", "release-me", "kill-me", "finish-me"]
        await backend.enqueue_many([new_task(task_id, enqueued_at=T0 + n) for n, task_id in enumerate(ids)])
        await self._damage(backend, "cancel-me", "enqueued_at", _CLAIM_DAMAGE["enqueued_at"])
        await self._damage(backend, "release-me", "attempts", _CLAIM_DAMAGE["attempts"])
        await self._damage(backend, "kill-me", "timeout", _CLAIM_DAMAGE["timeout"])

        assert await backend.cancel(["cancel-me"], now=T0 + 5) == ["cancel-me"]
        claimed = await backend.claim(["default"], 10, now=T0 + 10, lease_until=T0 + 40)
        assert ids_of(claimed) == ["release-me", "kill-me", "finish-me"]
        leases = [(c.record.id, c.token) for c in claimed]
        assert await backend.extend_leases(leases, lease_until=T0 + 80) == set()
        release, kill, finish = claimed
        verdicts = [
            Settlement(
                task_id="release-me",
                token=release.token,
                state=TaskState.PENDING,
                at=T0 + 11,
                run_at=T0 + 11,
                refund_attempt=True,
            ),
            Settlement(task_id="kill-me", token=kill.token, state=TaskState.DEAD, at=T0 + 11, error="dead"),
            Settlement(task_id="finish-me", token=finish.token, state=TaskState.SUCCEEDED, at=T0 + 11),
        ]
        assert await backend.settle(verdicts) == set(), "a release of a damaged record must apply too"
        states = {r.id: r.state for r in await backend.list_records()}
        assert states == {
            "cancel-me": TaskState.CANCELLED,
            "release-me": TaskState.PENDING,
            "kill-me": TaskState.DEAD,
            "finish-me": TaskState.SUCCEEDED,
        }
        assert await backend.requeue(["cancel-me", "kill-me"], now=T0 + 12) == 2
        assert _total(await backend.stats()) == {TaskState.PENDING: 3, TaskState.SUCCEEDED: 1}
        assert await backend.purge(states=list(TaskState)) == 4
        assert _total(await backend.stats()) == {}
