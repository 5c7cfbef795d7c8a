"""A worker process: runs the tasks producers enqueue into a shared SQLite file, until Ctrl-C / SIGTERM.

    python examples/worker.py --db tasks.db          # start one or more of these (any terminal)
    python examples/producer.py --db tasks.db --count 20

Stopping a worker is graceful: it stops taking tasks, lets running ones finish (up to --grace seconds) and
puts the rest back for another worker, so nothing is lost. Even `kill -9` loses nothing: the tasks it held
run again elsewhere once their lease (--lease seconds) expires.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import anyio

import lifecycle
from lifecycle.asynctask import AsyncTasks, SQLiteBackend, TaskContext


async def resize_image(ctx: TaskContext, path: str, width: int) -> dict[str, object]:
    """The work: pretend to resize an image, and return what was made."""
    await anyio.sleep(0.1)
    print(f"resized {path} to {width}px (worker pid {os.getpid()}, attempt {ctx.attempt})", flush=True)
    return {"path": path, "width": width, "worker": os.getpid()}


def build(db: Path, *, concurrency: int, grace: float, lease: float) -> lifecycle.TaskManager:
    """A manager whose only task is the AsyncTasks worker."""
    tasks = AsyncTasks(SQLiteBackend(db), concurrency=concurrency, shutdown_grace=grace, lease=lease)
    # Producers enqueue by this name; they do not need to import this code.
    tasks.register(resize_image, name="images.resize")
    manager = lifecycle.TaskManager(name=f"worker-{os.getpid()}")
    manager.add_task("async-tasks", tasks)
    return manager


def main() -> int:
    """Parse the options and run the worker under ``lifecycle.run``."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--db", type=Path, default=Path("tasks.db"), help="shared SQLite file (tasks.db)")
    parser.add_argument("--concurrency", type=int, default=8, help="tasks run at once (8)")
    parser.add_argument("--grace", type=float, default=10.0, help="seconds to finish at shutdown (10)")
    parser.add_argument(
        "--lease", type=float, default=30.0, help="seconds before a dead worker's tasks rerun"
    )
    args = parser.parse_args()
    print(f"worker {os.getpid()} serving {args.db}; Ctrl-C to stop", flush=True)
    return lifecycle.run(build(args.db, concurrency=args.concurrency, grace=args.grace, lease=args.lease))


if __name__ == "__main__":
    raise SystemExit(main())
