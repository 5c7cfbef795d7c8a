"""Concurrent single enqueues share backend round trips (group commit), each caller with its own outcome
(asyncio and trio)."""

from __future__ import annotations

import asyncio
import cProfile
import dataclasses
import pstats
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import anyio
import anyio.lowlevel
import pytest

from lifecycle.asynctask import (
    AsyncTasks,
    Backend,
    DuplicateTaskError,
    JSONEncoding,
    MemoryBackend,
    NewTask,
    SQLiteBackend,
)


def echo(value: int) -> int:
    return value


class GatedBackend(MemoryBackend):
    """A memory backend that records each ``enqueue_many`` call, can hold calls at a gate of their own,
    and can fail the calls chosen by their index."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[list[str], str]] = []
        self.gates: list[anyio.Event] = []
        self.hold = False
        self.fail: dict[int, Exception] = {}

    async def enqueue_many(
        self, tasks: Sequence[NewTask], *, if_exists: Literal["error", "skip", "debounce"] = "error"
    ) -> list[str]:
        index = len(self.calls)
        self.calls.append(([task.id for task in tasks], if_exists))
        gate = anyio.Event()
        self.gates.append(gate)
        if self.hold:
            await gate.wait()
        if index in self.fail:
            raise self.fail[index]
        return await super().enqueue_many(tasks, if_exists=if_exists)

    def release(self, index: int | None = None) -> None:
        """Open the gate of call ``index``, or stop holding and open every gate."""
        if index is None:
            self.hold = False
            for gate in self.gates:
                gate.set()
        else:
            self.gates[index].set()


def make(backend: Backend) -> AsyncTasks:
    tasks = AsyncTasks(backend, execution=False)
    tasks.register(echo)
    return tasks


async def stored_value(backend: Backend, task_id: str) -> object:
    record = await backend.get(task_id)
    assert record is not None, f"task {task_id} was not stored"
    return JSONEncoding().decode(record.payload)


async def test_a_lone_enqueue_is_sent_at_once() -> None:
    backend = GatedBackend()
    backend.hold = True
    ids: list[str] = []
    async with make(backend) as tasks, anyio.create_task_group() as group:

        async def one() -> None:
            ids.append(await tasks.enqueue(echo, 1))

        group.start_soon(one)
        await anyio.wait_all_tasks_blocked()
        assert len(backend.calls) == 1  # in the backend, waiting for nothing of the coalescer
        assert len(backend.calls[0][0]) == 1
        backend.release()
    assert ids == backend.calls[0][0]
    assert await stored_value(backend, ids[0]) == (1,)


async def test_concurrent_enqueues_go_together_each_with_its_own_id() -> None:
    backend = GatedBackend()
    backend.hold = True
    ids: dict[int, str] = {}
    async with make(backend) as tasks, anyio.create_task_group() as group:

        async def one(value: int) -> None:
            ids[value] = await tasks.enqueue(echo, value, queue=f"q{value % 3}")

        group.start_soon(one, 0)
        await anyio.wait_all_tasks_blocked()
        for value in range(1, 21):
            group.start_soon(one, value)
        await anyio.wait_all_tasks_blocked()
        assert len(backend.calls) == 1  # the 20 wait while the first is in flight
        backend.release()
    assert len(backend.calls) == 2
    assert backend.calls[0][0] == [ids[0]]
    assert sorted(backend.calls[1][0]) == sorted(ids[value] for value in range(1, 21))
    assert len(set(ids.values())) == 21
    for value, task_id in ids.items():
        assert await stored_value(backend, task_id) == (value,)
        record = await backend.get(task_id)
        assert record is not None
        assert record.queue == f"q{value % 3}"


async def test_a_batch_never_exceeds_the_limit() -> None:
    backend = GatedBackend()
    backend.hold = True
    async with make(backend) as tasks, anyio.create_task_group() as group:
        tasks._coalescers.clear()
        group.start_soon(tasks.enqueue, echo, 0)
        await anyio.wait_all_tasks_blocked()
        coalescer = next(iter(tasks._coalescers.values()))
        coalescer._limit = 4
        for value in range(1, 11):
            group.start_soon(tasks.enqueue, echo, value)
        await anyio.wait_all_tasks_blocked()
        backend.release()
    assert [len(ids) for ids, _ in backend.calls] == [1, 4, 4, 2]


async def test_a_duplicate_id_fails_only_its_own_call() -> None:
    backend = GatedBackend()
    outcomes: dict[str, object] = {}
    async with make(backend) as tasks:
        await tasks.enqueue(echo, 0, task_id="taken")
        backend.hold = True
        async with anyio.create_task_group() as group:

            async def one(name: str, value: int, task_id: str | None = None) -> None:
                try:
                    outcomes[name] = await tasks.enqueue(echo, value, task_id=task_id)
                except DuplicateTaskError as exc:
                    outcomes[name] = exc

            group.start_soon(one, "a", 1)
            await anyio.wait_all_tasks_blocked()
            group.start_soon(one, "b", 2, "taken")
            group.start_soon(one, "c", 3)
            group.start_soon(one, "d", 4, "mine")
            await anyio.wait_all_tasks_blocked()
            backend.release()
    refused = outcomes["b"]
    assert isinstance(refused, DuplicateTaskError)
    assert refused.task_id == "taken"
    assert await stored_value(backend, "taken") == (0,)  # the first task, untouched
    for name, value in (("a", 1), ("c", 3), ("d", 4)):
        task_id = outcomes[name]
        assert isinstance(task_id, str)
        assert await stored_value(backend, task_id) == (value,)
    assert outcomes["d"] == "mine"


async def test_two_concurrent_calls_with_one_new_id_never_share_a_batch() -> None:
    backend = GatedBackend()
    backend.hold = True
    outcomes: dict[int, object] = {}
    async with make(backend) as tasks, anyio.create_task_group() as group:

        async def one(value: int, task_id: str | None) -> None:
            try:
                outcomes[value] = await tasks.enqueue(echo, value, task_id=task_id)
            except DuplicateTaskError as exc:
                outcomes[value] = exc

        group.start_soon(one, 0, None)
        await anyio.wait_all_tasks_blocked()
        group.start_soon(one, 1, "same")
        group.start_soon(one, 2, "same")
        await anyio.wait_all_tasks_blocked()
        backend.release()
    assert all(ids.count("same") <= 1 for ids, _ in backend.calls)
    assert sorted(type(outcomes[value]).__name__ for value in (1, 2)) == ["DuplicateTaskError", "str"]
    winner = 1 if outcomes[1] == "same" else 2
    assert await stored_value(backend, "same") == (winner,)


async def test_two_plain_calls_given_one_id_by_a_hook_never_share_a_batch() -> None:
    # Generated ids are not compared within a batch (they are random); an id an on_enqueue hook sets is.
    backend = GatedBackend()
    backend.hold = True
    outcomes: dict[int, object] = {}
    async with make(backend) as tasks, anyio.create_task_group() as group:

        @tasks.on_enqueue
        def same_id(task: NewTask) -> NewTask:
            return (
                dataclasses.replace(task, id="same") if JSONEncoding().decode(task.payload) != (0,) else task
            )

        async def one(value: int) -> None:
            try:
                outcomes[value] = await tasks.enqueue(echo, value)
            except DuplicateTaskError as exc:
                outcomes[value] = exc

        group.start_soon(one, 0)
        await anyio.wait_all_tasks_blocked()
        group.start_soon(one, 1)
        group.start_soon(one, 2)
        group.start_soon(one, 3)
        await anyio.wait_all_tasks_blocked()
        backend.release()
    assert all(ids.count("same") <= 1 for ids, _ in backend.calls)
    assert sorted(type(outcomes[value]).__name__ for value in (1, 2, 3)) == [
        "DuplicateTaskError",
        "DuplicateTaskError",
        "str",
    ]


async def test_a_backend_error_fails_only_the_calls_of_its_batch() -> None:
    backend = GatedBackend()
    backend.hold = True
    backend.fail[1] = ConnectionError("the store is down")
    outcomes: dict[int, object] = {}
    async with make(backend) as tasks:
        async with anyio.create_task_group() as group:

            async def one(value: int) -> None:
                try:
                    outcomes[value] = await tasks.enqueue(echo, value)
                except ConnectionError as exc:
                    outcomes[value] = exc

            group.start_soon(one, 0)
            await anyio.wait_all_tasks_blocked()
            group.start_soon(one, 1)
            group.start_soon(one, 2)
            await anyio.wait_all_tasks_blocked()
            backend.release()
        after = await tasks.enqueue(echo, 3)
    assert isinstance(outcomes[0], str)
    assert isinstance(outcomes[1], ConnectionError)
    assert isinstance(outcomes[2], ConnectionError)
    assert len(backend.calls[1][0]) == 2
    assert await stored_value(backend, outcomes[0]) == (0,)
    assert await stored_value(backend, after) == (3,)
    assert len(backend._rows) == 2


async def test_a_cancelled_waiting_caller_is_never_sent_and_the_others_are() -> None:
    backend = GatedBackend()
    backend.hold = True
    ids: dict[str, str] = {}
    async with make(backend) as tasks, anyio.create_task_group() as group:
        scope = anyio.CancelScope()

        async def cancellable() -> None:
            with scope:
                await tasks.enqueue(echo, 1, task_id="cancelled")

        async def one(name: str, value: int) -> None:
            ids[name] = await tasks.enqueue(echo, value)

        group.start_soon(one, "a", 0)
        await anyio.wait_all_tasks_blocked()
        group.start_soon(cancellable)
        group.start_soon(one, "c", 2)
        await anyio.wait_all_tasks_blocked()
        scope.cancel()
        await anyio.wait_all_tasks_blocked()
        backend.release()
    assert scope.cancelled_caught
    assert [ids for ids, _ in backend.calls] == [[ids["a"]], [ids["c"]]]
    assert await backend.get("cancelled") is None
    assert await stored_value(backend, ids["c"]) == (2,)


async def test_a_cancelled_sender_finishes_the_round_trip_of_the_others() -> None:
    backend = GatedBackend()
    backend.hold = True
    ids: dict[str, str] = {}
    async with make(backend) as tasks, anyio.create_task_group() as group:
        scope = anyio.CancelScope()

        async def one(name: str, value: int) -> None:
            ids[name] = await tasks.enqueue(echo, value, task_id=name)

        async def sender() -> None:
            with scope:
                await one("b", 1)

        group.start_soon(one, "a", 0)
        await anyio.wait_all_tasks_blocked()
        group.start_soon(sender)
        await anyio.wait_all_tasks_blocked()
        group.start_soon(one, "c", 2)
        await anyio.wait_all_tasks_blocked()
        backend.release(0)  # "b" arrived first: it sends the batch of "b" and "c"
        await anyio.wait_all_tasks_blocked()
        assert backend.calls[1][0] == ["b", "c"]
        scope.cancel()
        await anyio.wait_all_tasks_blocked()
        assert "c" not in ids  # the round trip of "c" was not cut short by the cancellation of "b"
        backend.release()
    assert ids["c"] == "c"
    assert await stored_value(backend, "b") == (1,)  # sent before the cancellation: stored
    assert await stored_value(backend, "c") == (2,)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_sender_cancelled_by_asyncio_itself_finishes_the_round_trip_of_the_others() -> None:
    # An anyio shield does not stop asyncio's own task.cancel() (asyncio.wait_for, asyncio.timeout): the
    # round trip of "b" and "c" must still end as it would, and "b" be cancelled only then.
    backend = GatedBackend()
    backend.hold = True
    ids: dict[str, str] = {}
    async with make(backend) as tasks, anyio.create_task_group() as group:

        async def one(name: str, value: int) -> None:
            ids[name] = await tasks.enqueue(echo, value, task_id=name)

        group.start_soon(one, "a", 0)
        await anyio.wait_all_tasks_blocked()
        sender = asyncio.ensure_future(one("b", 1))
        await anyio.wait_all_tasks_blocked()
        group.start_soon(one, "c", 2)
        await anyio.wait_all_tasks_blocked()
        backend.release(0)  # "b" arrived first: it sends the batch of "b" and "c"
        await anyio.wait_all_tasks_blocked()
        assert backend.calls[1][0] == ["b", "c"]
        sender.cancel()
        await anyio.wait_all_tasks_blocked()
        assert not sender.done(), "the sender waits for its round trip"
        assert "c" not in ids
        backend.release()
        with pytest.raises(asyncio.CancelledError):
            await sender
    assert ids == {"a": "a", "c": "c"}
    assert await stored_value(backend, "b") == (1,)  # sent before the cancellation: stored
    assert await stored_value(backend, "c") == (2,)


async def test_a_cancelled_caller_whose_task_was_sent_leaves_and_the_task_is_stored() -> None:
    backend = GatedBackend()
    backend.hold = True
    ids: dict[str, str] = {}
    async with make(backend) as tasks, anyio.create_task_group() as group:
        scope = anyio.CancelScope()

        async def one(name: str, value: int) -> None:
            ids[name] = await tasks.enqueue(echo, value, task_id=name)

        async def cancellable() -> None:
            with scope:
                await one("c", 2)

        group.start_soon(one, "a", 0)
        await anyio.wait_all_tasks_blocked()
        group.start_soon(one, "b", 1)
        await anyio.wait_all_tasks_blocked()
        group.start_soon(cancellable)
        await anyio.wait_all_tasks_blocked()
        backend.release(0)
        await anyio.wait_all_tasks_blocked()
        assert backend.calls[1][0] == ["b", "c"]
        scope.cancel()
        await anyio.wait_all_tasks_blocked()
        assert scope.cancelled_caught  # it left at once, its task in flight
        backend.release()
    assert "c" not in ids
    assert ids["b"] == "b"
    assert await stored_value(backend, "c") == (2,)
    async with make(backend) as tasks:  # the coalescer is idle again: a new call goes at once
        assert await tasks.enqueue(echo, 3, task_id="d") == "d"


async def test_a_cancelled_lone_sender_is_cancelled_as_a_plain_enqueue_and_the_next_caller_sends() -> None:
    backend = GatedBackend()
    backend.hold = True
    ids: dict[str, str] = {}
    async with make(backend) as tasks, anyio.create_task_group() as group:
        scope = anyio.CancelScope()

        async def lone() -> None:
            with scope:
                await tasks.enqueue(echo, 0, task_id="a")

        async def one(name: str, value: int) -> None:
            ids[name] = await tasks.enqueue(echo, value, task_id=name)

        group.start_soon(lone)
        await anyio.wait_all_tasks_blocked()
        group.start_soon(one, "b", 1)
        await anyio.wait_all_tasks_blocked()
        scope.cancel()  # its round trip carries its own task only: cut short
        await anyio.wait_all_tasks_blocked()
        assert [ids for ids, _ in backend.calls] == [["a"], ["b"]]
        backend.release()
    assert scope.cancelled_caught
    assert await backend.get("a") is None
    assert ids == {"b": "b"}
    assert await stored_value(backend, "b") == (1,)


async def test_debounced_calls_are_not_coalesced_with_plain_ones() -> None:
    backend = GatedBackend()
    backend.hold = True
    async with make(backend) as tasks, anyio.create_task_group() as group:
        group.start_soon(tasks.enqueue, echo, 0)
        await anyio.wait_all_tasks_blocked()
        group.start_soon(lambda: tasks.enqueue(echo, 1, task_id="d", debounce=5))
        await anyio.wait_all_tasks_blocked()
        assert [mode for _, mode in backend.calls] == ["error", "debounce"]  # in flight side by side
        backend.release()


async def test_two_async_tasks_never_share_a_coalescer() -> None:
    first, second = GatedBackend(), GatedBackend()
    first.hold = True
    async with make(first) as one, make(second) as two, anyio.create_task_group() as group:
        group.start_soon(one.enqueue, echo, 0)
        await anyio.wait_all_tasks_blocked()
        with anyio.fail_after(5):
            task_id = await two.enqueue(echo, 1)  # not held behind the other's round trip
        first.release()
    assert second.calls == [([task_id], "error")]


async def test_many_producers_all_stored() -> None:
    backend = MemoryBackend()
    ids: dict[int, str] = {}
    async with make(backend) as tasks, anyio.create_task_group() as group:

        async def producer(start: int) -> None:
            for value in range(start, start + 20):
                ids[value] = await tasks.enqueue(echo, value)

        for start in range(0, 2000, 20):
            group.start_soon(producer, start)
    assert len(set(ids.values())) == 2000
    for value in (0, 777, 1999):
        assert await stored_value(backend, ids[value]) == (value,)
    assert len(backend._rows) == 2000


async def test_callers_that_enqueue_again_at_once_go_together_again() -> None:
    backend = GatedBackend()
    async with make(backend) as tasks, anyio.create_task_group() as group:

        async def producer() -> None:
            for value in range(5):
                await tasks.enqueue(echo, value)

        for _ in range(10):
            group.start_soon(producer)
    sizes = [len(ids) for ids, _ in backend.calls]
    assert sum(sizes) == 50
    # Not 1, 9, 1, 9, ...: the callers of a batch resume before the next one leaves, and go in it together.
    assert len(sizes) <= 7, sizes


async def check_concurrent_enqueues_on(backend: Backend) -> None:
    """On a real store: 60 concurrent enqueues (one with an id already pending, two sharing a new id) all
    stored with their own ids and arguments, each refusal on its own call only. Used by the SQLite, Redis
    and PostgreSQL tests."""
    tasks = make(backend)
    outcomes: dict[int, object] = {}
    async with tasks:
        await tasks.enqueue(echo, -1, task_id="taken")
        async with anyio.create_task_group() as group:

            async def one(value: int, task_id: str | None) -> None:
                try:
                    outcomes[value] = await tasks.enqueue(echo, value, task_id=task_id)
                except DuplicateTaskError as exc:
                    outcomes[value] = exc

            for value in range(60):
                task_id = "taken" if value == 30 else "fresh" if value in (40, 41) else None
                group.start_soon(one, value, task_id)
        refused = outcomes.pop(30)
        assert isinstance(refused, DuplicateTaskError)
        assert refused.task_id == "taken"
        assert await stored_value(backend, "taken") == (-1,)
        fresh = [outcomes.pop(40), outcomes.pop(41)]
        assert sorted(type(outcome).__name__ for outcome in fresh) == ["DuplicateTaskError", "str"]
        for value, outcome in outcomes.items():
            assert isinstance(outcome, str)
            assert await stored_value(backend, outcome) == (value,)
        assert len(set(outcomes.values())) == 57


async def test_concurrent_enqueues_on_sqlite(tmp_path: Path) -> None:
    await check_concurrent_enqueues_on(SQLiteBackend(tmp_path / "tasks.db"))


class RoundTripBackend(MemoryBackend):
    """A memory backend whose ``enqueue_many`` yields to the event loop once first, as a round trip does, so
    that the callers arriving meanwhile wait for the next batch; ``sizes`` are the sizes of its batches."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []

    async def enqueue_many(
        self, tasks: Sequence[NewTask], *, if_exists: Literal["error", "skip", "debounce"] = "error"
    ) -> list[str]:
        self.sizes.append(len(tasks))
        await anyio.lowlevel.checkpoint()
        return await super().enqueue_many(tasks, if_exists=if_exists)


async def test_waiting_callers_are_woken_without_events() -> None:
    """A caller waiting for its batch waits on a bare future of its own (asyncio) or is parked and
    rescheduled (trio), not on an ``anyio.Event`` (two coroutine layers and an ``asyncio.Event`` or
    ``trio.Event`` of bookkeeping per caller): no event is made, waited on or set for the callers."""
    backend = RoundTripBackend()
    tasks = make(backend)
    profiler = cProfile.Profile()
    async with tasks:

        async def producer(first: int) -> None:
            for value in range(first, first + 5):
                await tasks.enqueue(echo, value)

        profiler.enable()
        async with anyio.create_task_group() as group:
            for first in range(0, 200, 5):
                group.start_soon(producer, first)
        profiler.disable()
    assert sum(backend.sizes) == 200
    assert max(backend.sizes) > 1  # the callers did wait for batches
    events = {
        name: calls
        for (path, _, name), (_, calls, _, _, _) in pstats.Stats(profiler).stats.items()  # type: ignore[attr-defined]
        if (name in ("wait", "set") and path.endswith(("asyncio/locks.py", "trio/_sync.py")))
        or (name == "__new__" and path.endswith("anyio/_core/_synchronization.py"))
    }
    producers = 40  # anyio's task group makes and sets an event of its own for each task it starts
    assert events.get("wait", 0) == 0, events
    assert events.get("__new__", 0) <= producers, events
    assert events.get("set", 0) <= producers, events
