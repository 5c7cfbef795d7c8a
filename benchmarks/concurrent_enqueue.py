"""Concurrent producers: ``--producers`` coroutines, each awaiting single ``enqueue`` calls one after the
other, on the memory, SQLite, Redis and PostgreSQL backends (issue 17, "Concurrent producers").

    python benchmarks/concurrent_enqueue.py --n 10000 --rounds 3

Prints enqueues per second (every enqueue returned, so every task was durably stored) for each backend and
round, and the median. Each run uses a store of its own: a fresh SQLite file in a temporary directory, a
Redis key prefix and a PostgreSQL schema named after the process id and the round, removed at the end (the
keys of that prefix only, that schema only). ``--redis-url`` and ``--postgres-dsn`` name the servers.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

from lifecycle.asynctask import AsyncTasks, Backend, MemoryBackend, SQLiteBackend


def noop(value: int) -> None:
    """The task enqueued (never run: the AsyncTasks is enqueue-only)."""


async def run(backend: Backend, n: int, producers: int) -> tuple[float, float]:
    """Enqueues per second of ``producers`` coroutines enqueueing ``n`` tasks in all, and this process's CPU
    time per enqueue in microseconds (the servers' own time is not in it)."""
    tasks = AsyncTasks(backend, execution=False)
    tasks.register(noop)
    async with tasks:
        await tasks.enqueue(noop, -1)  # the store exists and the connections are warm before the clock
        each = n // producers

        async def producer(index: int) -> None:
            for i in range(each):
                await tasks.enqueue(noop, index * each + i)

        started = time.perf_counter()
        cpu = time.process_time()
        async with anyio.create_task_group() as group:
            for index in range(producers):
                group.start_soon(producer, index)
        elapsed = time.perf_counter() - started
        cpu = time.process_time() - cpu
    return each * producers / elapsed, cpu / (each * producers) * 1e6


async def drop_redis(url: str, prefix: str) -> None:
    """Delete the keys of ``prefix`` (the run's own), and nothing else."""
    import redis.asyncio as aioredis

    client: Any = aioredis.Redis.from_url(url)
    try:
        keys = [key async for key in client.scan_iter(match="{" + prefix + "}:*", count=1000)]
        for start in range(0, len(keys), 1000):
            await client.delete(*keys[start : start + 1000])
    finally:
        await client.aclose()


async def drop_schema(dsn: str, schema: str) -> None:
    """Drop the run's own schema."""
    import psycopg

    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


async def one(
    kind: str, n: int, producers: int, round_: int, args: argparse.Namespace
) -> tuple[float, float]:
    name = f"bench_coalesce_{os.getpid()}_{round_}"
    if kind == "memory":
        return await run(MemoryBackend(), n, producers)
    if kind == "sqlite":
        with tempfile.TemporaryDirectory() as directory:
            return await run(SQLiteBackend(Path(directory) / "tasks.db"), n, producers)
    if kind == "redis":
        from lifecycle.asynctask.redis import RedisBackend

        try:
            return await run(RedisBackend(args.redis_url, prefix=name), n, producers)
        finally:
            await drop_redis(args.redis_url, name)
    if kind == "postgres":
        from lifecycle.asynctask.postgres import PostgresBackend

        try:
            return await run(PostgresBackend(args.postgres_dsn, schema=name), n, producers)
        finally:
            await drop_schema(args.postgres_dsn, name)
    raise ValueError(f"unknown backend {kind!r}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000, help="tasks per run (at most 20000)")
    parser.add_argument("--producers", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--backends", default="memory,sqlite,redis,postgres")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--postgres-dsn", default="postgresql://postgres@127.0.0.1:5432/test")
    args = parser.parse_args(argv)
    if args.n > 20_000:
        sys.exit("--n: at most 20000")
    results: dict[str, list[float]] = {}
    for round_ in range(args.rounds):  # rounds interleaved across backends
        for kind in args.backends.split(","):
            rate, cpu = anyio.run(one, kind, args.n, args.producers, round_, args)
            results.setdefault(kind, []).append(rate)
            print(f"round {round_ + 1} {kind:8} {rate:9.0f} enqueues/s {cpu:6.1f} us CPU/enqueue", flush=True)
    for kind, rates in results.items():
        shown = " ".join(f"{rate:.0f}" for rate in rates)
        print(f"{kind:8} median {statistics.median(rates):9.0f} enqueues/s  (rounds: {shown})")


if __name__ == "__main__":
    main()
