"""streaq adapter: anyio on asyncio, Redis streams with consumer groups; bulk API ``Worker.enqueue_many``
(one pipeline).

Settings: ``concurrency`` = the scenario's concurrency; everything else streaq's defaults (pickle
serializer, prefetch = concurrency).
"""

from __future__ import annotations

from streaq import Worker

from benchmarks.peers._common import PROBE, Adapter, Config, main, sleep_body


def build_worker(cfg: Config) -> Worker:
    """A streaq worker with the two benchmark tasks registered."""
    worker = Worker(redis_url=cfg.redis_url, concurrency=cfg.concurrency)

    @worker.task(name="noop")
    async def noop(index: int) -> None:
        PROBE.start(index)
        PROBE.finish()

    @worker.task(name="sleepy")
    async def sleepy(index: int) -> None:
        await sleep_body(index)

    return worker


class StreaqAdapter(Adapter):
    bulk_api = "Worker.enqueue_many"
    settings = "concurrency=concurrency"

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        self.worker = build_worker(cfg)
        self.task = self.worker.registry["noop" if cfg.workload == "noop" else "sleepy"]

    async def open(self) -> None:
        await self.worker.__aenter__()

    async def enqueue(self, index: int) -> None:
        await self.task.enqueue(index)

    async def enqueue_bulk(self, indices: range) -> None:
        await self.worker.enqueue_many([self.task.enqueue(index) for index in indices])

    async def close(self) -> None:
        await self.worker.__aexit__(None, None, None)

    def work(self) -> None:
        self.worker.run_sync()  # streaq stops gracefully on SIGTERM by itself


if __name__ == "__main__":
    main(StreaqAdapter, __spec__.name)
