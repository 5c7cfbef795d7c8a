"""How fast one worker drains a PostgreSQL backlog, with and without flow control.

    python benchmarks/postgres_flow.py --dsn postgresql://postgres@127.0.0.1/test --n 20000 --rounds 3

In a schema of its own per run (``lifecycle_bench_<random>``, dropped at the end; nothing else is touched):
enqueue ``--n`` no-op tasks, then start one ``AsyncTasks`` worker (``concurrency`` 32, the library's defaults
otherwise) and time until the last task has run. Scenarios:

- ``plain``: a task registered without any flow option (the claim without limits);
- ``per_key``: a task registered with ``max_running_per_key=1``, the tasks spread over ``--keys`` concurrency
  keys (1 000 by default) in turn, so every claim goes through the claim with limits.

Prints tasks per second and the CPU time per task of this process plus its PostgreSQL server processes (found
by a unique ``application_name``; read from ``/proc``, so the server must run on this host), the median of
``--rounds`` runs, rounds interleaved. CPU time is far steadier than the rate on a shared machine. For an A/B
run against an older
version (which has no ``per_key``), run the script with ``PYTHONPATH`` pointing at that version's ``src``:
``--scenarios plain`` then only runs what it knows. docs/backends.md quotes the numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import anyio  # noqa: E402
import psycopg  # noqa: E402
from psycopg import sql  # noqa: E402

from lifecycle.asynctask import AsyncTasks, Call  # noqa: E402
from lifecycle.asynctask.postgres import PostgresBackend  # noqa: E402

_BATCH = 1_000


def _server_cpu(pids: list[int]) -> float:
    """CPU seconds used so far by the server processes ``pids`` (0 for those that ended, or no /proc)."""
    total = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


async def _server_pids(dsn: str, application: str) -> list[int]:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as connection:
        cursor = await connection.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s", (application,)
        )
        return [int(row[0]) for row in await cursor.fetchall()]


async def _drain(dsn: str, scenario: str, n: int, keys: int, concurrency: int) -> tuple[float, float]:
    """Tasks per second and CPU microseconds per task for one run of ``scenario`` in a fresh schema."""
    schema = f"lifecycle_bench_{uuid.uuid4().hex[:12]}"
    application = f"lifecycle_bench_{uuid.uuid4().hex[:8]}"
    worker_dsn = f"{dsn}{'&' if '?' in dsn else '?'}application_name={application}"
    done = anyio.Event()
    count = 0

    async def noop(index: int) -> None:
        nonlocal count
        count += 1
        if count == n:
            done.set()

    options: dict[str, Any] = {"max_running_per_key": 1} if scenario == "per_key" else {}
    producer = AsyncTasks(PostgresBackend(dsn, schema=schema), execution=False)
    producer.register(noop, name="bench.noop", **options)
    worker = AsyncTasks(PostgresBackend(worker_dsn, schema=schema), concurrency=concurrency)
    worker.register(noop, name="bench.noop", **options)
    try:
        async with producer:
            for start in range(0, n, _BATCH):
                calls = []
                for index in range(start, min(n, start + _BATCH)):
                    if scenario == "per_key":
                        calls.append(Call(noop, index, concurrency_key=f"k{index % keys}"))
                    else:
                        calls.append(Call(noop, index))
                await producer.enqueue_many(calls)
        async with worker, anyio.create_task_group() as group:
            await worker.stats()  # the pool's first connection is up: its server process is counted
            started, cpu = time.perf_counter(), time.process_time()
            pids = await _server_pids(dsn, application)
            server = _server_cpu(pids)
            group.start_soon(worker.execute)
            with anyio.fail_after(600):
                await done.wait()
            elapsed = time.perf_counter() - started
            pids = sorted(set(pids) | set(await _server_pids(dsn, application)))
            used = time.process_time() - cpu + _server_cpu(pids) - server
            group.cancel_scope.cancel()
        return n / elapsed, used / n * 1e6
    finally:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as connection:
            await connection.execute(
                sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema))
            )


async def main(argv: list[str] | None = None) -> None:
    """Run every scenario ``--rounds`` times, interleaved; print the medians."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--n", type=int, default=20_000, help="tasks per run")
    parser.add_argument("--keys", type=int, default=1_000, help="concurrency keys of the per_key scenario")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--scenarios", default="plain,per_key")
    args = parser.parse_args(argv)
    scenarios = args.scenarios.split(",")
    rates: dict[str, list[float]] = {scenario: [] for scenario in scenarios}
    costs: dict[str, list[float]] = {scenario: [] for scenario in scenarios}
    for _ in range(args.rounds):
        for scenario in scenarios:
            rate, cost = await _drain(args.dsn, scenario, args.n, args.keys, args.concurrency)
            rates[scenario].append(rate)
            costs[scenario].append(cost)
            print(f"{scenario:<8} {rate:8.0f} tasks/s {cost:7.1f} us CPU/task", flush=True)
    for scenario, values in rates.items():
        print(
            f"median {scenario:<8} {statistics.median(values):8.0f} tasks/s "
            f"{statistics.median(costs[scenario]):7.1f} us CPU/task over {len(values)} runs"
        )


if __name__ == "__main__":
    asyncio.run(main())
