"""Conformance rules for :meth:`Backend.enqueue_many`: durability, ids, duplicates, reuse, ``if_exists``."""

from __future__ import annotations

import anyio
import pytest

from ..._backend import Backend
from ..._errors import DuplicateTaskError
from ..._records import TaskState
from .._support import T0, OpenBackend, SuiteBase, assert_fresh_record, new_task, normalise_stats, seed

__all__ = ["EnqueueRules"]


class EnqueueRules(SuiteBase):
    """``enqueue_many``: stores every field, returns the ids in order, refuses live duplicates atomically."""

    async def test_enqueue_stores_every_field_and_returns_the_ids_in_order(
        self, open_backend: OpenBackend
    ) -> None:
        producer = await open_backend()
        reader = await open_backend()
        tasks = [
            new_task("e1", name="suite.first", queue="alpha", payload=b"\x00\x01", max_retries=0),
            new_task(
                "e2",
                name="suite.second",
                queue="beta",
                max_retries=7,
                timeout=2.5,
                enqueued_at=T0 + 1,
                run_at=T0 + 60,
                meta='{"chain": 1}',
            ),
            new_task("e3", timeout=0.25, enqueued_at=T0 + 2, run_at=T0 - 5),
        ]
        ids = await producer.enqueue_many(tasks)
        assert ids == ["e1", "e2", "e3"], "enqueue_many must return a list of the stored ids, in order"
        for task in tasks:
            # Read through another backend object: enqueue_many returns only once the tasks are stored.
            assert_fresh_record(await reader.get(task.id), task)

    async def test_enqueue_of_an_empty_batch_stores_nothing(self, backend: Backend) -> None:
        assert await backend.enqueue_many([]) == []
        assert normalise_stats(await backend.stats()) == {}

    async def test_duplicate_of_a_pending_id_raises_and_stores_nothing_of_the_batch(
        self, backend: Backend
    ) -> None:
        original = new_task("dup", payload=b"original")
        await seed(backend, [(original, TaskState.PENDING)])
        batch = [new_task("before"), new_task("dup", payload=b"second"), new_task("after")]
        with pytest.raises(DuplicateTaskError) as raised:
            await backend.enqueue_many(batch)
        assert raised.value.task_id == "dup"
        assert raised.value.task_ids == ("dup",)
        assert await backend.get("before") is None, "nothing of a batch with a duplicate may be stored"
        assert await backend.get("after") is None, "nothing of a batch with a duplicate may be stored"
        assert_fresh_record(await backend.get("dup"), original)

    async def test_duplicate_of_an_active_id_raises_and_leaves_the_task_running(
        self, backend: Backend
    ) -> None:
        tokens = await seed(backend, [(new_task("busy", payload=b"original"), TaskState.ACTIVE)])
        with pytest.raises(DuplicateTaskError) as raised:
            await backend.enqueue_many([new_task("fresh"), new_task("busy", payload=b"second")])
        assert raised.value.task_id == "busy"
        assert await backend.get("fresh") is None
        record = await backend.get("busy")
        assert record is not None
        assert (record.state, record.payload, record.attempts) == (TaskState.ACTIVE, b"original", 1)
        assert await backend.extend_leases([("busy", tokens["busy"])], lease_until=T0 + 99) == set()

    async def test_duplicate_error_names_the_first_and_every_conflicting_id(self, backend: Backend) -> None:
        await seed(backend, [(new_task("p"), TaskState.PENDING), (new_task("a"), TaskState.ACTIVE)])
        with pytest.raises(DuplicateTaskError) as raised:
            await backend.enqueue_many([new_task("fresh"), new_task("a"), new_task("p")])
        assert raised.value.task_id == "a", "task_id must be the first conflicting id in batch order"
        assert set(raised.value.task_ids) == {"a", "p"}
        assert await backend.get("fresh") is None

    async def test_duplicate_ids_inside_one_batch_raise_and_store_nothing(self, backend: Backend) -> None:
        with pytest.raises(DuplicateTaskError) as raised:
            await backend.enqueue_many([new_task("twice", payload=b"1"), new_task("twice", payload=b"2")])
        assert raised.value.task_id == "twice"
        assert await backend.get("twice") is None

    async def test_finished_ids_may_be_reused_and_the_record_is_replaced(self, backend: Backend) -> None:
        await seed(
            backend,
            [
                (new_task("s", queue="old"), TaskState.SUCCEEDED),
                (new_task("d", queue="old"), TaskState.DEAD),
                (new_task("c", queue="old"), TaskState.CANCELLED),
            ],
        )
        replacements = [
            new_task(task_id, name="suite.v2", queue="new", payload=b"v2", enqueued_at=T0 + 20, meta="m")
            for task_id in ("s", "d", "c")
        ]
        assert await backend.enqueue_many(replacements) == ["s", "d", "c"]
        for task in replacements:
            # Replaced means a fresh record: no old result, error, attempts or finish time survive.
            assert_fresh_record(await backend.get(task.id), task)
        assert normalise_stats(await backend.stats()) == {"new": {TaskState.PENDING: 3}}

    async def test_if_exists_skip_leaves_out_ids_that_exist_in_any_state(self, backend: Backend) -> None:
        states = {
            "p": TaskState.PENDING,
            "a": TaskState.ACTIVE,
            "s": TaskState.SUCCEEDED,
            "d": TaskState.DEAD,
            "c": TaskState.CANCELLED,
        }
        await seed(backend, [(new_task(task_id), state) for task_id, state in states.items()])
        before = {task_id: await backend.get(task_id) for task_id in states}
        batch = [new_task("new1", enqueued_at=T0 + 20)]
        batch += [new_task(task_id, payload=b"changed", enqueued_at=T0 + 20) for task_id in states]
        batch += [new_task("new2", enqueued_at=T0 + 20)]
        assert await backend.enqueue_many(batch, if_exists="skip") == ["new1", "new2"]
        for task_id in states:
            assert await backend.get(task_id) == before[task_id], f"skip must leave {task_id!r} untouched"
        assert_fresh_record(await backend.get("new1"), batch[0])
        assert_fresh_record(await backend.get("new2"), batch[-1])

    async def test_if_exists_skip_with_only_existing_ids_stores_nothing(self, backend: Backend) -> None:
        await seed(backend, [(new_task("p"), TaskState.PENDING)])
        assert await backend.enqueue_many([new_task("p", payload=b"x")], if_exists="skip") == []
        assert normalise_stats(await backend.stats()) == {"default": {TaskState.PENDING: 1}}

    async def test_if_exists_skip_stores_an_id_repeated_inside_one_batch_once(self, backend: Backend) -> None:
        batch = [new_task("twice", payload=b"first"), new_task("twice", payload=b"second")]
        assert await backend.enqueue_many(batch, if_exists="skip") == ["twice"]
        assert_fresh_record(await backend.get("twice"), batch[0])

    async def test_concurrent_enqueues_of_one_id_store_it_exactly_once(
        self, open_backend: OpenBackend
    ) -> None:
        producers = [await open_backend(), await open_backend()]
        winners: dict[str, list[bytes]] = {}
        refused: dict[str, list[str]] = {}

        async def enqueue(producer: Backend, task_id: str, payload: bytes) -> None:
            try:
                stored = await producer.enqueue_many([new_task(task_id, payload=payload)])
            except DuplicateTaskError as error:
                refused[task_id] = [*refused.get(task_id, []), error.task_id]
            else:
                assert stored == [task_id]
                winners.setdefault(task_id, []).append(payload)

        task_ids = [f"race-{n}" for n in range(20)]
        with anyio.fail_after(60):
            async with anyio.create_task_group() as group:
                for task_id in task_ids:
                    for number, producer in enumerate(producers):
                        group.start_soon(enqueue, producer, task_id, f"{task_id} by {number}".encode())
        for task_id in task_ids:
            assert len(winners.get(task_id, [])) == 1, f"{task_id!r} was stored {winners.get(task_id)} times"
            assert refused.get(task_id) == [task_id], "the other enqueue must raise DuplicateTaskError"
            record = await producers[0].get(task_id)
            assert record is not None
            assert record.payload == winners[task_id][0]
