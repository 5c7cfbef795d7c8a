"""A/B of the Redis enqueue -> start latency between versions of this library, in one run.

    python benchmarks/ab_latency.py --refs main,WORKTREE --n 2000 --rounds 5

Starts a private ``redis-server`` (as ``benchmarks/run.py`` does), then per round runs the harness's own
``latency`` scenario (``benchmarks.peers.ours``: one producer awaiting single enqueues, one idle worker
process, each task's start time against its send time) once per version, the versions alternating their order
between rounds. Prints each run's p50, p99 and the worker's CPU per task, then per version the medians over
the rounds and their spread.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ab_drain import ROOT, export

from benchmarks.redis_server import PrivateRedis, find_redis_server


def run_once(src: Path, url: str, n: int) -> dict[str, float]:
    """One latency run of the version whose package is under ``src``."""
    env = {**os.environ, "PYTHONPATH": f"{src}{os.pathsep}{ROOT}"}
    command = [sys.executable, "-m", "benchmarks.peers.ours", "--library", "lifecycle"]
    command += ["--scenario", "latency", "--n", str(n), "--redis-url", url]
    out = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, check=True, timeout=600)
    for line in out.stdout.splitlines():
        if line.startswith("BENCH-RESULT "):
            result: dict[str, float] = json.loads(line.removeprefix("BENCH-RESULT "))["metrics"]
            return result
    raise RuntimeError(f"no result: {out.stdout[-2000:]} {out.stderr[-2000:]}")


def main() -> None:
    """Run the rounds and print the medians."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--refs", default="main,WORKTREE")
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    refs = args.refs.split(",")
    results: dict[str, list[dict[str, float]]] = {ref: [] for ref in refs}
    with tempfile.TemporaryDirectory() as scratch, PrivateRedis(find_redis_server(None)) as server:
        sources = {ref: export(ref, Path(scratch)) for ref in refs}
        for round_ in range(args.rounds):
            order = refs if round_ % 2 == 0 else refs[::-1]
            for ref in order:
                result = run_once(sources[ref], server.url, args.n)
                results[ref].append(result)
                print(
                    f"round {round_} {ref}: p50 {result['p50_ms']:.3f} ms, p99 {result['p99_ms']:.3f} ms, "
                    f"worker CPU {result['worker_cpu_ms_per_task'] * 1000:.0f} µs/task"
                )
    for ref in refs:
        p50 = [r["p50_ms"] for r in results[ref]]
        p99 = [r["p99_ms"] for r in results[ref]]
        cpu = [r["worker_cpu_ms_per_task"] * 1000 for r in results[ref]]
        print(
            f"{ref}: p50 median {statistics.median(p50):.3f} ms ({min(p50):.3f}-{max(p50):.3f}), "
            f"p99 median {statistics.median(p99):.3f} ms ({min(p99):.3f}-{max(p99):.3f}), "
            f"worker CPU median {statistics.median(cpu):.0f} µs/task ({min(cpu):.0f}-{max(cpu):.0f})"
        )


if __name__ == "__main__":
    main()
