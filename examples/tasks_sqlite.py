"""Durable background tasks on SQLite: one process enqueues them, runs them, and stops by itself.

python examples/tasks_sqlite.py              # a fresh database in a temporary directory
python examples/tasks_sqlite.py --db tasks.db  # keep it: look inside with `sqlite3 tasks.db`
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import anyio

import lifecycle
from lifecycle.asynctask import AsyncTasks, Call, SQLiteBackend, TaskContext


async def send_welcome_email(ctx: TaskContext, user: str) -> str:
    """A task: any async function with positional arguments (a TaskContext first, if it wants one)."""
    await anyio.sleep(0.2)  # talking to the mail server
    print(f"  sent a welcome email to {user}")
    return f"welcome:{user}"


async def build_report(ctx: TaskContext, week: int) -> dict[str, int]:
    """A task that fails on its first attempt: it is retried with backoff."""
    if ctx.attempt == 1:
        print(f"  report for week {week}: warehouse busy on attempt 1, will retry")
        raise ConnectionError("warehouse busy")
    print(f"  report for week {week}: built on attempt {ctx.attempt}")
    return {"week": week, "orders": 1234}


def build(db: Path) -> lifecycle.TaskManager:
    """A manager running the task module plus a demo that enqueues work, waits for it and reports."""
    tasks = AsyncTasks(SQLiteBackend(db), concurrency=4, retry_backoff=lifecycle.Backoff(initial=0.2, cap=1))
    tasks.register(send_welcome_email, name="emails.welcome")  # stable names: producers and workers agree
    tasks.register(build_report, name="reports.build", max_retries=3)

    async def demo() -> None:
        print(f"enqueueing into {db}")
        ids = await tasks.enqueue_many([Call(send_welcome_email, user) for user in ("ada", "grace", "linus")])
        ids.append(await tasks.enqueue(build_report, 42))
        ids.append(await tasks.enqueue(send_welcome_email, "guido", delay=0.5))  # runs half a second later
        finished = [await tasks.wait(task_id, timeout=30) for task_id in ids]
        print("\nwhat ran:")
        for info in finished:
            print(
                f"  {info.name:<15} {info.state.value:<10} attempts={info.attempts}  result={info.result!r}"
            )
        # Returning ends this STOP_GROUP task: the manager shuts down gracefully, and the program exits.

    manager = lifecycle.TaskManager(name="tasks-demo")
    manager.add_task("async-tasks", tasks)
    manager.add_execute_task("demo", demo, lifecycle.TaskType.STOP_GROUP)
    return manager


def main() -> int:
    """Parse ``--db`` and run the demo under ``lifecycle.run`` (Ctrl-C stops it cleanly)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--db", type=Path, help="SQLite file to use (default: a temporary one)")
    args = parser.parse_args()
    if args.db is not None:
        return lifecycle.run(build(args.db))
    with tempfile.TemporaryDirectory() as directory:
        return lifecycle.run(build(Path(directory) / "tasks.db"))


if __name__ == "__main__":
    raise SystemExit(main())
