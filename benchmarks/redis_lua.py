"""What the Redis backend's scripts cost the server, per task: a storage-layer drain on a private
``redis-server``, measured by the server's own counters.

    python benchmarks/redis_lua.py --n 20000 --batch 100 --rounds 3

Each round enqueues ``--n`` tasks in batches of 5 000 into a fresh prefix, then claims and settles them
(``SUCCEEDED``) in batches of ``--batch``, as a busy worker does. For the claim and the settle script
separately, it reports the server's time inside the scripts (``INFO commandstats``: ``cmdstat_evalsha``
microseconds, the commands a script runs included) and the commands the server ran
(``total_commands_processed``, the scripts' own commands included), both per task; the median of the
rounds. The variant ``groups`` drains the same number of tasks enqueued as groups of ``--group`` members
(with a ``then``), so its settle figures include the fan-in bookkeeping. On Linux a second drain per round
claims every task first and then settles them, and reports the server process's CPU time per task for
each phase (``/proc``), which the other processes on a busy machine do not disturb as they do wall time.
Only the backend's public methods, so ``--variants plain`` also runs on an older release (put its ``src``
first on ``PYTHONPATH`` to compare).
"""

from __future__ import annotations

import argparse
import atexit
import importlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.append(str(ROOT / "src"))
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

import redis.asyncio as aioredis  # noqa: E402

from benchmarks.redis_server import PrivateRedis, find_redis_server  # noqa: E402
from lifecycle.asynctask import NewTask, Settlement, TaskState  # noqa: E402
from lifecycle.asynctask.redis import RedisBackend  # noqa: E402

VARIANTS = ("plain", "groups")
T0 = 1_700_000_000.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000, help="tasks per drain (default 20000)")
    parser.add_argument("--batch", type=int, default=100, help="claim/settle batch (default 100)")
    parser.add_argument("--group", type=int, default=100, help="members per group in 'groups' (default 100)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every variant (default 3)")
    parser.add_argument("--variants", default="plain", help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--redis-server", default=None, help="the redis-server binary")
    parser.add_argument(
        "--baseline",
        default=None,
        help="the src directory of another checkout: drain it and this one interleaved, batch by batch, on "
        "the same server (plain variant), and print both and their ratio",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    args.variants = [name.strip() for name in args.variants.split(",") if name.strip()]
    unknown = sorted(set(args.variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    return args


def _task(task_id: str, group: str | None = None) -> NewTask:
    task = NewTask(task_id, "job", "default", b"p", 3, None, T0, T0)
    if group is not None:
        from dataclasses import replace

        task = replace(task, group_id=group)
    return task


async def _counters(client: aioredis.Redis) -> tuple[int, int, int]:
    """(evalsha calls, evalsha microseconds, total commands processed)."""
    stats = await client.info("commandstats")
    evalsha = stats.get("cmdstat_evalsha", {"calls": 0, "usec": 0})
    total = (await client.info("stats"))["total_commands_processed"]
    return int(evalsha["calls"]), int(evalsha["usec"]), int(total)


async def _fill(backend: RedisBackend, variant: str, n: int, group: int, round_no: int) -> None:
    if variant == "plain":
        for first in range(0, n, 5000):
            await backend.enqueue_many(
                [_task(f"t{round_no}.{i}") for i in range(first, min(n, first + 5000))]
            )
        return
    from lifecycle.asynctask._records import NewGroup

    for g in range(0, n, group):
        gid = f"g{round_no}.{g}"
        members = tuple(_task(f"t{round_no}.{i}", gid) for i in range(g, min(n, g + group)))
        then = _task(f"z{round_no}.{g}")
        await backend.enqueue_group(NewGroup(gid, members, then, T0))


async def one_round(
    url: str, variant: str, n: int, batch: int, group: int, round_no: int
) -> dict[str, float]:
    client = aioredis.Redis.from_url(url)
    backend = RedisBackend(url, prefix=f"bench{round_no}{variant}")
    await backend.open()
    try:
        await _fill(backend, variant, n, group, round_no)
        claim_usec = settle_usec = claim_cmds = settle_cmds = 0
        drained = 0
        now = T0 + 1
        started = time.perf_counter()
        while drained < n:
            before = await _counters(client)
            claimed = await backend.claim(["default"], batch, now=now, lease_until=now + 60)
            middle = await _counters(client)
            verdicts = [
                Settlement(c.record.id, c.token, TaskState.SUCCEEDED, at=now, result=b"r") for c in claimed
            ]
            if verdicts:
                await backend.settle(verdicts)
            after = await _counters(client)
            # Each _counters() call itself is two INFO commands: leave them out.
            claim_usec += middle[1] - before[1]
            settle_usec += after[1] - middle[1]
            claim_cmds += middle[2] - before[2] - 2
            settle_cmds += after[2] - middle[2] - 2
            drained += sum(1 for c in claimed if c.record.id.startswith("t"))
            now += 0.001
            if not claimed:
                break
        elapsed = time.perf_counter() - started
        return {
            "claim_usec_per_task": claim_usec / n,
            "settle_usec_per_task": settle_usec / n,
            "claim_commands_per_task": claim_cmds / n,
            "settle_commands_per_task": settle_cmds / n,
            "tasks_per_second": n / elapsed,
        }
    finally:
        await backend.clear()
        await backend.close()
        await client.aclose()


def _server_cpu(pid: int) -> float:
    """The server process's CPU seconds so far (user + system, from ``/proc``; Linux only)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def phased_round(
    url: str, pid: int, variant: str, n: int, batch: int, group: int, round_no: int
) -> dict[str, float]:
    """The server's CPU time per task (not wall time, so other processes on the machine do not count): every
    task claimed first, in batches, then every lease settled, in batches, each phase timed as a whole."""
    backend = RedisBackend(url, prefix=f"phased{round_no}{variant}")
    await backend.open()
    try:
        await _fill(backend, variant, n, group, round_no)
        now = T0 + 1
        cpu = _server_cpu(pid)
        leases = []
        while True:
            claimed = await backend.claim(["default"], batch, now=now, lease_until=now + 600)
            if not claimed:
                break
            leases += claimed
        claim_cpu = _server_cpu(pid) - cpu
        cpu = _server_cpu(pid)
        for first in range(0, len(leases), batch):
            await backend.settle(
                [
                    Settlement(c.record.id, c.token, TaskState.SUCCEEDED, at=now, result=b"r")
                    for c in leases[first : first + batch]
                ]
            )
        settle_cpu = _server_cpu(pid) - cpu
        return {
            "claim_cpu_usec_per_task": claim_cpu * 1e6 / n,
            "settle_cpu_usec_per_task": settle_cpu * 1e6 / n,
        }
    finally:
        await backend.clear()
        await backend.close()


def _load_baseline(src: str) -> Any:
    """The ``lifecycle`` package under ``src`` imported as ``lifecycle_baseline`` (a copy in a temporary
    directory; its imports are relative), next to this checkout's."""
    target = Path(tempfile.mkdtemp(prefix="lifecycle-baseline-"))
    atexit.register(shutil.rmtree, target, ignore_errors=True)
    shutil.copytree(Path(src) / "lifecycle", target / "lifecycle_baseline")
    sys.path.insert(0, str(target))
    return importlib.import_module(
        "lifecycle_baseline.asynctask._backends.redis._backend"
    ), importlib.import_module("lifecycle_baseline.asynctask._records")


async def ab_round(url: str, baseline: Any, n: int, batch: int, round_no: int) -> dict[str, float]:
    """Drain ``n`` tasks with the baseline and ``n`` with this checkout, alternating batch by batch (the
    order swapped each time), so both see the same load on a busy machine. Server time in the scripts per
    task, for each side."""
    base_backend_module, base_records = baseline
    client = aioredis.Redis.from_url(url)
    sides = {
        "baseline": (base_backend_module.RedisBackend(url, prefix=f"ab{round_no}base"), base_records),
        "current": (
            RedisBackend(url, prefix=f"ab{round_no}cur"),
            sys.modules["lifecycle.asynctask._records"],
        ),
    }
    usec = {name: {"claim": 0, "settle": 0} for name in sides}
    try:
        for backend, records in sides.values():
            await backend.open()
            for first in range(0, n, 5000):
                tasks = [
                    records.NewTask(f"t{i}", "job", "default", b"p", 3, None, T0, T0)
                    for i in range(first, min(n, first + 5000))
                ]
                await backend.enqueue_many(tasks)
        now = T0 + 1
        order = list(sides)
        for _ in range(0, n, batch):
            for name in order:
                backend, records = sides[name]
                before = await _counters(client)
                claimed = await backend.claim(["default"], batch, now=now, lease_until=now + 60)
                middle = await _counters(client)
                verdicts = [
                    records.Settlement(c.record.id, c.token, records.TaskState.SUCCEEDED, at=now, result=b"r")
                    for c in claimed
                ]
                await backend.settle(verdicts)
                after = await _counters(client)
                usec[name]["claim"] += middle[1] - before[1]
                usec[name]["settle"] += after[1] - middle[1]
            order.reverse()
            now += 0.001
        return {
            f"{name}_{phase}_usec_per_task": value / n
            for name, phases in usec.items()
            for phase, value in phases.items()
        }
    finally:
        for backend, _ in sides.values():
            await backend.clear()
            await backend.close()
        await client.aclose()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.baseline:
        baseline = _load_baseline(args.baseline)
        runs = []
        with PrivateRedis(find_redis_server(args.redis_server)) as server:
            for round_no in range(args.rounds):
                runs.append(anyio.run(ab_round, server.url, baseline, args.n, args.batch, round_no))
        figures = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
        for phase in ("claim", "settle"):
            figures[f"{phase}_ratio"] = (
                figures[f"current_{phase}_usec_per_task"] / figures[f"baseline_{phase}_usec_per_task"]
            )
        if args.json:
            print(json.dumps(figures, indent=2))
        else:
            print(", ".join(f"{key} {value:.3f}" for key, value in figures.items()))
        return figures
    results: dict[str, list[dict[str, float]]] = {name: [] for name in args.variants}
    with PrivateRedis(find_redis_server(args.redis_server)) as server:
        for round_no in range(args.rounds):
            for variant in args.variants:
                measured = anyio.run(one_round, server.url, variant, args.n, args.batch, args.group, round_no)
                if server.pid is not None and Path("/proc").is_dir():
                    measured |= anyio.run(
                        phased_round,
                        server.url,
                        server.pid,
                        variant,
                        args.n,
                        args.batch,
                        args.group,
                        round_no,
                    )
                results[variant].append(measured)
    summary = {
        variant: {key: statistics.median(run[key] for run in runs) for key in runs[0]}
        for variant, runs in results.items()
    }
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        for variant, figures in summary.items():
            shown = ", ".join(f"{key} {value:.2f}" for key, value in figures.items())
            print(f"{variant}: {shown}")
    return summary


if __name__ == "__main__":
    main()
