"""huey adapter: threads; ``RedisHuey`` (blocking reads, huey's default) for the Redis scenarios and
``SqliteHuey`` for the SQLite ones; no bulk enqueue API.

Settings: consumer ``workers`` = the scenario's concurrency with ``worker_type="thread"``; results kept
(huey's default). SqliteHuey: WAL (its default) with ``synchronous=NORMAL``, the same durability setting as
our SQLite backend (huey's own ``fsync`` flag only offers FULL or OFF). The realistic mix sleeps with
``time.sleep`` in the worker threads.
"""

from __future__ import annotations

import sqlite3
from typing import Any

from huey import RedisHuey, SqliteHuey
from huey.api import Huey
from huey.storage import SqliteStorage

from benchmarks.peers._common import Adapter, Config, main, noop_body, thread_sleep_body


class NormalSyncSqliteStorage(SqliteStorage):
    """SqliteStorage with ``PRAGMA synchronous=NORMAL`` (WAL stays on)."""

    def _create_connection(self) -> sqlite3.Connection:
        conn: sqlite3.Connection = super()._create_connection()
        conn.execute("pragma synchronous=1")
        return conn


def build_huey(cfg: Config) -> tuple[Huey, dict[str, Any]]:
    """The huey instance for the scenario's storage, and its two benchmark tasks by name."""
    if cfg.storage == "sqlite":
        huey: Huey = SqliteHuey("bench", filename=cfg.sqlite_path, storage_class=NormalSyncSqliteStorage)
    else:
        huey = RedisHuey("bench", url=cfg.redis_url)

    @huey.task(name="noop")
    def noop(index: int) -> None:
        noop_body(index)

    @huey.task(name="sleepy")
    def sleepy(index: int) -> None:
        thread_sleep_body(index)

    return huey, {"noop": noop, "sleepy": sleepy}


class HueyAdapter(Adapter):
    is_async = False
    storages = frozenset({"redis", "sqlite"})
    settings = "workers=concurrency, worker_type=thread; SQLite: WAL + synchronous=NORMAL"

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        self.huey, tasks = build_huey(cfg)
        self.task = tasks["noop" if cfg.workload == "noop" else "sleepy"]

    def enqueue(self, index: int) -> None:
        self.task(index)

    def work(self) -> None:
        # The consumer stops gracefully on SIGTERM by itself.
        self.huey.create_consumer(workers=self.cfg.concurrency, worker_type="thread").run()


if __name__ == "__main__":
    main(HueyAdapter, __spec__.name)
