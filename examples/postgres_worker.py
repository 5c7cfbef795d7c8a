"""Producer and workers sharing durable tasks through PostgreSQL.

Start one or more workers (each a process; on any host that reaches the database), then produce work::

    python examples/postgres_worker.py worker        # runs until Ctrl-C (graceful: in-flight tasks finish)
    python examples/postgres_worker.py produce 100   # enqueue 100 thumbnails, print their ids, exit
    python examples/postgres_worker.py demo          # producer and worker in one process; exits when done

The database comes from ``--dsn`` or ``$LIFECYCLE_POSTGRES_DSN`` (default: the local test server,
``postgresql://postgres@127.0.0.1:5432/test``); tasks live in the schema ``--schema`` (default
``lifecycle_example``), created on first use. ``produce`` also shows the transactional outbox: each order row
and its task are written in one transaction, so a task exists if and only if its order does.

Needs ``pip install "anyio-lifecycle[postgres]"``. PostgreSQL support is asyncio-only.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import anyio
import psycopg
from psycopg import sql

import lifecycle
from lifecycle.asynctask import AsyncTasks, TaskContext, TaskState
from lifecycle.asynctask.postgres import PostgresBackend

DEFAULT_DSN = os.environ.get("LIFECYCLE_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")


def build(dsn: str, schema: str, *, execution: bool) -> AsyncTasks:
    """The task module: one PostgreSQL backend, the functions workers run."""
    tasks = AsyncTasks(PostgresBackend(dsn, schema=schema), execution=execution, concurrency=20)

    @tasks.register(name="example.make_thumbnail", max_retries=3)
    async def make_thumbnail(ctx: TaskContext, order_id: int, size: int) -> str:
        await anyio.sleep(0.01)  # the real work would go here
        ctx.logger.info("thumbnail %dpx for order %d (attempt %d)", size, order_id, ctx.attempt)
        return f"order-{order_id}-{size}px.png"

    return tasks


async def place_orders(dsn: str, schema: str, tasks: AsyncTasks, count: int) -> list[str]:
    """Insert ``count`` orders; each order's task is enqueued in the order's own transaction."""
    backend = tasks.backend
    assert isinstance(backend, PostgresBackend)
    orders = sql.Identifier(schema, "example_orders")
    task_ids: list[str] = []
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        await conn.execute(
            sql.SQL("CREATE TABLE IF NOT EXISTS {} (id serial PRIMARY KEY, size int)").format(orders)
        )
        await conn.commit()
        for _ in range(count):
            async with conn.transaction():
                cursor = await conn.execute(
                    sql.SQL("INSERT INTO {} (size) VALUES (%s) RETURNING id").format(orders), (256,)
                )
                row = await cursor.fetchone()
                assert row is not None
                # Stored iff this transaction commits: no order without its task, no task without its order.
                task_ids.append(await tasks.enqueue("example.make_thumbnail", row[0], 256, connection=conn))
    return task_ids


def worker(dsn: str, schema: str) -> int:
    """Run a worker until SIGINT/SIGTERM."""
    manager = lifecycle.TaskManager(name="postgres-worker")
    manager.add_task("async-tasks", build(dsn, schema, execution=True))
    return lifecycle.run(manager)


def produce(dsn: str, schema: str, count: int) -> int:
    """Enqueue ``count`` tasks (with their orders) from a process that does not execute tasks."""
    tasks = build(dsn, schema, execution=False)

    async def main() -> None:
        async with tasks:  # opens the backend (creates the schema on first use), closes it after
            for task_id in await place_orders(dsn, schema, tasks, count):
                print(task_id)

    anyio.run(main)
    return 0


def demo(dsn: str, schema: str, count: int) -> int:
    """Produce ``count`` tasks and run them in this process; stop when all have succeeded."""
    tasks = build(dsn, schema, execution=True)

    async def produce_and_wait() -> None:
        started = time.perf_counter()
        task_ids = await place_orders(dsn, schema, tasks, count)
        infos = [await tasks.wait(task_id, timeout=120) for task_id in task_ids]
        succeeded = sum(info.state is TaskState.SUCCEEDED for info in infos)
        elapsed = time.perf_counter() - started
        print(f"{succeeded}/{count} thumbnails made in {elapsed:.2f} s, e.g. {infos[0].result!r}")

    manager = lifecycle.TaskManager(name="postgres-demo")
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
    parser.add_argument("--dsn", default=DEFAULT_DSN)
    parser.add_argument("--schema", default="lifecycle_example")
    args = parser.parse_args(argv)
    if args.role == "worker":
        return worker(args.dsn, args.schema)
    if args.role == "produce":
        return produce(args.dsn, args.schema, args.count)
    return demo(args.dsn, args.schema, args.count)


if __name__ == "__main__":
    sys.exit(main())
