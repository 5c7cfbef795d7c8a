"""rq adapter: synchronous, one job at a time per worker; bulk API ``Queue.enqueue_many`` (one pipeline).

Settings: ``SimpleWorker`` (runs jobs in the worker process instead of forking a child per job, the
worker class rq offers for speed; the forking default measures fork() more than rq). rq has no
concurrency inside one worker process, so the scenario's concurrency does not apply; the realistic mix is
left out for rq (10 ms per job, one at a time, says nothing new).
"""

from __future__ import annotations

from redis import Redis
from rq import Queue, SimpleWorker

from benchmarks.peers._common import Adapter, Config, main, noop_body, thread_sleep_body


def noop(index: int) -> None:
    noop_body(index)


def sleepy(index: int) -> None:
    thread_sleep_body(index)


class RqAdapter(Adapter):
    is_async = False
    bulk_api = "Queue.enqueue_many"
    settings = "SimpleWorker (no fork per job), concurrency 1"

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        # By import path: the producer runs this module as __main__, which rq refuses to reference.
        self.function = f"benchmarks.peers.rq.{'noop' if cfg.workload == 'noop' else 'sleepy'}"

    def open(self) -> None:
        self.redis = Redis.from_url(self.cfg.redis_url)
        self.queue = Queue("bench", connection=self.redis)

    def enqueue(self, index: int) -> None:
        self.queue.enqueue(self.function, index)

    def enqueue_bulk(self, indices: range) -> None:
        self.queue.enqueue_many([Queue.prepare_data(self.function, (index,)) for index in indices])

    def close(self) -> None:
        self.redis.close()

    def work(self) -> None:
        redis = Redis.from_url(self.cfg.redis_url)
        # rq's worker stops gracefully (warm shutdown) on SIGTERM by itself.
        SimpleWorker([Queue("bench", connection=redis)], connection=redis).work(logging_level="WARNING")


if __name__ == "__main__":
    main(RqAdapter, __spec__.name)
