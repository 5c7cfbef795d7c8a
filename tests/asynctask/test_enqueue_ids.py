"""The ids the engine makes up for enqueues without ``task_id=``: random version 4 UUIDs in hex, as
``uuid.uuid4().hex`` writes them (asyncio and trio)."""

from __future__ import annotations

import uuid
from collections.abc import Callable

import pytest

from lifecycle.asynctask import AsyncTasks, Call, MemoryBackend
from lifecycle.asynctask._enqueue import new_task_id, new_task_ids


def echo(value: int) -> int:
    return value


def _batch_ids(count: int) -> list[str]:
    new_id = new_task_ids(count)
    return [new_id() for _ in range(count)]


@pytest.mark.parametrize("make", [lambda count: [new_task_id() for _ in range(count)], _batch_ids])
def test_a_new_task_id_is_the_hex_of_a_random_version_4_uuid(make: Callable[[int], list[str]]) -> None:
    ids = make(2000)
    assert len(set(ids)) == len(ids)
    for task_id in ids:
        parsed = uuid.UUID(hex=task_id)
        assert (parsed.hex, parsed.version, parsed.variant) == (task_id, 4, uuid.RFC_4122)
    # Every one of the 122 random bits varies across the ids (none is stuck at 0 or 1).
    ones = 0
    zeros = 0
    for task_id in ids:
        value = int(task_id, 16)
        ones |= value
        zeros |= ~value
    random_bits = (1 << 128) - 1 & ~(0xF000 << 64 | 0xC000 << 48)
    assert ones & random_bits == random_bits
    assert zeros & random_bits == random_bits


def test_a_batch_of_ids_has_as_many_as_asked() -> None:
    new_id = new_task_ids(3)
    ids = [new_id(), new_id(), new_id()]
    assert len(set(ids)) == 3
    with pytest.raises(StopIteration):
        new_id()


async def test_enqueue_many_stores_such_ids_and_the_given_ones() -> None:
    tasks = AsyncTasks(MemoryBackend(), execution=False)
    tasks.register(echo)
    async with tasks:
        ids = await tasks.enqueue_many(
            [Call(echo, 1), Call(echo, 2, task_id="mine"), Call(echo, 3, queue="other"), Call(echo, 4)]
        )
        assert ids[1] == "mine"
        generated = [ids[0], *ids[2:]]
        assert len(set(generated)) == 3
        for task_id in generated:
            assert uuid.UUID(hex=task_id).version == 4
            assert await tasks.backend.get(task_id) is not None


async def test_enqueue_without_task_id_returns_and_stores_such_an_id() -> None:
    tasks = AsyncTasks(MemoryBackend(), execution=False)
    tasks.register(echo)
    async with tasks:
        ids = [await tasks.enqueue(echo, index) for index in range(5)]
        for task_id in ids:
            assert uuid.UUID(hex=task_id).version == 4
            assert len(task_id) == 32
            info = await tasks.info(task_id)
            assert info is not None
            assert info.id == task_id
    assert len(set(ids)) == 5
