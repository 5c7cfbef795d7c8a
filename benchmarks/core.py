"""Scenario 6, the core: a running ``TaskManager`` against a raw anyio task group.

- *hot add*: add N execute tasks (``TaskType.ERROR`` no-ops that return at once) to a running manager with
  ``add_execute_task``, time from the first add until the last has run; the raw subject does the same
  with ``TaskGroup.start_soon``.
- *shutdown*: M execute tasks wait in ``anyio.sleep_forever()``; time from ``manager.shutdown()`` until
  ``manager.run()`` has returned (every execute cancelled and awaited, the cleanups run); the raw subject
  cancels its task group and waits for it to exit.

Run as ``python -m benchmarks.core --subject manager|raw --backend asyncio|trio``; prints one
``BENCH-RESULT`` line like the adapters.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

from lifecycle import TaskManager, TaskType

RESULT_PREFIX = "BENCH-RESULT "


class _Countdown:
    """Sets ``event`` when ``hit`` has been called ``n`` times."""

    def __init__(self, n: int) -> None:
        self.left = n
        self.event = anyio.Event()

    async def hit(self) -> None:
        self.left -= 1
        if self.left == 0:
            self.event.set()

    async def hit_then_wait(self) -> None:
        await self.hit()
        await anyio.sleep_forever()


async def _manager_hot_add(n: int) -> float:
    manager = TaskManager(name="bench-core")
    ready, done = _Countdown(1), _Countdown(n)
    manager.add_execute_task("ready", ready.hit_then_wait)
    async with anyio.create_task_group() as group:
        group.start_soon(manager.run)
        await ready.event.wait()
        start = time.perf_counter()
        for index in range(n):
            manager.add_execute_task(f"job-{index}", done.hit, TaskType.ERROR)
        await done.event.wait()
        elapsed = time.perf_counter() - start
        manager.shutdown()
    return elapsed


async def _raw_hot_add(n: int) -> float:
    done = _Countdown(n)
    async with anyio.create_task_group() as group:
        start = time.perf_counter()
        for _ in range(n):
            group.start_soon(done.hit)
        await done.event.wait()
        elapsed = time.perf_counter() - start
    return elapsed  # noqa: RET504 (mypy: a task group may swallow the return inside it)


async def _manager_shutdown(m: int) -> float:
    manager = TaskManager(name="bench-core")
    started = _Countdown(m)
    for index in range(m):
        manager.add_execute_task(f"job-{index}", started.hit_then_wait)
    finished = anyio.Event()

    async def run() -> None:
        await manager.run()
        finished.set()

    async with anyio.create_task_group() as group:
        group.start_soon(run)
        await started.event.wait()
        start = time.perf_counter()
        manager.shutdown()
        await finished.wait()
        elapsed = time.perf_counter() - start
    return elapsed  # noqa: RET504 (mypy: a task group may swallow the return inside it)


async def _raw_shutdown(m: int) -> float:
    started = _Countdown(m)
    async with anyio.create_task_group() as group:
        for _ in range(m):
            group.start_soon(started.hit_then_wait)
        await started.event.wait()
        start = time.perf_counter()
        group.cancel_scope.cancel()
    return time.perf_counter() - start


SUBJECTS: dict[str, tuple[Callable[[int], Awaitable[float]], Callable[[int], Awaitable[float]]]] = {
    "manager": (_manager_hot_add, _manager_shutdown),
    "raw": (_raw_hot_add, _raw_shutdown),
}


def main(argv: list[str] | None = None) -> None:
    """Measure one subject on one anyio backend and print the ``BENCH-RESULT`` line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subject", choices=sorted(SUBJECTS), required=True)
    parser.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio")
    parser.add_argument("--n", type=int, default=100_000, help="execute tasks to hot-add")
    parser.add_argument("--shutdown-n", type=int, default=10_000, help="running tasks to shut down")
    parser.add_argument("--library", default="", help="the name to report (default: the subject)")
    args = parser.parse_args(argv)
    hot_add, shutdown = SUBJECTS[args.subject]
    metrics: dict[str, Any] = {
        "hot_add_s": anyio.run(hot_add, args.n, backend=args.backend),
        "shutdown_s": anyio.run(shutdown, args.shutdown_n, backend=args.backend),
    }
    metrics["hot_add_us_per_task"] = metrics["hot_add_s"] * 1e6 / args.n
    result = {
        "library": args.library or args.subject,
        "scenario": f"core_{args.backend}",
        "n": args.n,
        "shutdown_n": args.shutdown_n,
        "metrics": metrics,
    }
    print(RESULT_PREFIX + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
