"""taskiq adapter: asyncio, ``taskiq_redis.RedisStreamBroker`` (Redis streams with consumer groups and
acknowledgements, the taskiq-redis broker that does not lose a task when a worker dies); no bulk API.

Settings: ``max_async_tasks`` = the scenario's concurrency; the worker runs in-process through
``taskiq.api.run_receiver_task`` (what ``taskiq worker`` runs in each of its worker processes); no result
backend (taskiq's default).
"""

from __future__ import annotations

from typing import Any

from taskiq.api import run_receiver_task
from taskiq_redis import RedisStreamBroker

from benchmarks.peers._common import PROBE, Adapter, Config, main, run_async_worker, sleep_body


def build_broker(cfg: Config) -> tuple[RedisStreamBroker, dict[str, Any]]:
    """The broker and its two benchmark tasks, by name."""
    broker = RedisStreamBroker(cfg.redis_url)

    @broker.task(task_name="noop")
    async def noop(index: int) -> None:
        PROBE.start(index)
        PROBE.finish()

    @broker.task(task_name="sleepy")
    async def sleepy(index: int) -> None:
        await sleep_body(index)

    return broker, {"noop": noop, "sleepy": sleepy}


class TaskiqAdapter(Adapter):
    settings = "RedisStreamBroker, max_async_tasks=concurrency"

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        self.broker, tasks = build_broker(cfg)
        self.task = tasks["noop" if cfg.workload == "noop" else "sleepy"]

    async def open(self) -> None:
        await self.broker.startup()  # creates the consumer group, so pre-enqueued tasks are delivered

    async def enqueue(self, index: int) -> None:
        await self.task.kiq(index)

    async def close(self) -> None:
        await self.broker.shutdown()

    def work(self) -> None:
        async def run() -> None:
            await self.broker.startup()
            self.broker.is_worker_process = True
            try:
                await run_receiver_task(self.broker, max_async_tasks=self.cfg.concurrency)
            finally:
                await self.broker.shutdown()

        run_async_worker(run)


if __name__ == "__main__":
    main(TaskiqAdapter, __spec__.name)
