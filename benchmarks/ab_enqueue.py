"""A/B of single awaited enqueues between versions of this library, in one run (``ab_drain``'s method).

    python benchmarks/ab_enqueue.py --refs HEAD~1,WORKTREE --backends postgres --n 2000 --rounds 3

Each run is a fresh process with a private store: an enqueue-only ``AsyncTasks(execution=False)`` awaits
``--n`` single ``enqueue`` calls one after another (after 50 untimed ones, so the tables exist and the
connections are warm) and prints enqueues per second. Versions alternate their order between rounds; the
medians and spreads are printed as by ``ab_drain.py``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ab_drain import BACKENDS, export, remove, storage

CHILD = r"""
import sys, time, anyio
from lifecycle.asynctask import AsyncTasks, backend_from_url

url, n = sys.argv[1], int(sys.argv[2])

async def noop(index: int) -> None:
    pass

async def main() -> None:
    tasks = AsyncTasks(backend_from_url(url), execution=False)
    tasks.register(noop, name="noop")
    async with tasks:
        for i in range(50):
            await tasks.enqueue("noop", -i)
        began = time.perf_counter()
        for i in range(n):
            await tasks.enqueue("noop", i)
        elapsed = time.perf_counter() - began
    print(n / elapsed)

anyio.run(main)
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--refs", default="HEAD~1,HEAD", help="comma-separated git revisions (or WORKTREE)")
    parser.add_argument("--backends", default="postgres", help="comma-separated subset")
    parser.add_argument("--n", type=int, default=2_000, help="enqueues per run (default 2000)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--postgres-url", default="postgresql://postgres@127.0.0.1:5432/test")
    args = parser.parse_args(argv)
    refs = [ref.strip() for ref in args.refs.split(",") if ref.strip()]
    backends = [name.strip() for name in args.backends.split(",") if name.strip()]
    if set(backends) - set(BACKENDS):
        parser.error(f"choose backends from {', '.join(BACKENDS)}")
    rates: dict[str, dict[str, list[float]]] = {ref: {b: [] for b in backends} for ref in refs}
    with tempfile.TemporaryDirectory(prefix="ab-enqueue-") as tmp:
        scratch = Path(tmp)
        sources = {ref: export(ref, scratch / "trees") for ref in refs}
        for round_index in range(args.rounds):
            for backend in backends:
                for ref in refs if round_index % 2 == 0 else list(reversed(refs)):
                    url, handle = storage(backend, args, scratch)
                    try:
                        completed = subprocess.run(
                            [sys.executable, "-c", CHILD, url, str(args.n)],
                            env={**os.environ, "PYTHONPATH": str(sources[ref])},
                            capture_output=True,
                            text=True,
                            timeout=600,
                            check=False,
                        )
                    finally:
                        remove(backend, handle, args)
                    if completed.returncode != 0:
                        raise SystemExit(f"a run failed ({ref}, {backend}):\n{completed.stderr[-2000:]}")
                    rates[ref][backend].append(float(completed.stdout.strip().splitlines()[-1]))
            print(f"round {round_index + 1}/{args.rounds} done", file=sys.stderr)
    for backend in backends:
        base = statistics.median(rates[refs[0]][backend])
        for ref in refs:
            values = rates[ref][backend]
            median = statistics.median(values)
            print(
                f"{backend:8} {ref:12} {median:9.0f}/s  (min {min(values):.0f}, max {max(values):.0f}, "
                f"{median / base:.2f}x)"
            )


if __name__ == "__main__":
    main()
