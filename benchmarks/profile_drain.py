"""Where a worker's time goes in a plain drain: one drain of no-op tasks, timed and optionally profiled.

    python benchmarks/profile_drain.py --backend memory --n 20000 [--loop trio] [--profile out.pstats]
    python benchmarks/profile_drain.py --backend postgres --n 5000 --profile pg.pstats

It enqueues ``--n`` no-op tasks with ``enqueue_many`` (not timed), then starts one
``AsyncTasks(concurrency=--concurrency)`` worker and times it until every task has run, printing tasks per
second and the process's CPU time per task (``time.process_time``: steadier than the rate on a shared
machine). With ``--profile`` the timed part runs under cProfile, the stats are saved there and the top
entries by own time are printed. To compare versions, run it from each checkout (``PYTHONPATH=<tree>/src``)
in alternation, or use ``ab_drain.py``. ``memory`` shares one ``MemoryBackend`` between the producer and the
worker; ``redis`` uses a unique key prefix and deletes its keys at the end; ``sqlite`` a temporary file;
``postgres`` a schema of its own on ``--postgres-url`` (asyncio only), dropped at the end.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import tempfile
import time
import uuid
from pathlib import Path

import anyio

from lifecycle.asynctask import AsyncTasks, Backend, Call, MemoryBackend, backend_from_url


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("memory", "redis", "sqlite", "postgres"), default="memory")
    parser.add_argument("--n", type=int, default=20_000, help="tasks (default 20000)")
    parser.add_argument("--concurrency", type=int, default=32, help="worker concurrency (default 32)")
    parser.add_argument("--loop", choices=("asyncio", "trio"), default="asyncio")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--postgres-url", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--profile", type=Path, help="save the cProfile stats of the timed part here")
    parser.add_argument("--top", type=int, default=15, help="profile entries printed (default 15)")
    parser.add_argument(
        "--layers",
        action="store_true",
        help="with --profile: also print the share of own time per layer (engine, backend, driver, ...)",
    )
    parser.add_argument(
        "--cpu-timer",
        action="store_true",
        help="profile with the process's CPU time instead of wall time (on a busy machine, a call that "
        "wakes the server, such as a socket send, is charged the time the process waited for a core)",
    )
    return parser.parse_args(argv)


async def drain(args: argparse.Namespace, backends: tuple[Backend, Backend]) -> tuple[float, float]:
    """Tasks per second and CPU seconds per task of one drain."""
    done = 0
    finished = anyio.Event()

    async def noop(index: int) -> None:
        nonlocal done
        done += 1
        if done == args.n:
            finished.set()

    producer = AsyncTasks(backends[0], execution=False, concurrency=args.concurrency)
    worker = AsyncTasks(backends[1], concurrency=args.concurrency)
    for tasks in (producer, worker):
        tasks.register(noop, name="noop")
    await producer.initialize()
    try:
        for start in range(0, args.n, 1000):
            await producer.enqueue_many([Call("noop", i) for i in range(start, min(args.n, start + 1000))])
        await worker.initialize()
        timer = time.process_time if args.cpu_timer else time.perf_counter
        profiler = cProfile.Profile(timer) if args.profile else None
        try:
            cpu, began = time.process_time(), time.perf_counter()
            if profiler is not None:
                profiler.enable()
            async with anyio.create_task_group() as group:
                group.start_soon(worker.execute)
                with anyio.fail_after(600):
                    await finished.wait()
                elapsed, cpu = time.perf_counter() - began, time.process_time() - cpu
                group.cancel_scope.cancel()
            if profiler is not None:
                profiler.disable()
                profiler.dump_stats(args.profile)
        finally:
            await worker.cleanup()
    finally:
        if backends[0] is not backends[1]:
            await producer.cleanup()
    return args.n / elapsed, cpu / args.n


LAYERS = (  # (layer, path fragments of the functions' files), first match wins
    ("lifecycle backend", ("lifecycle/asynctask/_backends/",)),
    ("lifecycle engine", ("lifecycle/asynctask/",)),
    ("lifecycle core", ("lifecycle/",)),
    (
        "driver (redis-py, psycopg, sqlite3, nats-py)",
        ("/redis/", "/psycopg", "/psycopg_pool/", "sqlite3", "/nats/"),
    ),
    ("anyio", ("/anyio/",)),
    (
        "event loop (asyncio, trio, selectors)",
        ("/asyncio/", "/trio/", "selectors.py", "/sniffio/", "/outcome/"),
    ),
)


def layer_of(filename: str, function: str) -> str:
    """The layer a profiled function belongs to, from its file (C built-ins from their name)."""
    if filename == "~":
        if "poll" in function or "select" in function:
            return "waiting for I/O (epoll)"
        return "C built-ins (json, hiredis, time, ...)"
    path = filename.replace("\\", "/")
    for layer, fragments in LAYERS:
        if any(fragment in path for fragment in fragments):
            return layer
    return "other Python"


def layer_shares(stats: pstats.Stats, tasks: int) -> list[tuple[str, float, float]]:
    """(layer, own microseconds per task, share of all own time), largest first."""
    totals: dict[str, float] = {}
    entries: dict[tuple[str, int, str], tuple[int, int, float, float, object]] = stats.stats  # type: ignore[attr-defined]
    for (filename, _line, function), (_cc, _nc, own, _cum, _callers) in entries.items():
        layer = layer_of(filename, function)
        totals[layer] = totals.get(layer, 0.0) + own
    whole = sum(totals.values()) or 1.0
    return sorted(
        ((layer, seconds * 1e6 / tasks, seconds / whole) for layer, seconds in totals.items()),
        key=lambda row: -row[1],
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    prefix = f"profile_drain_{uuid.uuid4().hex[:12]}"
    with tempfile.TemporaryDirectory(prefix="profile-drain-") as tmp:
        if args.backend == "memory":
            shared = MemoryBackend()
            backends: tuple[Backend, Backend] = (shared, shared)
        else:
            if args.backend == "redis":
                url = f"{args.redis_url}?prefix={prefix}"
            elif args.backend == "postgres":
                url = f"{args.postgres_url}{'&' if '?' in args.postgres_url else '?'}schema={prefix}"
            else:
                url = f"sqlite:///{tmp}/d.db"
            backends = (backend_from_url(url), backend_from_url(url))
        try:
            rate, cpu = anyio.run(drain, args, backends, backend=args.loop)
        finally:
            if args.backend == "postgres":
                import psycopg
                from psycopg import sql

                with psycopg.connect(args.postgres_url, autocommit=True) as connection:
                    connection.execute(
                        sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(prefix))
                    )
            if args.backend == "redis":
                import redis

                client = redis.Redis.from_url(args.redis_url)
                keys = [*client.scan_iter(match=f"{{{prefix}}}*"), *client.scan_iter(match=f"{prefix}:*")]
                for start in range(0, len(keys), 500):
                    client.delete(*keys[start : start + 500])
                client.close()
    print(f"{args.backend} on {args.loop}: {rate:.0f} tasks/s, {cpu * 1e6:.1f} us CPU per task")
    if args.profile:
        stats = pstats.Stats(str(args.profile))
        stats.sort_stats("tottime").print_stats(args.top)
        if args.layers:
            calls = sum(entry[1] for entry in stats.stats.values())  # type: ignore[attr-defined]
            print(f"Python and C calls per task under the profiler: {calls / args.n:.0f}")
            print("| layer | own time µs/task (profiled) | share |")
            print("|---|---|---|")
            for layer, micros, share in layer_shares(stats, args.n):
                print(f"| {layer} | {micros:.1f} | {share:.0%} |")


if __name__ == "__main__":
    main()
