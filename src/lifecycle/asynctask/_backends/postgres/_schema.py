"""The PostgreSQL layout of :class:`~lifecycle.asynctask.postgres.PostgresBackend`: tables, indexes,
versioning and migrations.

Layout (schema version 1), inside the backend's own schema (``lifecycle`` unless configured):

``lifecycle_schema(version)``
    One row: the layout version that wrote this schema. A newer version is refused; an older one is migrated
    step by step. Creation and migration run in one transaction under a transaction-scoped advisory lock, so
    any number of processes may open the same schema at once.
``lifecycle_tasks``
    One row per task. ``id`` is the primary key; ``seq`` (an identity column) is the enqueue order. Times
    are ``double precision`` seconds since the epoch (exactly the engine's floats), ``payload``/``result``
    are ``bytea``, ``state`` the :class:`~lifecycle.asynctask.TaskState` value, ``token`` the lease token
    while ``ACTIVE``.

The table is a queue: every task is inserted, updated a few times and deleted by retention, so autovacuum
is told to visit it after 2 % of its rows changed (PostgreSQL's default is 20 %).

Indexes: a partial index over pending tasks ``(queue, run_at, seq)`` serves claims and ``wait_for_work``;
a partial index over active tasks ``(lease_until, seq)`` serves recovery; a partial index over finished
tasks ``(coalesce(finished_at, enqueued_at))`` serves retention purges; ``(enqueued_at, seq)`` serves the
newest-first listing.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import psycopg
from psycopg import sql

from ..._errors import BackendError
from ..._records import RECORD_COLUMNS

__all__ = ["SCHEMA_TABLE", "SCHEMA_VERSION", "TASKS_TABLE", "TASK_COLUMNS", "ensure_schema"]

#: The layout version this code writes. Bump it and add a step to ``_MIGRATIONS`` when the layout changes.
SCHEMA_VERSION = 1

TASKS_TABLE = "lifecycle_tasks"
SCHEMA_TABLE = "lifecycle_schema"

#: The columns of ``lifecycle_tasks`` in the order ``record_from_row`` reads them.
TASK_COLUMNS = RECORD_COLUMNS

_CREATE_V1 = (
    """
    CREATE TABLE {tasks} (
        seq          bigint GENERATED ALWAYS AS IDENTITY,
        id           text             NOT NULL PRIMARY KEY,
        name         text             NOT NULL,
        queue        text             NOT NULL,
        payload      bytea            NOT NULL,
        state        text             NOT NULL CHECK (state IN
                                          ('pending', 'active', 'succeeded', 'dead', 'cancelled')),
        attempts     integer          NOT NULL DEFAULT 0,
        max_retries  integer          NOT NULL,
        timeout      double precision,
        enqueued_at  double precision NOT NULL,
        run_at       double precision NOT NULL,
        started_at   double precision,
        finished_at  double precision,
        lease_until  double precision,
        token        text,
        last_error   text,
        result       bytea,
        meta         text
    ) WITH (autovacuum_vacuum_scale_factor = 0.02, autovacuum_analyze_scale_factor = 0.02)
    """,
    "CREATE INDEX {pending} ON {tasks} (queue, run_at, seq) WHERE state = 'pending'",
    "CREATE INDEX {active} ON {tasks} (lease_until, seq) WHERE state = 'active'",
    "CREATE INDEX {finished} ON {tasks} ((coalesce(finished_at, enqueued_at))) "
    "WHERE state IN ('succeeded', 'dead', 'cancelled')",
    "CREATE INDEX {enqueued} ON {tasks} (enqueued_at, seq)",
)

Migration = Callable[["psycopg.AsyncCursor[tuple[object, ...]]", str], Awaitable[None]]

# version N -> the coroutine that migrates a schema at version N to N + 1 (inside the open transaction).
_MIGRATIONS: dict[int, Migration] = {}


async def ensure_schema(
    connection: psycopg.AsyncConnection[object], schema: str, *, create: bool = True
) -> int:
    """Create the schema and its tables when missing, migrate an older layout, refuse a newer one.

    Runs in one transaction on ``connection`` (which must be in autocommit mode, outside a transaction),
    serialised against other processes by an advisory lock derived from the schema name. Returns the
    layout version now in place, or 0 when the tables are missing and ``create`` is false (then nothing
    was created). Raises :class:`BackendError` for a newer or damaged layout, or a schema holding a foreign
    ``lifecycle_tasks`` table.
    """
    where = f"PostgreSQL schema {schema!r}"
    names = {
        "schema": sql.Identifier(schema),
        "tasks": sql.Identifier(schema, TASKS_TABLE),
        "versions": sql.Identifier(schema, SCHEMA_TABLE),
        "pending": sql.Identifier(f"{TASKS_TABLE}_pending"),
        "active": sql.Identifier(f"{TASKS_TABLE}_active"),
        "finished": sql.Identifier(f"{TASKS_TABLE}_finished"),
        "enqueued": sql.Identifier(f"{TASKS_TABLE}_enqueued"),
    }
    async with connection.transaction():
        cursor = connection.cursor(row_factory=psycopg.rows.tuple_row)
        await cursor.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"lifecycle.schema:{schema}",))
        await cursor.execute(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = %s AND c.relname = ANY(%s::text[])",
            (schema, [TASKS_TABLE, SCHEMA_TABLE]),
        )
        present = {row[0] for row in await cursor.fetchall()}
        if SCHEMA_TABLE not in present:
            if TASKS_TABLE in present:
                raise BackendError(
                    f"the {where} holds a table {TASKS_TABLE!r} that anyio-lifecycle did not create (it has "
                    f"no {SCHEMA_TABLE!r} table); choose another schema with PostgresBackend(..., schema=...)"
                )
            if not create:
                return 0
            await cursor.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {schema}").format(**names))
            create_versions = sql.SQL("CREATE TABLE {versions} (version integer NOT NULL)")
            await cursor.execute(create_versions.format(**names))
            for statement in _CREATE_V1:
                await cursor.execute(sql.SQL(statement).format(**names))
            await cursor.execute(
                sql.SQL("INSERT INTO {versions} (version) VALUES (%s)").format(**names), (SCHEMA_VERSION,)
            )
            return SCHEMA_VERSION
        await cursor.execute(sql.SQL("SELECT version FROM {versions}").format(**names))
        rows = await cursor.fetchall()
        if len(rows) != 1 or not isinstance(rows[0][0], int) or rows[0][0] < 1:
            raise BackendError(
                f"the {where} is damaged: {SCHEMA_TABLE} holds {rows!r} instead of one version row; "
                "restore it from a backup or choose another schema"
            )
        version: int = rows[0][0]
        if version > SCHEMA_VERSION:
            raise BackendError(
                f"the {where} was written by a newer anyio-lifecycle (schema version {version}; this "
                f"version understands up to {SCHEMA_VERSION}); upgrade anyio-lifecycle in this process, "
                "or use another schema"
            )
        if version == SCHEMA_VERSION:
            return version  # nothing to write: a user with read rights only can open it
        while version < SCHEMA_VERSION:
            await _MIGRATIONS[version](cursor, schema)
            version += 1
        await cursor.execute(sql.SQL("UPDATE {versions} SET version = %s").format(**names), (version,))
        return version
