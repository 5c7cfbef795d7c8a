"""A/B of single awaited enqueues between versions of this library, in one run (``ab_drain``'s method).

    python benchmarks/ab_enqueue.py --refs HEAD~1,WORKTREE --backends postgres --n 2000 --rounds 3
    python benchmarks/ab_enqueue.py --refs main,WORKTREE --backends memory,redis --n 3000 --rounds 7
    python benchmarks/ab_enqueue.py --refs main,WORKTREE --backends postgres --bulk 1000 --n 20000 --rounds 5

Each run is a fresh process with a private store: an enqueue-only ``AsyncTasks(execution=False)`` awaits
``--n`` single ``enqueue`` calls one after another (after 50 untimed ones, so the tables exist and the
connections are warm) and prints enqueues per second and the process's CPU time per enqueue
(``time.process_time``: the steadier figure on a shared machine). ``memory`` measures the engine's own work
(``MemoryBackend`` stores in a dict). Versions alternate their order between rounds; the medians and spreads
are printed as by ``ab_drain.py``. ``--bulk B`` times ``enqueue_many`` calls of ``B`` tasks each instead
(``--n`` tasks in all; the figures stay per task), as the harness's ``pg_enqueue`` scenario does.
``--profile DIR`` runs each timed loop under cProfile and saves ``DIR/<ref>-<backend>-<round>.pstats`` (the
numbers printed then include the profiler's overhead).
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

CHOICES = ("memory", *BACKENDS)

CHILD = r"""
import cProfile, sys, time, anyio
from lifecycle.asynctask import AsyncTasks, Call, backend_from_url

url, n, profile, bulk = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])

async def noop(index: int) -> None:
    pass

async def main() -> None:
    tasks = AsyncTasks(backend_from_url(url), execution=False)
    tasks.register(noop, name="noop")
    async with tasks:
        for i in range(50):
            await tasks.enqueue("noop", -i)
        profiler = cProfile.Profile() if profile else None
        if profiler is not None:
            profiler.enable()
        began, cpu = time.perf_counter(), time.process_time()
        if bulk:
            for start in range(0, n, bulk):
                await tasks.enqueue_many([Call(noop, i) for i in range(start, min(n, start + bulk))])
        else:
            for i in range(n):
                await tasks.enqueue("noop", i)
        elapsed, cpu = time.perf_counter() - began, time.process_time() - cpu
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(profile)
    print(n / elapsed, cpu / n * 1e6)

anyio.run(main)
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--refs", default="HEAD~1,HEAD", help="comma-separated git revisions (or WORKTREE)")
    parser.add_argument("--backends", default="postgres", help="comma-separated subset")
    parser.add_argument("--n", type=int, default=2_000, help="enqueues per run (default 2000)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    parser.add_argument("--bulk", type=int, default=0, help="enqueue_many batches of this size (0: single)")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--postgres-url", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--profile", type=Path, default=None, help="save a cProfile of each run in DIR")
    args = parser.parse_args(argv)
    refs = [ref.strip() for ref in args.refs.split(",") if ref.strip()]
    backends = [name.strip() for name in args.backends.split(",") if name.strip()]
    if set(backends) - set(CHOICES):
        parser.error(f"choose backends from {', '.join(CHOICES)}")
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
    rates: dict[str, dict[str, list[float]]] = {ref: {b: [] for b in backends} for ref in refs}
    cpus: dict[str, dict[str, list[float]]] = {ref: {b: [] for b in backends} for ref in refs}
    with tempfile.TemporaryDirectory(prefix="ab-enqueue-") as tmp:
        scratch = Path(tmp)
        sources = {ref: export(ref, scratch / "trees") for ref in refs}
        for round_index in range(args.rounds):
            for backend in backends:
                for ref in refs if round_index % 2 == 0 else list(reversed(refs)):
                    if backend == "memory":
                        url, handle = "memory://", None
                    else:
                        url, handle = storage(backend, args, scratch)
                    profile = ""
                    if args.profile is not None:
                        tag = ref.replace("/", "_").replace("~", "-").replace("^", "-")
                        profile = str(args.profile / f"{tag}-{backend}-{round_index + 1}.pstats")
                    try:
                        completed = subprocess.run(
                            [sys.executable, "-c", CHILD, url, str(args.n), profile, str(args.bulk)],
                            env={**os.environ, "PYTHONPATH": str(sources[ref])},
                            capture_output=True,
                            text=True,
                            timeout=600,
                            check=False,
                        )
                    finally:
                        if backend != "memory":
                            remove(backend, handle, args)
                    if completed.returncode != 0:
                        raise SystemExit(f"a run failed ({ref}, {backend}):\n{completed.stderr[-2000:]}")
                    rate_text, cpu_text = completed.stdout.strip().splitlines()[-1].split()
                    rates[ref][backend].append(float(rate_text))
                    cpus[ref][backend].append(float(cpu_text))
            print(f"round {round_index + 1}/{args.rounds} done", file=sys.stderr)
    for backend in backends:
        base = statistics.median(rates[refs[0]][backend])
        base_cpu = statistics.median(cpus[refs[0]][backend])
        for ref in refs:
            values = rates[ref][backend]
            median = statistics.median(values)
            cpu = cpus[ref][backend]
            print(
                f"{backend:8} {ref:12} {median:9.0f}/s  (min {min(values):.0f}, max {max(values):.0f}, "
                f"{median / base:.2f}x)  {statistics.median(cpu):6.1f} us CPU/enqueue (min {min(cpu):.1f}, "
                f"max {max(cpu):.1f}, {statistics.median(cpu) / base_cpu:.2f}x)"
            )


if __name__ == "__main__":
    main()
