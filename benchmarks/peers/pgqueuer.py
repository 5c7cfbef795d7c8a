"""pgqueuer adapter: asyncio, ``PgQueuer`` on one asyncpg connection (``AsyncpgDriver``); bulk API
``Queries.enqueue`` with lists (one multi-row INSERT).

Settings: ``batch_size`` = half the scenario's concurrency (16 at concurrency 32; pgqueuer's default is 10)
with ``max_concurrent_tasks`` = the concurrency: pgqueuer refuses a cap below twice the batch size, so 16 is
the largest batch that keeps the worker at the concurrency the other libraries run at. Everything else is
pgqueuer's default: LISTEN/NOTIFY wake-ups, ``dequeue_timeout`` 30 s, heartbeats, finished jobs moved to
its log table. Its objects live in the run's own schema (``PGQUEUER_SCHEMA``) and its NOTIFY channel is named
after that schema (``PGQUEUER_CHANNEL``: channels are database-wide), so nothing it creates is shared.
"""

from __future__ import annotations

import os
from typing import Any

from benchmarks.peers._common import PROBE, Adapter, Config, main, run_async_worker, sleep_body


def _configure(cfg: Config) -> None:
    # pgqueuer reads its object names from the environment once per process; set them before it does.
    os.environ["PGQUEUER_SCHEMA"] = cfg.pg_schema
    os.environ["PGQUEUER_CHANNEL"] = f"{cfg.pg_schema}_ch"


async def _connect(cfg: Config) -> Any:
    import asyncpg  # type: ignore[import-untyped]  # asyncpg ships no type information

    return await asyncpg.connect(cfg.postgres_url, server_settings={"search_path": cfg.pg_schema})


class PgqueuerAdapter(Adapter):
    bulk_api = "Queries.enqueue (lists)"
    storages = frozenset({"postgres"})

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        _configure(cfg)
        self.batch = max(1, cfg.concurrency // 2)
        self.settings = (
            f"batch_size={self.batch}, max_concurrent_tasks=concurrency, one asyncpg connection per process"
        )
        self.entrypoint = "noop" if cfg.workload == "noop" else "sleepy"

    async def open(self) -> None:
        from pgqueuer import AsyncpgDriver, Queries

        self.connection = await _connect(self.cfg)
        self.queries = Queries(AsyncpgDriver(self.connection))
        await self.queries.install(create_schema=False)  # into the run's own, empty schema

    async def enqueue(self, index: int) -> None:
        await self.queries.enqueue(self.entrypoint, str(index).encode())

    async def enqueue_bulk(self, indices: range) -> None:
        size = len(indices)
        await self.queries.enqueue(
            [self.entrypoint] * size, [str(index).encode() for index in indices], [0] * size
        )

    async def close(self) -> None:
        await self.connection.close()

    def work(self) -> None:
        async def run() -> None:
            from pgqueuer import AsyncpgDriver, Job, PgQueuer

            connection = await _connect(self.cfg)
            pgq = PgQueuer(AsyncpgDriver(connection))

            @pgq.entrypoint("noop")
            async def noop(job: Job) -> None:
                PROBE.start(int(job.payload or b"0"))
                PROBE.finish()

            @pgq.entrypoint("sleepy")
            async def sleepy(job: Job) -> None:
                await sleep_body(int(job.payload or b"0"))

            try:
                await pgq.run(batch_size=self.batch, max_concurrent_tasks=self.cfg.concurrency)
            finally:
                await connection.close()

        run_async_worker(run)


if __name__ == "__main__":
    main(PgqueuerAdapter, __spec__.name)
