"""Flow control's cost on SQLite, A/B in one run: a plain drain, the same drain while a task name has limits
registered (every claim then takes the limits path), and a drain of tasks with ``max_running_per_key=1``
spread over many concurrency keys.

    python benchmarks/flow.py --n 5000 --keys 1000 --rounds 3

Each run enqueues ``--n`` no-op tasks into a fresh SQLite file (WAL, ``synchronous=NORMAL``), then starts
one worker (``AsyncTasks(concurrency=--concurrency)``) in this process and times it from its start until
every task has run; the variants alternate within each round, so they share the machine's state. Prints
tasks per second per variant (median of the rounds) and each variant relative to the plain drain; with
``--json``, one JSON object. Only public API, so ``--variants plain`` also runs on a release without flow
control (to compare with it, put that release first on ``PYTHONPATH``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.append(str(ROOT / "src"))

from lifecycle.asynctask import AsyncTasks, Call, SQLiteBackend  # noqa: E402

VARIANTS = ("plain", "limits_registered", "per_key")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=5_000, help="tasks per drain (default 5000)")
    parser.add_argument("--keys", type=int, default=1_000, help="concurrency keys of per_key (default 1000)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every variant (default 3)")
    parser.add_argument("--concurrency", type=int, default=32, help="worker concurrency (default 32)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    args.variants = [name.strip() for name in args.variants.split(",") if name.strip()]
    unknown = sorted(set(args.variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    return args


def build(
    path: Path, variant: str, concurrency: int, done: Callable[[], None], *, execution: bool
) -> AsyncTasks:
    """An ``AsyncTasks`` over ``path`` with the benchmark's tasks registered as ``variant`` needs."""
    tasks = AsyncTasks(
        SQLiteBackend(path, synchronous="NORMAL"), execution=execution, concurrency=concurrency
    )

    async def noop(index: int) -> None:
        done()

    if variant == "per_key":
        tasks.register(noop, name="bench.keyed", max_running_per_key=1)
    else:
        tasks.register(noop, name="bench.noop")
    if variant == "limits_registered":  # a name with limits that never runs: the claims take the limits path

        async def unused() -> None: ...

        tasks.register(unused, name="bench.unused", max_running=1)
    return tasks


async def drain(path: Path, variant: str, n: int, keys: int, concurrency: int) -> float:
    """Enqueue ``n`` tasks, then time one worker draining them; returns tasks per second."""
    producer = build(path, variant, concurrency, lambda: None, execution=False)
    async with producer:
        for start in range(0, n, 1_000):
            indices = range(start, min(n, start + 1_000))
            if variant == "per_key":
                calls = [Call("bench.keyed", i, concurrency_key=f"k{i % keys}") for i in indices]
            else:
                calls = [Call("bench.noop", i) for i in indices]
            await producer.enqueue_many(calls)
    finished = anyio.Event()
    count = 0

    def done() -> None:
        nonlocal count
        count += 1
        if count == n:
            finished.set()

    worker = build(path, variant, concurrency, done, execution=True)
    async with worker, anyio.create_task_group() as group:
        started = time.perf_counter()
        group.start_soon(worker.execute)
        await finished.wait()
        elapsed = time.perf_counter() - started
        group.cancel_scope.cancel()
    return n / elapsed


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rates: dict[str, list[float]] = {variant: [] for variant in args.variants}
    with tempfile.TemporaryDirectory(prefix="lifecycle-flow-bench-") as directory:
        for round_index in range(args.rounds):
            order = args.variants if round_index % 2 == 0 else list(reversed(args.variants))
            for variant in order:
                path = Path(directory) / f"{variant}-{round_index}.db"
                rate = anyio.run(drain, path, variant, args.n, args.keys, args.concurrency)
                rates[variant].append(rate)
                if not args.json:
                    print(f"round {round_index + 1} {variant:<18} {rate:8.0f} tasks/s", flush=True)
    medians = {variant: statistics.median(values) for variant, values in rates.items()}
    base = medians.get("plain")
    result: dict[str, Any] = {
        "n": args.n,
        "keys": args.keys,
        "concurrency": args.concurrency,
        "rounds": args.rounds,
        "tasks_per_s": rates,
        "median_tasks_per_s": medians,
        "relative_to_plain": None if base is None else {v: m / base for v, m in medians.items()},
    }
    if args.json:
        print(json.dumps(result))
        return 0
    for variant, median in medians.items():
        relative = "" if base is None else f"  ({median / base:.0%} of plain)"
        print(f"median {variant:<18} {median:8.0f} tasks/s{relative}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
