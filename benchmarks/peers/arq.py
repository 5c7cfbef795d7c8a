"""arq adapter: asyncio, one Redis list per queue polled by the worker; no bulk enqueue API.

Settings: ``max_jobs`` = the scenario's concurrency; ``poll_delay`` 0.01 s instead of 0.5 s (arq polls an
idle queue; with the default every latency sample would wait ~250 ms). Results are kept (arq's default).
"""

from __future__ import annotations

from typing import Any

from arq import create_pool
from arq.connections import RedisSettings
from arq.worker import Worker, func

from benchmarks.peers._common import PROBE, Adapter, Config, main, run_async_worker, sleep_body


async def noop(ctx: dict[str, Any], index: int) -> None:
    PROBE.start(index)
    PROBE.finish()


async def sleepy(ctx: dict[str, Any], index: int) -> None:
    await sleep_body(index)


class ArqAdapter(Adapter):
    settings = "max_jobs=concurrency, poll_delay=0.01 s"

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        self.redis_settings = RedisSettings.from_dsn(cfg.redis_url)
        self.task = "noop" if cfg.workload == "noop" else "sleepy"

    async def open(self) -> None:
        self.pool = await create_pool(self.redis_settings)

    async def enqueue(self, index: int) -> None:
        await self.pool.enqueue_job(self.task, index)

    async def close(self) -> None:
        await self.pool.aclose()

    def work(self) -> None:
        async def run() -> None:
            # arq binds the worker to the event loop that is current when it is built.
            worker = Worker(
                functions=[func(noop, name="noop"), func(sleepy, name="sleepy")],
                redis_settings=self.redis_settings,
                max_jobs=self.cfg.concurrency,
                poll_delay=0.01,
                handle_signals=False,
            )
            await worker.async_run()

        run_async_worker(run)


if __name__ == "__main__":
    main(ArqAdapter, __spec__.name)
