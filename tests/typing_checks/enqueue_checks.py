"""What mypy and pyright say about typed task calls (checked by ``test_typing_checks.py``, never run).

Every line ending in ``# error`` must be reported by both checkers, and no other line may be: the correct
calls below are clean, the wrong ones are flagged at the call site.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from typing_extensions import assert_type

from lifecycle.asynctask import AsyncTasks, Call, MemoryBackend, NewTask, TaskContext, TaskInfo, with_meta

tasks = AsyncTasks(MemoryBackend())


@dataclass
class Address:
    street: str


@tasks.register
async def send_welcome(user_id: int) -> None: ...


@tasks.register
async def notify(ctx: TaskContext, user_id: int, message: str = "hi") -> bool:
    return True


@tasks.register
def resize(path: str, width: int) -> bytes:
    return b""


@tasks.register
def sync_with_context(ctx: TaskContext, address: Address | None) -> None: ...


@tasks.register
async def no_arguments() -> None: ...


@tasks.register
async def only_context(ctx: TaskContext) -> None: ...


@tasks.register
async def collections(ids: list[int], weights: dict[str, float], when: datetime) -> None: ...


async def correct_calls() -> None:
    assert_type(await tasks.enqueue(send_welcome, 42), str)
    await tasks.enqueue(send_welcome, 42, delay=5, queue="mail", max_retries=2, timeout=3.0, task_id="k")
    await tasks.enqueue(send_welcome, 42, delay=timedelta(minutes=1), connection=None)
    await tasks.enqueue(notify, 42)
    await tasks.enqueue(notify, 42, "welcome back")
    await tasks.enqueue(resize, "a.png", 640)
    await tasks.enqueue(sync_with_context, Address("Main St"))
    await tasks.enqueue(sync_with_context, None)
    await tasks.enqueue(no_arguments)
    await tasks.enqueue(only_context)
    await tasks.enqueue(collections, [1, 2], {"a": 0.5}, datetime.now())
    await tasks.enqueue("emails.welcome", "anything", 1, object(), delay=3)
    ids = await tasks.enqueue_many([Call(send_welcome, 1), Call(notify, 2, delay=1), Call("x", object())])
    assert_type(ids, list[str])
    await tasks.enqueue_chain([Call(resize, "a.png", 1), Call(only_context), Call(no_arguments)])
    with tasks.blocking() as producer:
        assert_type(producer.enqueue(send_welcome, 42, delay=5), str)
        producer.enqueue(notify, 42, "x")
        producer.enqueue("emails.welcome", 1, 2)
        producer.enqueue_many([Call(resize, "b.png", 2)])
        producer.enqueue_chain([Call(no_arguments)])
        info = producer.info("id")
        assert_type(info, TaskInfo | None)
        assert_type(producer.wait("id", timeout=1), TaskInfo)


async def wrong_calls() -> None:
    await tasks.enqueue(send_welcome, "42")  # error
    await tasks.enqueue(send_welcome)  # error
    await tasks.enqueue(send_welcome, 42, 43)  # error
    await tasks.enqueue(notify, "42")  # error
    await tasks.enqueue(notify, 42, 43)  # error
    await tasks.enqueue(notify)  # error
    await tasks.enqueue(resize, "a.png", "640")  # error
    await tasks.enqueue(resize, 640)  # error
    await tasks.enqueue(sync_with_context, {"street": "Main St"})  # error
    await tasks.enqueue(no_arguments, 1)  # error
    await tasks.enqueue(only_context, 1)  # error
    await tasks.enqueue(collections, ["1"], {"a": 0.5}, datetime.now())  # error
    await tasks.enqueue(collections, [1], {"a": 0.5}, "2024-01-01")  # error
    await tasks.enqueue(send_welcome, 42, delay="soon")  # error
    await tasks.enqueue(send_welcome, 42, dealy=5)  # error
    await tasks.enqueue("emails.welcome", 1, queue=3)  # error
    await tasks.enqueue_many([Call(send_welcome, "42")])  # error
    await tasks.enqueue_many([Call(notify)])  # error
    await tasks.enqueue_chain([Call(resize, "a.png"), Call(no_arguments)])  # error
    Call(send_welcome, 42, connection=None)  # error
    with tasks.blocking() as producer:
        producer.enqueue(send_welcome, "42")  # error
        producer.enqueue(notify, 42, 43)  # error
        producer.enqueue(send_welcome, 42, at="noon")  # error
        producer.enqueue(send_welcome, 42, meta={"tenant": 1})  # error


@tasks.middleware
async def timed(ctx: TaskContext, call_next: Callable[[], Awaitable[Any]]) -> Any:
    return await call_next()


@tasks.on_enqueue
def tag(task: NewTask) -> NewTask | None:
    return with_meta(task, tenant="acme")


async def metadata_calls() -> None:
    await tasks.enqueue(send_welcome, 42, meta={"tenant": "acme"})
    await tasks.enqueue_many([Call(notify, 1, meta={"tenant": "acme"})])
    await tasks.enqueue(send_welcome, 42, meta={"tenant": 1})  # error
    Call(send_welcome, 42, meta=["tenant"])  # error


def sync_middleware(ctx: TaskContext, call_next: Callable[[], Awaitable[Any]]) -> int:
    return 1


def bad_hook(task: NewTask) -> str:
    return "no"


tasks.middleware(sync_middleware)  # error
tasks.on_enqueue(bad_hook)  # error
