"""celery adapter: the Redis transport of kombu; no bulk enqueue API (``group().apply_async()`` publishes
one message per task).

Settings: one worker process with ``--pool=threads --concurrency=<concurrency>`` (the prefork default
would be several processes); ``--without-gossip --without-mingle --without-heartbeat`` as celery's docs
suggest for Redis; no result backend; acknowledgement before execution (celery's default
``task_acks_late=False``: a task whose worker dies is lost). The realistic mix sleeps with ``time.sleep``
in the pool threads.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from benchmarks.peers._common import Adapter, Config, main, noop_body, thread_sleep_body


def build_app(cfg: Config) -> tuple[Celery, dict[str, Any]]:
    """The celery app and its two benchmark tasks by name."""
    app = Celery("bench", broker=cfg.redis_url, set_as_current=False)
    app.conf.update(worker_hijack_root_logger=False, broker_connection_retry_on_startup=True)

    @app.task(name="noop")
    def noop(index: int) -> None:
        noop_body(index)

    @app.task(name="sleepy")
    def sleepy(index: int) -> None:
        thread_sleep_body(index)

    return app, {"noop": noop, "sleepy": sleepy}


class CeleryAdapter(Adapter):
    is_async = False
    settings = "pool=threads, concurrency=concurrency, without gossip/mingle/heartbeat"

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        self.app, tasks = build_app(cfg)
        self.task = tasks["noop" if cfg.workload == "noop" else "sleepy"]

    def enqueue(self, index: int) -> None:
        self.task.delay(index)

    def close(self) -> None:
        self.app.close()

    def work(self) -> None:
        # Celery's worker stops gracefully (warm shutdown) on SIGTERM by itself.
        self.app.worker_main(
            [
                "worker",
                "--pool=threads",
                f"--concurrency={self.cfg.concurrency}",
                "--loglevel=WARNING",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
            ]
        )


if __name__ == "__main__":
    main(CeleryAdapter, __spec__.name)
