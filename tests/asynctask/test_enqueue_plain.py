"""``enqueue`` without options builds its task without a ``Call`` (``build_plain_task``): the task, and every
error, must be exactly what the general path (``build_task``) makes of the same call (asyncio and trio)."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from lifecycle.asynctask import AsyncTasks, Call, JSONEncoding, MemoryBackend, NewTask
from lifecycle.asynctask._enqueue import build_plain_task, build_task


def echo(value: int) -> int:
    return value


def unregistered(value: int) -> int:
    return value


def make() -> AsyncTasks:
    tasks = AsyncTasks(MemoryBackend(), execution=False)
    tasks.register(echo)
    tasks.register(echo, name="slow", queue="slow", max_retries=7, timeout=30, priority=5)
    return tasks


def both(tasks: AsyncTasks, target: Any, *args: Any) -> tuple[NewTask, NewTask]:
    registry, encoding = tasks._registry, tasks._encoding
    plain = build_plain_task(target, args, 100.0, registry, encoding)
    general = build_task(Call(target, *args), 100.0, registry, encoding)
    return plain, general


@pytest.mark.parametrize("target", [echo, "echo", "slow", "app.elsewhere.job"])
def test_a_plain_call_makes_the_task_the_general_path_makes(target: Any) -> None:
    plain, general = both(make(), target, 3)
    assert plain.id != general.id  # both generated
    assert plain.generated_id
    assert general.generated_id
    assert plain == dataclasses.replace(general, id=plain.id)
    assert JSONEncoding().decode(plain.payload) == (3,)


@pytest.mark.parametrize(
    ("target", "args", "error"),
    [
        (unregistered, (1,), TypeError),  # not registered
        ("", (1,), ValueError),  # not a name
        (echo, (), TypeError),  # too few arguments
        (echo, ("three",), TypeError),  # against the annotation
        ("app.elsewhere.job", (object(),), TypeError),  # cannot be encoded
    ],
)
def test_a_plain_call_fails_as_the_general_path_does(target: Any, args: tuple[Any, ...], error: type) -> None:
    tasks = make()
    with pytest.raises(error) as plain:
        build_plain_task(target, args, 100.0, tasks._registry, tasks._encoding)
    with pytest.raises(error) as general:
        build_task(Call(target, *args), 100.0, tasks._registry, tasks._encoding)
    assert str(plain.value) == str(general.value)


async def test_enqueue_without_options_stores_the_registered_defaults() -> None:
    async with make() as tasks:
        task_id = await tasks.enqueue("slow", 4)
        record = await tasks.backend.get(task_id)
        assert record is not None
        assert (record.queue, record.max_retries, record.timeout, record.priority) == ("slow", 7, 30, 5)
        assert record.run_at == record.enqueued_at
