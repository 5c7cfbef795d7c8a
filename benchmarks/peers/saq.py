"""saq adapter: asyncio, Redis lists + a sorted set, listen/notify wake-ups; no bulk enqueue API
(``Queue.map`` waits for the results, so it is not an enqueue path).

Settings: ``concurrency`` = the scenario's concurrency; everything else saq's defaults.
"""

from __future__ import annotations

from typing import Any

from saq import Queue, Worker

from benchmarks.peers._common import PROBE, Adapter, Config, main, run_async_worker, sleep_body


async def noop(ctx: dict[str, Any], *, index: int) -> None:
    PROBE.start(index)
    PROBE.finish()


async def sleepy(ctx: dict[str, Any], *, index: int) -> None:
    await sleep_body(index)


class SaqAdapter(Adapter):
    settings = "concurrency=concurrency"

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        self.task = "noop" if cfg.workload == "noop" else "sleepy"

    async def open(self) -> None:
        self.queue = Queue.from_url(self.cfg.redis_url)
        await self.queue.connect()

    async def enqueue(self, index: int) -> None:
        await self.queue.enqueue(self.task, index=index)

    async def close(self) -> None:
        await self.queue.disconnect()

    def work(self) -> None:
        async def run() -> None:
            queue = Queue.from_url(self.cfg.redis_url)
            worker = Worker(queue, [noop, sleepy], concurrency=self.cfg.concurrency)
            await queue.connect()
            try:
                await worker.start()
            finally:
                await queue.disconnect()

        run_async_worker(run)


if __name__ == "__main__":
    main(SaqAdapter, __spec__.name)
