"""A/B of the plain drain between versions of this library, in one run: did a change make the worker slower?

    python benchmarks/ab_drain.py --refs 30708ce,HEAD --backends sqlite,redis,postgres --n 5000 --rounds 5

Each ``--refs`` entry is a git revision of this repository (``WORKTREE`` means the files as they are now);
each is exported once into a temporary directory (``git archive``) and run from there with ``PYTHONPATH``
pointing at its ``src``, so the versions share this interpreter and its installed dependencies. A round
runs every version on every backend, one after the other, in an order that alternates between rounds, so
the versions share the machine's state and noise. Each run is a fresh process: it enqueues ``--n`` no-op
tasks with ``enqueue_many`` (not timed), then starts one ``AsyncTasks(concurrency=--concurrency)`` worker
and times it from its start until every task has run. Only public API that every version has is used.

Storage is private to each run and removed after it: a fresh SQLite file, a unique Redis key prefix
(deleted by pattern), a unique PostgreSQL schema (dropped). Prints tasks per second per version and
backend (median of the rounds, and the spread) and each version relative to the first; ``--json`` prints
one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = ("sqlite", "redis", "postgres")

# The timed part, run in a child process against one version's source tree. It must only use API every
# compared version has.
CHILD = r"""
import sys, time, anyio
from lifecycle.asynctask import AsyncTasks, Call, backend_from_url

url, n, concurrency = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
done = 0
finished = anyio.Event()

async def noop(index: int) -> None:
    global done
    done += 1
    if done == n:
        finished.set()

def build(execution: bool) -> AsyncTasks:
    tasks = AsyncTasks(backend_from_url(url), execution=execution, concurrency=concurrency)
    tasks.register(noop, name="noop")
    return tasks

async def main() -> None:
    producer = build(False)
    async with producer:
        for start in range(0, n, 1000):
            await producer.enqueue_many([Call("noop", i) for i in range(start, min(n, start + 1000))])
    worker = build(True)
    await worker.initialize()
    try:
        began = time.perf_counter()
        async with anyio.create_task_group() as group:
            group.start_soon(worker.execute)
            with anyio.fail_after(600):
                await finished.wait()
            elapsed = time.perf_counter() - began
            group.cancel_scope.cancel()
    finally:
        await worker.cleanup()
    print(n / elapsed)

anyio.run(main)
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--refs", default="HEAD~1,HEAD", help="comma-separated git revisions (or WORKTREE)")
    parser.add_argument("--backends", default="sqlite,redis,postgres", help="comma-separated subset")
    parser.add_argument("--n", type=int, default=5_000, help="tasks per drain (default 5000)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds (default 5)")
    parser.add_argument("--concurrency", type=int, default=32, help="worker concurrency (default 32)")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--postgres-url", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    args.refs = [ref.strip() for ref in args.refs.split(",") if ref.strip()]
    args.backends = [name.strip() for name in args.backends.split(",") if name.strip()]
    unknown = sorted(set(args.backends) - set(BACKENDS))
    if unknown:
        parser.error(f"unknown backends {unknown}; choose from {', '.join(BACKENDS)}")
    if len(args.refs) < 2:
        parser.error("--refs needs at least two versions to compare, e.g. --refs main~3,HEAD")
    return args


def export(ref: str, into: Path) -> Path:
    """The source tree of ``ref`` (``WORKTREE``: this checkout as it is) under ``into``; its ``src``."""
    if ref == "WORKTREE":
        return ROOT / "src"
    target = into / ref.replace("/", "_").replace("~", "-").replace("^", "-")
    target.mkdir(parents=True)
    archive = into / f"{target.name}.tar"
    subprocess.run(["git", "-C", str(ROOT), "archive", "-o", str(archive), ref, "src"], check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(target, filter="data")
    return target / "src"


def storage(backend: str, args: argparse.Namespace, scratch: Path) -> tuple[str, object]:
    """A private store's URL and what ``remove`` needs to delete it afterwards."""
    name = f"ab_{uuid.uuid4().hex[:12]}"
    if backend == "sqlite":
        path = scratch / f"{name}.db"
        return f"sqlite:///{path}", path
    if backend == "redis":
        return f"{args.redis_url}?prefix={name}", name
    return f"{args.postgres_url}?schema={name}", name


def remove(backend: str, handle: object, args: argparse.Namespace) -> None:
    """Delete the store a run made, and only it."""
    if backend == "sqlite":
        assert isinstance(handle, Path)
        for suffix in ("", "-wal", "-shm"):
            Path(f"{handle}{suffix}").unlink(missing_ok=True)
    elif backend == "redis":
        import redis

        client = redis.Redis.from_url(args.redis_url)
        keys = list(client.scan_iter(match=f"{{{handle}}}*", count=1000)) + list(
            client.scan_iter(match=f"{handle}:*", count=1000)
        )
        for start in range(0, len(keys), 500):
            client.delete(*keys[start : start + 500])
        client.close()
    else:
        import psycopg

        with psycopg.connect(args.postgres_url, autocommit=True) as connection:
            connection.execute(f'DROP SCHEMA IF EXISTS "{handle}" CASCADE')


def run_once(src: Path, url: str, args: argparse.Namespace) -> float:
    env = {**os.environ, "PYTHONPATH": str(src)}
    completed = subprocess.run(
        [sys.executable, "-c", CHILD, url, str(args.n), str(args.concurrency)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if completed.returncode != 0:
        raise SystemExit(f"a drain failed ({src}, {url.split('?')[0]}):\n{completed.stderr[-2000:]}")
    return float(completed.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    rates: dict[str, dict[str, list[float]]] = {ref: {b: [] for b in args.backends} for ref in args.refs}
    with tempfile.TemporaryDirectory(prefix="ab-drain-") as tmp:
        scratch = Path(tmp)
        sources = {ref: export(ref, scratch / "trees") for ref in args.refs}
        for round_index in range(args.rounds):
            order = args.refs if round_index % 2 == 0 else list(reversed(args.refs))
            for backend in args.backends:
                for ref in order:
                    url, handle = storage(backend, args, scratch)
                    try:
                        rates[ref][backend].append(run_once(sources[ref], url, args))
                    finally:
                        remove(backend, handle, args)
            if not args.json:
                print(f"round {round_index + 1}/{args.rounds} done", file=sys.stderr)
    first = args.refs[0]
    result = {
        backend: {
            ref: {
                "median": statistics.median(rates[ref][backend]),
                "min": min(rates[ref][backend]),
                "max": max(rates[ref][backend]),
                "relative": statistics.median(rates[ref][backend]) / statistics.median(rates[first][backend]),
            }
            for ref in args.refs
        }
        for backend in args.backends
    }
    if args.json:
        print(json.dumps({"n": args.n, "rounds": args.rounds, "drain": result}))
        return
    print(f"plain drain, {args.n} tasks, concurrency {args.concurrency}, medians of {args.rounds} rounds")
    for backend in args.backends:
        for ref in args.refs:
            row = result[backend][ref]
            print(
                f"  {backend:9} {ref:12} {row['median']:9.0f}/s  (min {row['min']:.0f}, max {row['max']:.0f})"
                f"  {row['relative']:.3f} x {first}"
            )


if __name__ == "__main__":
    main()
