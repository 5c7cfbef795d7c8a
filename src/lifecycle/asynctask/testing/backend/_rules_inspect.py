"""Conformance rules for reading: :meth:`Backend.get`, :meth:`Backend.list_records`, :meth:`Backend.stats`."""

from __future__ import annotations

from ..._backend import Backend
from ..._records import NewTask, Settlement, TaskState
from .._support import T0, SuiteBase, new_task, normalise_stats, seed

__all__ = ["InspectRules"]


def _mixed() -> list[tuple[NewTask, TaskState]]:
    """Two queues, every state, distinct ``enqueued_at`` (``T0 + n``) so newest-first order is defined."""
    layout = [
        ("p1", "q1", TaskState.PENDING),
        ("a1", "q1", TaskState.ACTIVE),
        ("s1", "q1", TaskState.SUCCEEDED),
        ("p2", "q2", TaskState.PENDING),
        ("d2", "q2", TaskState.DEAD),
        ("c2", "q2", TaskState.CANCELLED),
        ("s2", "q2", TaskState.SUCCEEDED),
    ]
    return [
        (new_task(task_id, queue=queue, enqueued_at=T0 + n, run_at=T0 + n), state)
        for n, (task_id, queue, state) in enumerate(layout)
    ]


class InspectRules(SuiteBase):
    """Reads: ``get`` of a missing id is ``None``; lists filter and go newest first; stats count exactly."""

    async def test_get_of_an_unknown_id_returns_none(self, backend: Backend) -> None:
        assert await backend.get("never-stored") is None

    async def test_list_records_returns_every_record_newest_first(self, backend: Backend) -> None:
        await seed(backend, _mixed())
        records = await backend.list_records()
        assert [r.id for r in records] == ["s2", "c2", "d2", "p2", "s1", "a1", "p1"]
        for record in records:
            assert await backend.get(record.id) == record, "list_records must return the same records as get"

    async def test_list_records_filters_by_states_and_queue(self, backend: Backend) -> None:
        await seed(backend, _mixed())

        async def listed(states: set[TaskState] | None = None, queue: str | None = None) -> list[str]:
            return [r.id for r in await backend.list_records(states=states, queue=queue)]

        assert await listed({TaskState.PENDING}) == ["p2", "p1"]
        assert await listed(queue="q1") == ["s1", "a1", "p1"]
        assert await listed({TaskState.SUCCEEDED, TaskState.DEAD}) == ["s2", "d2", "s1"]
        assert await listed({TaskState.SUCCEEDED, TaskState.DEAD}, queue="q2") == ["s2", "d2"]
        assert await listed({TaskState.ACTIVE}, queue="q2") == []
        assert await listed(queue="no-such-queue") == []
        assert await listed(set()) == [], "an empty states collection matches no state (None means any)"
        as_list = await backend.list_records(states=[TaskState.DEAD, TaskState.CANCELLED])
        assert [r.id for r in as_list] == ["c2", "d2"], "states may be any collection, e.g. a list"

    async def test_list_records_pages_with_limit_and_offset(self, backend: Backend) -> None:
        await backend.enqueue_many([new_task(f"t{n:03d}", enqueued_at=T0 + n) for n in range(120)])
        newest_first = [f"t{n:03d}" for n in reversed(range(120))]

        async def page(limit: int = 100, offset: int = 0, *, default: bool = False) -> list[str]:
            if default:
                return [r.id for r in await backend.list_records()]
            return [r.id for r in await backend.list_records(limit=limit, offset=offset)]

        assert await page(default=True) == newest_first[:100], "the default limit is 100"
        assert await page(limit=3) == newest_first[:3]
        assert await page(limit=3, offset=3) == newest_first[3:6]
        assert await page(limit=5, offset=118) == newest_first[118:]
        assert await page(limit=5, offset=120) == []
        assert await page(limit=200) == newest_first

    async def test_stats_count_records_per_queue_and_state(self, backend: Backend) -> None:
        assert normalise_stats(await backend.stats()) == {}
        await seed(backend, _mixed())
        assert normalise_stats(await backend.stats()) == {
            "q1": {TaskState.PENDING: 1, TaskState.ACTIVE: 1, TaskState.SUCCEEDED: 1},
            "q2": {TaskState.PENDING: 1, TaskState.DEAD: 1, TaskState.CANCELLED: 1, TaskState.SUCCEEDED: 1},
        }
        (claimed,) = await backend.claim(["q1"], 10, now=T0 + 20, lease_until=T0 + 50)
        verdict = Settlement(task_id=claimed.record.id, token=claimed.token, state=TaskState.DEAD, at=T0 + 21)
        assert await backend.settle([verdict]) == set()
        assert await backend.purge(states=[TaskState.SUCCEEDED], queue="q2") == 1
        assert normalise_stats(await backend.stats()) == {
            "q1": {TaskState.ACTIVE: 1, TaskState.SUCCEEDED: 1, TaskState.DEAD: 1},
            "q2": {TaskState.PENDING: 1, TaskState.DEAD: 1, TaskState.CANCELLED: 1},
        }, "stats must follow every state change"
