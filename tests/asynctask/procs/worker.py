"""A harness worker process: AsyncTasks on a backend URL under a TaskManager, run by ``lifecycle.run``.

Run by path (``python tests/asynctask/procs/worker.py --url sqlite:////tmp/x.db --out-dir /tmp/out``) or as
``python -m tests.asynctask.procs.worker`` from the repository root. Prints JSON lines: ``ready`` once every
task of the manager has started executing, the job events of ``jobs.py``, and ``exit`` with the exit code at
the end.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

# Run by path: make the `tests` package importable from the repository root (not from tests/asynctask, whose
# redis/ test package would shadow redis-py).
if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

import anyio

import lifecycle
from lifecycle.asynctask import AsyncTasks, backend_from_url
from tests.asynctask.procs import jobs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The worker's command line."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True, help="backend URL, e.g. sqlite:////tmp/tasks.db")
    parser.add_argument("--out-dir", required=True, type=Path, help="where runs.log and markers go")
    parser.add_argument("--name", default="worker")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--lease", type=float, default=2.0)
    parser.add_argument("--poll-interval", type=float, default=0.05)
    parser.add_argument("--shutdown-grace", type=float, default=5.0)
    parser.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio")
    parser.add_argument("--every", type=float, default=None, help="run procs.tick on this interval schedule")
    parser.add_argument("--flow", action="store_true", help="also register the flow-limited jobs")
    parser.add_argument("--control", action="store_true", help="also register the cancel and group jobs")
    parser.add_argument(
        "--retry-backoff",
        type=float,
        default=None,
        help="the first retry's backoff ceiling in seconds (default: AsyncTasks' own, 1 s)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Build the manager, run it until SIGTERM/SIGINT, print the exit code."""
    args = parse_args(argv)
    jobs.configure(args.out_dir)
    options: dict[str, Any] = {}
    if args.retry_backoff is not None:  # AsyncTasks' own cap: only the first retries come sooner
        options["retry_backoff"] = lifecycle.Backoff(initial=args.retry_backoff, cap=600.0)
    tasks = AsyncTasks(
        backend_from_url(args.url),
        concurrency=args.concurrency,
        shutdown_grace=args.shutdown_grace,
        lease=args.lease,
        poll_interval=args.poll_interval,
        recovery_interval=args.lease / 2,
        **options,
    )
    jobs.register_jobs(tasks)
    if args.flow:
        jobs.register_flow_jobs(tasks)
    if args.control:
        jobs.register_control_jobs(tasks)
    if args.every is not None:
        tasks.every("procs.tick", args.every, name="tick")

    async def announce() -> None:
        jobs.emit("ready", name=args.name)
        await anyio.sleep_forever()

    manager = lifecycle.TaskManager(name=args.name)
    manager.add_task("async-tasks", tasks)
    manager.add_execute_task("announce", announce)
    code = lifecycle.run(manager, backend=args.backend)
    jobs.emit("exit", code=code)
    return code


if __name__ == "__main__":
    sys.exit(main())
