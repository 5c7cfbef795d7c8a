"""A batch job with the same main() as a service: it stops by itself when its STOP_GROUP work is done.

    python examples/batch.py

Two STOP_GROUP tasks form a pipeline: one imports orders, the other invoices them as they arrive. When
both have returned, the manager shuts down gracefully: the progress reporter is cancelled, the database is
closed, and the process exits with status 0.
"""

from __future__ import annotations

from functools import partial

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

import lifecycle
from lifecycle import TaskType
from lifecycle.tasks import Repeat

ORDERS = [f"order-{n:03d}" for n in range(1, 13)]


def say(message: str) -> None:
    print(message, flush=True)


class Database:
    """Opened before the jobs start, closed after they are done."""

    def __init__(self) -> None:
        self.invoices: list[str] = []

    async def initialize(self) -> None:
        say("database: opened")

    async def execute(self) -> None:
        await anyio.sleep_forever()  # STRICT: it must not stop on its own; the shutdown cancels it

    async def cleanup(self) -> None:
        say(f"database: closed with {len(self.invoices)} invoice(s) saved")


async def import_orders(orders: MemoryObjectSendStream[str]) -> None:
    async with orders:  # closing the stream tells the invoicer there is nothing more to come
        for order in ORDERS:
            await anyio.sleep(0.01)  # pretend to read it from somewhere slow
            await orders.send(order)
    say(f"import: done, {len(ORDERS)} order(s) read")


async def invoice_orders(orders: MemoryObjectReceiveStream[str], database: Database) -> None:
    async with orders:
        async for order in orders:
            database.invoices.append(f"invoice for {order}")
    say(f"invoices: done, {len(database.invoices)} invoice(s) written")


def build() -> tuple[lifecycle.TaskManager, Database]:
    manager = lifecycle.TaskManager(name="batch")
    database = Database()
    send, receive = anyio.create_memory_object_stream[str](max_buffer_size=4)
    manager.add_task("database", database)
    manager.add_execute_task("import", partial(import_orders, send), TaskType.STOP_GROUP)
    manager.add_execute_task("invoice", partial(invoice_orders, receive, database), TaskType.STOP_GROUP)

    async def progress() -> None:
        say(f"progress: {len(database.invoices)}/{len(ORDERS)} invoiced")

    manager.add_execute_task("progress", Repeat(progress, interval=0.05))
    return manager, database


def main() -> int:
    manager, database = build()
    status = lifecycle.run(manager)
    say(f"batch: finished with exit status {status}, {len(database.invoices)} invoice(s)")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
