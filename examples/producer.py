"""An enqueue-only process: stores tasks in a shared SQLite file for workers in other processes to run.

    python examples/producer.py --db tasks.db --count 20 [--wait]
    python examples/worker.py --db tasks.db                  # in another terminal, before or after

The producer does not import the workers' code: it enqueues by registered name. ``execution=False`` makes
its ``AsyncTasks`` store tasks without running any, as a web application would.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lifecycle
from lifecycle.asynctask import AsyncTasks, Call, SQLiteBackend


def build(db: Path, *, count: int, wait: bool) -> lifecycle.TaskManager:
    """A manager with an enqueue-only AsyncTasks and a one-shot task that enqueues ``count`` resizes."""
    tasks = AsyncTasks(SQLiteBackend(db), execution=False)

    async def produce() -> None:
        calls = [Call("images.resize", f"photo-{number}.png", 256) for number in range(1, count + 1)]
        ids = await tasks.enqueue_many(calls)  # one transaction, committed when this returns
        print(f"enqueued {len(ids)} tasks into {db}", flush=True)
        if wait:
            for task_id in ids:
                info = await tasks.wait(task_id)
                print(f"  {task_id[:8]} {info.state.value}: {info.result}", flush=True)
        else:
            print(f"run them with: python examples/worker.py --db {db}", flush=True)

    manager = lifecycle.TaskManager(name="producer")
    manager.add_task("async-tasks", tasks)
    manager.add_execute_task("produce", produce, lifecycle.TaskType.STOP_GROUP)
    return manager


def main() -> int:
    """Parse the options and enqueue under ``lifecycle.run``; exits when done."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--db", type=Path, default=Path("tasks.db"), help="shared SQLite file (tasks.db)")
    parser.add_argument("--count", type=int, default=10, help="how many tasks to enqueue (10)")
    parser.add_argument("--wait", action="store_true", help="wait for the workers and print the results")
    args = parser.parse_args()
    return lifecycle.run(build(args.db, count=args.count, wait=args.wait))


if __name__ == "__main__":
    raise SystemExit(main())
