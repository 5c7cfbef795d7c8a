"""Producer and workers sharing durable tasks through Redis.

Start one or more workers (each a process; on any host that reaches the server), then produce work::

    python examples/redis_worker.py worker        # runs until Ctrl-C (graceful: in-flight tasks finish)
    python examples/redis_worker.py produce 100   # enqueue 100 thumbnails, print their ids, exit
    python examples/redis_worker.py demo          # producer and worker in one process; exits when done

The server comes from ``--url`` or ``$LIFECYCLE_REDIS_URL`` (default: the local server,
``redis://127.0.0.1:6379/0``; use ``rediss://`` for TLS and ``redis://user:password@host`` for a login).
Keys are named ``{lifecycle_example}:...`` (``--prefix``). ``produce`` enqueues with ``task_id`` set, so
producing the same order twice is refused while its thumbnail is still pending (``DuplicateTaskError``).

Needs ``pip install "anyio-lifecycle[redis]"``. Redis support is asyncio-only.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import anyio

import lifecycle
from lifecycle.asynctask import AsyncTasks, Call, TaskContext, TaskState
from lifecycle.asynctask.redis import RedisBackend

DEFAULT_URL = os.environ.get("LIFECYCLE_REDIS_URL", "redis://127.0.0.1:6379/0")


def build(url: str, prefix: str, *, execution: bool) -> AsyncTasks:
    """The task module: one Redis backend, the functions workers run."""
    # poll_interval only bounds how long an idle worker sleeps without any wake-up: the Redis backend blocks
    # on the server and is woken at once by an enqueue, so a long interval costs no latency.
    tasks = AsyncTasks(
        RedisBackend(url, prefix=prefix), execution=execution, concurrency=50, poll_interval=30
    )

    @tasks.register(name="example.make_thumbnail", max_retries=3)
    async def make_thumbnail(ctx: TaskContext, order_id: int, size: int) -> str:
        await anyio.sleep(0.01)  # the real work would go here
        ctx.logger.info("thumbnail %dpx for order %d (attempt %d)", size, order_id, ctx.attempt)
        return f"order-{order_id}-{size}px.png"

    return tasks


async def enqueue_orders(tasks: AsyncTasks, count: int) -> list[str]:
    """Enqueue one thumbnail per order in one round trip; the order number is the task id."""
    first = int(time.time() * 1000)
    calls = [
        Call("example.make_thumbnail", order, 256, task_id=f"thumbnail-{order}")
        for order in range(first, first + count)
    ]
    return await tasks.enqueue_many(calls)


def worker(url: str, prefix: str) -> int:
    """Run a worker until SIGINT/SIGTERM."""
    manager = lifecycle.TaskManager(name="redis-worker")
    manager.add_task("async-tasks", build(url, prefix, execution=True))
    return lifecycle.run(manager)


def produce(url: str, prefix: str, count: int) -> int:
    """Enqueue ``count`` tasks from a process that does not execute tasks."""
    tasks = build(url, prefix, execution=False)

    async def main() -> None:
        async with tasks:  # opens the backend, closes it after
            for task_id in await enqueue_orders(tasks, count):
                print(task_id)

    anyio.run(main)
    return 0


def demo(url: str, prefix: str, count: int) -> int:
    """Produce ``count`` tasks and run them in this process; stop when all have succeeded."""
    tasks = build(url, prefix, execution=True)

    async def produce_and_wait() -> None:
        started = time.perf_counter()
        task_ids = await enqueue_orders(tasks, count)
        infos = [await tasks.wait(task_id, timeout=120) for task_id in task_ids]
        succeeded = sum(info.state is TaskState.SUCCEEDED for info in infos)
        elapsed = time.perf_counter() - started
        print(f"{succeeded}/{count} thumbnails made in {elapsed:.2f} s, e.g. {infos[0].result!r}")

    manager = lifecycle.TaskManager(name="redis-demo")
    manager.add_task("async-tasks", tasks)
    manager.add_execute_task("producer", produce_and_wait, lifecycle.TaskType.STOP_GROUP)
    return lifecycle.run(manager)


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run the chosen role."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("role", choices=("worker", "produce", "demo"))
    parser.add_argument("count", nargs="?", type=int, default=20, help="tasks to produce (produce, demo)")
    parser.add_argument("--url", default=DEFAULT_URL)
    parser.add_argument("--prefix", default="lifecycle_example")
    args = parser.parse_args(argv)
    if args.role == "worker":
        return worker(args.url, args.prefix)
    if args.role == "produce":
        return produce(args.url, args.prefix, args.count)
    return demo(args.url, args.prefix, args.count)


if __name__ == "__main__":
    sys.exit(main())
