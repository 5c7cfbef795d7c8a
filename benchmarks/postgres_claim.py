"""How long a PostgreSQL claim takes over a large backlog the planner has no statistics for, and what a
claim and a settlement of a batch cost.

    python benchmarks/postgres_claim.py --dsn postgresql://postgres@127.0.0.1/test --n 100000

In a schema of its own (``lifecycle_bench_<random>``, dropped at the end; nothing else is touched), with
autovacuum off for the table so that no ANALYZE runs: enqueue ``--n`` tasks delayed by an hour, then time
claims that find nothing due (the worker's idle claim), as ``EXPLAIN ANALYZE`` execution time and as the
wall time of ``PostgresBackend.claim``, without limits and with limits on the backlog's task name (the
transaction that locks the name, then counts and claims); and lease recovery over ``--n`` active tasks (of
another queue). All again after ``ANALYZE``. Then the round trips of a worker's hot path over due tasks of a
queue of their own: ``claim`` of 10 and ``settle`` of those 10 (succeeded, with a result), one caller, and
the rate of 4 callers claiming and settling batches of 10 at once (each on its own pooled connection:
settlements commit concurrently). Prints medians in milliseconds. docs/backends.md quotes the numbers.

For an A/B run against an older version, run the script with ``PYTHONPATH`` pointing at that version's
``src``: what it lacks is left out.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import psycopg  # noqa: E402
from psycopg import sql  # noqa: E402

from lifecycle.asynctask import NewTask  # noqa: E402
from lifecycle.asynctask._backends.postgres._schema import TASKS_TABLE  # noqa: E402
from lifecycle.asynctask.postgres import PostgresBackend  # noqa: E402

_BATCH = 10_000


def _tasks(prefix: str, n: int, run_at: float, queue: str) -> list[NewTask]:
    now = time.time()
    return [NewTask(f"{prefix}{i}", "bench.noop", queue, b"[]", 0, None, now, run_at) for i in range(n)]


async def _explain_ms(dsn: str, statement: bytes, params: Any, repeat: int) -> float:
    times = []
    async with await psycopg.AsyncConnection.connect(dsn) as connection:
        await connection.execute("SET jit = off")  # as on the backend's own connections
        for _ in range(repeat):
            cursor = await connection.execute(b"EXPLAIN (ANALYZE, FORMAT JSON) " + statement, params)
            row = await cursor.fetchone()
            assert row is not None
            times.append(float(row[0][0]["Execution Time"]))
            await connection.rollback()  # EXPLAIN ANALYZE runs the UPDATE: keep the backlog as it is
    return statistics.median(times)


async def _wall_ms(call: Any, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        await call()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


async def _measure(dsn: str, backend: PostgresBackend, repeat: int, label: str) -> None:
    st = backend._statements
    now = time.time()
    if hasattr(st, "claim_limited"):  # this version
        params: Any = {"queues": ["default"], "now": now, "limit": 10, "lease_until": now + 30, "held": []}
    else:  # the version before flow control, for an A/B run
        params = (["default"], now, 10, 10, now, now + 30)
    claim = await _explain_ms(dsn, st.claim, params, repeat)
    claim_wall = await _wall_ms(
        lambda: backend.claim(["default"], 10, now=time.time(), lease_until=time.time() + 30), repeat
    )
    reclaim = await _explain_ms(dsn, st.reclaim, (now, 10, now + 30), repeat)
    print(
        f"{label:<11} claim {claim:7.3f} ms (EXPLAIN ANALYZE), {claim_wall:7.3f} ms (PostgresBackend.claim); "
        f"lease recovery {reclaim:7.3f} ms (EXPLAIN ANALYZE)",
        flush=True,
    )
    if hasattr(st, "claim_limited"):
        from lifecycle.asynctask import FlowLimits

        limits = {"bench.noop": FlowLimits(max_running=100, rate=1000, per=1.0)}
        limited = {
            **params,
            "space": st.lock_space,
            "names": ["bench.noop"],
            "rate": [1000.0],
            "per": [1.0],
            "max_running": [100],
            "per_key": [None],
        }
        del limited["held"]
        claim_limited = await _explain_ms(dsn, st.claim_limited, limited, repeat)
        limited_wall = await _wall_ms(
            lambda: backend.claim(
                ["default"], 10, now=time.time(), lease_until=time.time() + 30, limits=limits
            ),
            repeat,
        )
        print(
            f"{'':<11} claim with limits {claim_limited:7.3f} ms (EXPLAIN ANALYZE), "
            f"{limited_wall:7.3f} ms (PostgresBackend.claim)",
            flush=True,
        )


async def _hot_path(backend: PostgresBackend, repeat: int) -> None:
    """claim(10) and settle(10) round trips over due tasks of the queue "hot", one caller; then 4 callers."""
    from lifecycle.asynctask import Settlement, TaskState

    batch = 10
    now = time.time()
    await backend.enqueue_many(_tasks("h", repeat * batch, now, "hot"))
    claims, settles = [], []
    for _ in range(repeat):
        start = time.perf_counter()
        claimed = await backend.claim(["hot"], batch, now=time.time(), lease_until=time.time() + 60)
        middle = time.perf_counter()
        verdicts = [
            Settlement(c.record.id, c.token, TaskState.SUCCEEDED, at=time.time(), result=b"null")
            for c in claimed
        ]
        assert await backend.settle(verdicts) == set()
        claims.append((middle - start) * 1000)
        settles.append((time.perf_counter() - middle) * 1000)
    callers, rounds = 4, 100
    await backend.enqueue_many(_tasks("c", callers * rounds * batch, now, "busy-hot"))

    async def caller() -> None:
        for _ in range(rounds):
            claimed = await backend.claim(["busy-hot"], batch, now=time.time(), lease_until=time.time() + 60)
            verdicts = [
                Settlement(c.record.id, c.token, TaskState.SUCCEEDED, at=time.time(), result=b"null")
                for c in claimed
            ]
            assert await backend.settle(verdicts) == set()

    start = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(callers)))
    rate = callers * rounds * batch / (time.perf_counter() - start)
    print(
        f"hot path    claim of {batch} {statistics.median(claims):7.3f} ms, settle of {batch} "
        f"{statistics.median(settles):7.3f} ms (round trips, medians); {callers} callers claiming and "
        f"settling at once: {rate:7.0f} tasks/s",
        flush=True,
    )


async def main(argv: list[str] | None = None) -> None:
    """Fill, measure unanalysed, ANALYZE, measure again, drop the schema."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--n", type=int, default=100_000, help="delayed tasks, and as many active ones")
    parser.add_argument("--repeat", type=int, default=30, help="measurements per median")
    args = parser.parse_args(argv)
    schema = f"lifecycle_bench_{uuid.uuid4().hex[:12]}"
    table = sql.Identifier(schema, TASKS_TABLE)
    backend = PostgresBackend(args.dsn, schema=schema)
    await backend.open()
    try:
        async with await psycopg.AsyncConnection.connect(args.dsn, autocommit=True) as connection:
            await connection.execute(sql.SQL("ALTER TABLE {} SET (autovacuum_enabled = false)").format(table))
        delayed = _tasks("d", args.n, time.time() + 3600, "default")
        for start in range(0, args.n, _BATCH):
            await backend.enqueue_many(delayed[start : start + _BATCH])
        # The active backlog is in a queue of its own, so the claims measured (of "default") do not walk
        # the pending-index entries these claims leave behind until the next vacuum.
        for start in range(0, args.n, _BATCH):
            await backend.enqueue_many(_tasks(f"a{start}-", min(_BATCH, args.n - start), 0.0, "busy"))
            await backend.claim(["busy"], _BATCH, now=time.time(), lease_until=time.time() + 3600)
        print(f"{args.n} delayed and {args.n} active tasks in schema {schema}", flush=True)
        await _measure(args.dsn, backend, args.repeat, "unanalysed")
        async with await psycopg.AsyncConnection.connect(args.dsn, autocommit=True) as connection:
            await connection.execute(sql.SQL("ANALYZE {}").format(table))
        await _measure(args.dsn, backend, args.repeat, "analysed")
        await _hot_path(backend, max(args.repeat, 100))
    finally:
        await backend.close()
        async with await psycopg.AsyncConnection.connect(args.dsn, autocommit=True) as connection:
            await connection.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))


if __name__ == "__main__":
    asyncio.run(main())
