"""A child process for the signal tests: `python -u signal_child.py BACKEND SCENARIO`.

It runs a TaskManager under lifecycle.run and prints lines the parent test synchronises on (never sleeps).
Scenarios: graceful, second (a cleanup hangs), third (an execute ignores cancellation), timeout
(shutdown_timeout with a stuck execute), failure (a task raises; no signal needed), stacks (SIGUSR1 logs the
stack report).
"""

from __future__ import annotations

import logging
import sys

import anyio

import lifecycle
from lifecycle import EventKind, LifecycleEvent, ManagerState, TaskType


def say(text: str) -> None:
    print(text, flush=True)


class Part:
    def __init__(self, name: str, *, hang_in_cleanup: bool = False, stuck_execute: bool = False) -> None:
        self.name = name
        self.hang_in_cleanup = hang_in_cleanup
        self.stuck_execute = stuck_execute

    async def initialize(self) -> None:
        say(f"initialize {self.name}")

    async def execute(self) -> None:
        if self.stuck_execute:
            await stuck_execute()
        await anyio.sleep_forever()

    async def cleanup(self) -> None:
        if self.hang_in_cleanup:
            say(f"cleanup {self.name} waiting")
            try:
                await anyio.sleep_forever()
            except anyio.get_cancelled_exc_class():
                say(f"cleanup {self.name} cancelled")
                raise
        say(f"cleanup {self.name}")


async def stuck_execute() -> None:
    with anyio.CancelScope(shield=True):
        await anyio.sleep_forever()  # STUCK-HERE


async def waiting_for_orders() -> None:
    await anyio.sleep_forever()  # ORDERS-WAIT-HERE


async def fail_soon() -> None:
    raise ValueError("kaboom")


def on_event(event: LifecycleEvent) -> None:
    if event.kind is EventKind.STATE_CHANGED and event.state is ManagerState.RUNNING:
        say("EVENT running")
    elif event.kind is EventKind.SHUTDOWN_REQUESTED:
        say("EVENT shutdown requested")


def main(backend: str, scenario: str) -> int:
    if scenario in ("second", "third", "timeout", "stacks"):
        # An application that configured logging itself: lifecycle.run must leave it alone.
        logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="LOG %(levelname)s %(message)s")
    manager = lifecycle.TaskManager(
        name="child", on_event=on_event, shutdown_timeout=0.2 if scenario == "timeout" else None
    )
    manager.add_task("a", Part("a"))
    manager.add_task("b", Part("b", hang_in_cleanup=scenario == "second"))
    manager.add_task("c", Part("c", stuck_execute=scenario in ("third", "timeout")))
    if scenario == "failure":
        manager.add_execute_task("bad", fail_soon, TaskType.ERROR)
    if scenario == "stacks":
        manager.add_execute_task("orders", waiting_for_orders, TaskType.ERROR)
        return lifecycle.run(manager, backend=backend, dump_stacks_on="SIGUSR1")
    return lifecycle.run(manager, backend=backend)


if __name__ == "__main__":
    status = main(sys.argv[1], sys.argv[2])
    say(f"EXIT {status}")
    raise SystemExit(status)
