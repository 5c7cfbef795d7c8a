"""dramatiq adapter: threads, ``RedisBroker``; no bulk enqueue API (``group().run()`` sends one by one).

Settings: ``worker_threads`` = the scenario's concurrency (dramatiq's default is 8 per process); default
middleware; the worker runs in-process (what ``dramatiq`` runs in each of its worker processes). The
realistic mix sleeps with ``time.sleep`` in the worker threads.
"""

from __future__ import annotations

import dramatiq
from dramatiq.brokers.redis import RedisBroker

from benchmarks.peers._common import Adapter, Config, main, noop_body, thread_sleep_body, wait_for_sigterm


def noop(index: int) -> None:
    noop_body(index)


def sleepy(index: int) -> None:
    thread_sleep_body(index)


class DramatiqAdapter(Adapter):
    is_async = False
    settings = "worker_threads=concurrency"

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        self.broker = RedisBroker(url=cfg.redis_url)
        actors = {
            fn.__name__: dramatiq.actor(fn, actor_name=fn.__name__, broker=self.broker)
            for fn in (noop, sleepy)
        }
        self.actor = actors["noop" if cfg.workload == "noop" else "sleepy"]

    def enqueue(self, index: int) -> None:
        self.actor.send(index)

    def work(self) -> None:
        worker = dramatiq.Worker(self.broker, worker_threads=self.cfg.concurrency)
        worker.start()
        wait_for_sigterm()
        worker.stop()


if __name__ == "__main__":
    main(DramatiqAdapter, __spec__.name)
