"""Our library (``lifecycle.asynctask``): ``AsyncTasks`` on ``RedisBackend`` for the Redis scenarios, on
``SQLiteBackend`` (WAL, ``synchronous=NORMAL``) for the SQLite ones, on ``NatsBackend`` (JetStream, file
storage) for the NATS ones and on ``PostgresBackend`` (its defaults, in the run's own schema) for the
PostgreSQL ones; bulk API ``AsyncTasks.enqueue_many``.

Runs in the project's own environment (the interpreter that runs ``benchmarks/run.py``). The producer is
an enqueue-only ``AsyncTasks(execution=False)``; the worker is an ``AsyncTasks`` with
``concurrency`` = the scenario's concurrency under a ``TaskManager`` run by ``lifecycle.run``, exactly as
a service runs it (SIGTERM is its graceful stop). Everything else is the library's defaults: at-least-once
delivery with leases and heartbeats, results and finished records kept for the retention period.
"""

from __future__ import annotations

from typing import Any

import lifecycle
from benchmarks.peers._common import PROBE, Adapter, Config, main, sleep_body
from lifecycle.asynctask import AsyncTasks, Backend, Call

try:
    from lifecycle.asynctask import SQLiteBackend
except ImportError:  # not re-exported from lifecycle.asynctask yet (issue 3 says it will be)
    from lifecycle.asynctask._backends.sqlite._backend import SQLiteBackend

PREFIX = "bench"


async def noop(index: int) -> None:
    PROBE.start(index)
    PROBE.finish()


async def sleepy(index: int) -> None:
    await sleep_body(index)


def build_tasks(cfg: Config, *, execution: bool) -> AsyncTasks:
    """An ``AsyncTasks`` over the scenario's storage with the two benchmark tasks registered."""
    backend: Backend
    if cfg.storage == "sqlite":
        backend = SQLiteBackend(cfg.sqlite_path, synchronous="NORMAL")
    elif cfg.storage == "postgres":
        from lifecycle.asynctask.postgres import PostgresBackend

        backend = PostgresBackend(cfg.postgres_url, schema=cfg.pg_schema)
    elif cfg.storage == "nats":
        from lifecycle.asynctask.nats import NatsBackend

        backend = NatsBackend(cfg.nats_url, prefix=PREFIX)
    else:
        from lifecycle.asynctask.redis import RedisBackend

        backend = RedisBackend(cfg.redis_url, prefix=PREFIX)
    tasks = AsyncTasks(backend, execution=execution, concurrency=cfg.concurrency)
    tasks.register(noop, name="noop")
    tasks.register(sleepy, name="sleepy")
    return tasks


class OursAdapter(Adapter):
    bulk_api = "AsyncTasks.enqueue_many"
    delayed = True
    storages = frozenset({"redis", "sqlite", "nats", "postgres"})
    settings = (
        "concurrency=concurrency; SQLite: WAL + synchronous=NORMAL; PostgreSQL: PostgresBackend defaults"
    )

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        self.function: Any = noop if cfg.workload == "noop" else sleepy

    async def open(self) -> None:
        # The store is created here, before the timing starts, as the peers' adapters install their schema in
        # open(): an enqueue-only AsyncTasks would otherwise create it inside its first, timed enqueue.
        setup = build_tasks(self.cfg, execution=True)
        await setup.backend.open()
        await setup.backend.close()
        self.tasks = build_tasks(self.cfg, execution=False)
        await self.tasks.initialize()

    async def enqueue(self, index: int) -> None:
        await self.tasks.enqueue(self.function, index)

    async def enqueue_delayed(self, index: int, delay: float) -> None:
        await self.tasks.enqueue(self.function, index, delay=delay)

    async def enqueue_bulk(self, indices: range) -> None:
        await self.tasks.enqueue_many([Call(self.function, index) for index in indices])

    async def close(self) -> None:
        await self.tasks.cleanup()

    def work(self) -> None:
        manager = lifecycle.TaskManager(name="bench-worker")
        manager.add_task("async-tasks", build_tasks(self.cfg, execution=True))
        raise SystemExit(lifecycle.run(manager))


if __name__ == "__main__":
    main(OursAdapter, __spec__.name)
