"""``with tasks.blocking() as producer:``: enqueue and inspect from plain synchronous code, with no manager
and no event loop, on SQLite, PostgreSQL and Redis (the producer's own loop: asyncio, in a background thread).

The tests are synchronous functions on purpose: that is the code a producer serves. A worker, when one is
needed, runs in an event loop of its own in another thread (another ``AsyncTasks`` over the same storage),
as it would in another process.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest
import trio
from anyio.from_thread import start_blocking_portal

from lifecycle.asynctask import AsyncTasks, BackendError, Call, TaskContext, TaskState, backend_from_url
from tests.asynctask.postgres.procs_url import postgres_url
from tests.asynctask.redis.redis_servers import delete_prefix


def add(a: int, b: int) -> int:
    return a + b


async def double(ctx: TaskContext) -> int:
    return int(ctx.previous_result) * 2


def threads_left_running(before: set[threading.Thread]) -> list[threading.Thread]:
    """The threads started since ``before`` that are still alive after a bounded wait for them to end (the
    event loop's worker threads end shortly after the loop closes, each on its own)."""
    left = [thread for thread in threading.enumerate() if thread not in before]
    for thread in left:
        thread.join(timeout=10)
    return [thread for thread in left if thread.is_alive()]


def _sqlite(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    yield f"sqlite:///{tmp_path / 'tasks.db'}"


def _redis(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    base = str(request.getfixturevalue("redis_url"))
    prefix = f"producer-{uuid.uuid4().hex[:12]}"
    yield f"{base}?prefix={prefix}"
    anyio.run(delete_prefix, base, prefix)


URLS: dict[str, Callable[[pytest.FixtureRequest, Path], Iterator[str]]] = {
    "sqlite": _sqlite,
    "postgres": postgres_url,
    "redis": _redis,
}


@pytest.fixture(params=sorted(URLS))
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Fresh, empty storage of each backend."""
    yield from URLS[request.param](request, tmp_path)


def make_tasks(url: str, **options: Any) -> AsyncTasks:
    tasks = AsyncTasks(backend_from_url(url), poll_interval=0.05, **options)
    tasks.register(add, name="add")
    tasks.register(double, name="double")
    return tasks


@contextlib.contextmanager
def worker_running(url: str) -> Iterator[AsyncTasks]:
    """A worker over ``url`` in an asyncio event loop of its own thread, drained at the end."""
    worker = make_tasks(url)
    with start_blocking_portal("asyncio") as portal:
        portal.call(worker.initialize)
        execution = portal.start_task_soon(worker.execute)
        try:
            yield worker
        finally:
            execution.cancel()
            concurrent.futures.wait([execution], timeout=30)
            portal.call(worker.cleanup)


def test_a_producer_enqueues_and_waits_from_plain_synchronous_code(url: str) -> None:
    tasks = make_tasks(url, execution=False)
    with worker_running(url), tasks.blocking() as producer:
        task_id = producer.enqueue(add, 2, 3)
        info = producer.wait(task_id, timeout=30)
        assert (info.state, info.result) == (TaskState.SUCCEEDED, 5)
        assert producer.info(task_id) == info
        ids = producer.enqueue_many([Call(add, 1, 1), Call("add", 10, 20, delay=0)])
        assert [producer.wait(i, timeout=30).result for i in ids] == [2, 30]
        chain_id = producer.enqueue_chain([Call(add, 4, 5), Call(double)])
        chain = producer.wait(chain_id, timeout=30)
        assert chain.chain is not None
        assert (chain.chain.state, chain.chain.result) == (TaskState.SUCCEEDED, 18)
        assert producer.info("no-such-task") is None


def test_one_producer_is_shared_by_the_threads_of_a_wsgi_server(url: str) -> None:
    tasks = make_tasks(url, execution=False)
    producers: set[int] = set()

    def request(number: int) -> str:
        # What each request handler does: its own `with` block, sharing the one open producer.
        with tasks.blocking() as producer:
            producers.add(id(producer))
            return producer.enqueue(add, number, number)

    with tasks.blocking() as producer, concurrent.futures.ThreadPoolExecutor(8) as pool:
        ids = list(pool.map(request, range(80)))
        more = list(pool.map(lambda n: producer.enqueue(add, n, 1), range(40)))
        infos = [producer.info(task_id) for task_id in ids + more]
    assert producers == {id(producer)}
    assert len(set(ids + more)) == 120
    assert all(info is not None and info.state is TaskState.PENDING for info in infos)


def test_arguments_are_checked_before_anything_is_stored(url: str) -> None:
    tasks = make_tasks(url, execution=False)
    with tasks.blocking() as producer:
        with pytest.raises(TypeError, match=r"argument 2 \(b\) must be int, got str \('3'\)"):
            producer.enqueue(add, 2, "3")  # type: ignore[arg-type, call-arg]
        with pytest.raises(TypeError, match=r"argument 1 \(a\) must be int, got float"):
            producer.enqueue_many([Call(add, 1, 2), Call(add, 1.5, 2)])  # type: ignore[arg-type, call-arg]
        with pytest.raises(TypeError, match="takes 2 arguments"):
            producer.enqueue("add", 1)
        assert producer.enqueue(add, 1, 2)  # the refusals left the producer usable
        with tasks.blocking() as same:
            assert same is producer


def test_the_backend_is_closed_when_the_last_block_ends_and_can_be_opened_again(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'tasks.db'}"
    tasks = make_tasks(url, execution=False)
    threads_before = set(threading.enumerate())
    with tasks.blocking() as producer:
        first = producer.enqueue(add, 1, 2)
        with tasks.blocking():
            pass
        assert producer.info(first) is not None  # an inner block's end closes nothing
    assert threads_left_running(threads_before) == []  # the producer's loop and its worker threads stopped
    with pytest.raises(RuntimeError, match=r"after its `with tasks\.blocking"):
        producer.info(first)
    with tasks.blocking() as again:
        assert again is not producer
        info = again.info(first)
        assert info is not None
        assert info.state is TaskState.PENDING


def test_a_producer_refuses_to_block_a_running_event_loop(tmp_path: Path) -> None:
    tasks = make_tasks(f"sqlite:///{tmp_path / 'tasks.db'}", execution=False)

    async def inside(producer: Any) -> None:
        with pytest.raises(RuntimeError, match=r"inside a running asyncio event loop.*await tasks\.enqueue"):
            producer.enqueue(add, 1, 2)
        refused = pytest.raises(
            RuntimeError, match=r"tasks\.blocking\(\) blocks its thread.*async with tasks"
        )
        with refused, tasks.blocking():
            pass

    async def inside_trio(producer: Any) -> None:
        with pytest.raises(RuntimeError, match=r"inside a running trio event loop.*await tasks\.wait"):
            producer.wait("x", timeout=1)

    with tasks.blocking() as producer:
        asyncio.run(inside(producer))
        trio.run(inside_trio, producer)
        assert producer.info("x") is None


def test_an_async_tasks_open_in_an_event_loop_cannot_be_shared_with_a_producer(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'tasks.db'}"
    tasks = make_tasks(url, execution=False)

    def enter() -> None:
        with tasks.blocking():
            pass

    async def main() -> None:
        async with tasks:
            with pytest.raises(RuntimeError, match="open already in an event loop"):
                await anyio.to_thread.run_sync(enter)

    anyio.run(main)
    with tasks.blocking() as producer:
        with pytest.raises(RuntimeError, match=r"open in the event loop of a `with tasks\.blocking"):
            anyio.run(tasks.initialize)
        assert producer.enqueue(add, 1, 2)


def test_an_unusable_backend_fails_the_block_and_leaves_nothing_running(tmp_path: Path) -> None:
    tasks = AsyncTasks(backend_from_url(f"sqlite:///{tmp_path / 'missing' / 'tasks.db'}"), execution=False)
    threads_before = set(threading.enumerate())
    with pytest.raises(BackendError, match=r"tasks\.db"), tasks.blocking():
        pass
    assert threads_left_running(threads_before) == []
