"""The ids the engine makes up for enqueues without ``task_id=``: random version 4 UUIDs in hex, as
``uuid.uuid4().hex`` writes them (asyncio and trio)."""

from __future__ import annotations

import uuid

from lifecycle.asynctask import AsyncTasks, MemoryBackend
from lifecycle.asynctask._enqueue import new_task_id


def echo(value: int) -> int:
    return value


def test_a_new_task_id_is_the_hex_of_a_random_version_4_uuid() -> None:
    ids = [new_task_id() for _ in range(2000)]
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
