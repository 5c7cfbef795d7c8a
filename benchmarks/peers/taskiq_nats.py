"""taskiq-nats adapter: asyncio, ``taskiq_nats.PullBasedJetStreamBroker`` (a JetStream stream and a durable
pull consumer with acknowledgements: the taskiq-nats broker that several worker processes share, that keeps a
task when no worker runs, and redelivers it when a worker dies before acknowledging); no bulk API.

(``PushBasedJetStreamBroker`` binds its durable consumer to one subscriber, and every process that starts
the broker subscribes, the producer included: a second process cannot start, so it is no work queue.)

``benchmarks.peers.taskiq_nats_batched`` is the same with ``pull_consume_batch`` = the concurrency, for the
drain only.

Settings: ``max_async_tasks`` = the scenario's concurrency; ``pull_consume_batch`` left at its default, 1 (a
larger batch waits for a full batch, or for the fetch timeout, before it hands out any task: a lone task then
starts seconds late); the worker runs in-process through
``taskiq.api.run_receiver_task`` (what ``taskiq worker`` runs in each of its worker processes); no result
backend (taskiq's default); acknowledged after the task ran (taskiq's default ``when_saved``).
"""

from __future__ import annotations

from typing import Any

from taskiq.api import run_receiver_task
from taskiq_nats import PullBasedJetStreamBroker

from benchmarks.peers._common import PROBE, Adapter, Config, main, run_async_worker, sleep_body


def build_broker(cfg: Config, batch: int = 1) -> tuple[PullBasedJetStreamBroker, dict[str, Any]]:
    """The broker (fetching ``batch`` messages per request) and its two benchmark tasks, by name."""
    broker = PullBasedJetStreamBroker(cfg.nats_url, pull_consume_batch=batch)

    @broker.task(task_name="noop")
    async def noop(index: int) -> None:
        PROBE.start(index)
        PROBE.finish()

    @broker.task(task_name="sleepy")
    async def sleepy(index: int) -> None:
        await sleep_body(index)

    return broker, {"noop": noop, "sleepy": sleepy}


class TaskiqNatsAdapter(Adapter):
    settings = "PullBasedJetStreamBroker, max_async_tasks=concurrency"
    storages = frozenset({"nats"})
    batch = 1

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        self.broker, tasks = build_broker(cfg, cfg.concurrency if self.batch > 1 else 1)
        self.task = tasks["noop" if cfg.workload == "noop" else "sleepy"]

    async def open(self) -> None:
        await self.broker.startup()  # creates the stream and the durable consumer

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
    main(TaskiqNatsAdapter, __spec__.name)
