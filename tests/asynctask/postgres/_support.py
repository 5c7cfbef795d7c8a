"""Small helpers shared by the PostgresBackend tests."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import psycopg
from psycopg import sql

from lifecycle.asynctask import NewTask
from lifecycle.asynctask.postgres import PostgresBackend
from lifecycle.asynctask.testing import T0

OpenPostgres = Callable[..., Awaitable[PostgresBackend]]
"""The ``open_pg`` fixture: opens a PostgresBackend over the test's schema (keyword options pass through)."""


async def start_listening(backend: PostgresBackend) -> None:
    """Have ``backend`` open its ``LISTEN`` connection (its first wait does) and return once it is up. The
    listener connects in a background task with no event to wait on from outside, so this looks at its state
    at each turn: bound it with the caller's ``anyio.fail_after``."""
    await backend.wait_for_work([], timeout=0)
    while not backend.listening:
        await anyio.sleep(0.02)


def make_task(
    task_id: str, *, queue: str = "default", delay: float = 0.0, at: float | None = None
) -> NewTask:
    """A task enqueued now (or at ``at``), due ``delay`` seconds later."""
    now = time.time() if at is None else at
    return NewTask(
        id=task_id,
        name="tests.job",
        queue=queue,
        payload=f"payload of {task_id}".encode(),
        max_retries=3,
        timeout=None,
        enqueued_at=now,
        run_at=now + delay,
    )


def task(task_id: str, name: str = "tests.job", **fields: Any) -> NewTask:
    """A task enqueued at the suites' ``T0`` (due then) unless ``fields`` say otherwise."""
    fields.setdefault("enqueued_at", T0)
    fields.setdefault("run_at", fields["enqueued_at"])
    return NewTask(
        id=task_id,
        name=name,
        queue=fields.pop("queue", "default"),
        payload=fields.pop("payload", task_id.encode()),
        max_retries=3,
        timeout=None,
        **fields,
    )


async def rows(dsn: str, query: sql.Composable | str, params: tuple[object, ...] = ()) -> list[Any]:
    """The rows ``query`` returns, on a connection of its own."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as connection:
        cursor = await connection.execute(query, params)  # type: ignore[arg-type]
        return await cursor.fetchall() if cursor.description else []


async def layout(dsn: str, schema: str) -> dict[str, list[Any]]:
    """What a schema holds: columns, indexes, composite types and functions, with the schema's name (and the
    channel names derived from it) taken out."""
    queries = {
        "columns": "SELECT table_name, column_name, data_type, is_nullable, column_default "
        "FROM information_schema.columns WHERE table_schema = %s ORDER BY table_name, ordinal_position",
        "indexes": "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = %s ORDER BY indexname",
        "functions": "SELECT p.proname, p.prosrc, pg_get_function_arguments(p.oid), p.proconfig::text "
        "FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = %s "
        "ORDER BY p.proname",
        "types": "SELECT t.typname FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace "
        "WHERE n.nspname = %s AND t.typtype = 'c' ORDER BY t.typname",
    }
    layout = {key: await rows(dsn, query, (schema,)) for key, query in queries.items()}
    return {
        key: [tuple(str(v).replace(schema, "<schema>") for v in row) for row in rows]
        for key, rows in layout.items()
    }
