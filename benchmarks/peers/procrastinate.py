"""procrastinate adapter: asyncio, ``procrastinate.App`` on its psycopg 3 connector (``PsycopgConnector``,
a psycopg_pool pool at its default size); bulk API ``Task.batch_defer_async``.

Settings: worker ``concurrency`` = the scenario's concurrency; everything else is procrastinate's default:
LISTEN/NOTIFY wake-ups with ``fetch_job_polling_interval`` 5 s as the fallback, finished jobs kept
(``delete_jobs`` "never"), heartbeats. Its schema (``apply_schema_async``) is created in the run's own schema
through the connections' ``search_path``; its NOTIFY channels are fixed names (``procrastinate_any_queue_v1``
...), which nothing else on the server listens to.
"""

from __future__ import annotations

from typing import Any

import procrastinate

from benchmarks.peers._common import PROBE, Adapter, Config, main, run_async_worker, sleep_body


def build_app(cfg: Config) -> tuple[procrastinate.App, dict[str, Any]]:
    """The app, connected to the run's own schema, and its two benchmark tasks by name."""
    connector = procrastinate.PsycopgConnector(
        conninfo=cfg.postgres_url, kwargs={"options": f"-c search_path={cfg.pg_schema}"}
    )
    app = procrastinate.App(connector=connector)

    @app.task(name="noop")
    async def noop(index: int) -> None:
        PROBE.start(index)
        PROBE.finish()

    @app.task(name="sleepy")
    async def sleepy(index: int) -> None:
        await sleep_body(index)

    return app, {"noop": noop, "sleepy": sleepy}


class ProcrastinateAdapter(Adapter):
    bulk_api = "Task.batch_defer_async"
    storages = frozenset({"postgres"})
    settings = "concurrency=concurrency, psycopg_pool at its default size, delete_jobs never (default)"

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        self.app, tasks = build_app(cfg)
        self.task = tasks["noop" if cfg.workload == "noop" else "sleepy"]

    async def open(self) -> None:
        await self.app.open_async()
        await self.app.schema_manager.apply_schema_async()  # into the run's own, empty schema

    async def enqueue(self, index: int) -> None:
        await self.task.defer_async(index=index)

    async def enqueue_bulk(self, indices: range) -> None:
        await self.task.batch_defer_async(*({"index": index} for index in indices))

    async def close(self) -> None:
        await self.app.close_async()

    def work(self) -> None:
        async def run() -> None:
            async with self.app.open_async():
                await self.app.run_worker_async(
                    concurrency=self.cfg.concurrency, install_signal_handlers=False
                )

        run_async_worker(run)


if __name__ == "__main__":
    main(ProcrastinateAdapter, __spec__.name)
