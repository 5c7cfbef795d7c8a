"""The PostgreSQL layout of :class:`~lifecycle.asynctask.postgres.PostgresBackend`: tables, indexes,
versioning and migrations.

Layout (schema version 8), inside the backend's own schema (``lifecycle`` unless configured):

``lifecycle_schema(version)``
    One row: the layout version that wrote this schema. A newer version is refused; an older one is migrated
    step by step. Creation and migration run in one transaction under a transaction-scoped advisory lock, so
    any number of processes may open the same schema at once.
``lifecycle_tasks``
    One row per task. ``id`` is the primary key; ``seq`` (an identity column) is the enqueue order. Times
    are ``double precision`` seconds since the epoch (exactly the engine's floats), ``payload``/``result``
    are ``bytea``, ``state`` the :class:`~lifecycle.asynctask.TaskState` value, ``token`` the lease token
    while ``ACTIVE``. Version 2 adds ``priority``, ``concurrency_key`` and ``expires_at``, and
    ``follow_up``: the one run a debounce scheduled while the task was ``ACTIVE`` (a composite value of type
    ``lifecycle_follow_up``, NULL when there is none). It lives in the task's own row so that the row lock
    of the settlement and of the debounce serialises the two (see ``_ops``). Version 3 adds
    ``cancel_requested`` (a cancel asked while the task was active), ``progress_done``, ``progress_total``,
    ``progress_message`` and ``group_id``.
``lifecycle_buckets(name, tokens, at, refused)`` (version 2)
    The rate-limit token bucket of each task name that has taken a token: the tokens left as of ``at``, and
    how many claims were refused a token. A name without a row has a full bucket.
``lifecycle_windows(key, until)`` (version 2)
    The uniqueness windows: a task whose ``unique_key`` holds a window ending after its ``enqueued_at`` is
    refused. Windows that ended are deleted by later enqueues, a bounded number at a time.
``lifecycle_paused(queue)`` (version 2)
    The paused queues.
``lifecycle_groups`` (version 3)
    One row per group: ``remaining``, the members not succeeded yet (counted down under the row's lock by
    ``lifecycle_group_ended``, see ``_functions``), the ``outcome`` once final and ``finished_at``, the
    ``then`` task (``then_task_id`` and a ``lifecycle_follow_up`` value) until the group succeeds, and
    ``then_id`` once it is stored.
``lifecycle_group_members`` (version 3)
    One row per member, ``position`` its call order: the final ``state`` it last ended in (NULL until then)
    and its ``result``, kept when retention removes the member's record.

The task table is a queue: every task is inserted, updated a few times and deleted by retention, so
autovacuum is told to visit it after 2 % of its rows changed (PostgreSQL's default is 20 %).

Indexes over pending tasks: ``(queue, priority DESC, run_at, seq)`` serves the claim without limits and
``wait_for_work`` (one probe per distinct priority, then a range); ``(queue, name, priority DESC, run_at,
seq)`` serves the claim with limits, which takes each task name separately so that a name held back is
skipped without reading its tasks; ``(queue, expires_at)`` over the tasks that have an expiry finds the
expired ones. Over active tasks: ``(lease_until, seq)`` serves recovery, ``(name, concurrency_key)`` counts
the running tasks of a name (and key) for ``max_running`` and ``max_running_per_key``. A partial index over
finished tasks ``(coalesce(finished_at, enqueued_at))`` serves retention purges; ``(enqueued_at, seq)`` the
newest-first listing. ``lifecycle_groups (finished_at)`` over final groups serves their purge;
``lifecycle_windows (until)`` the dropping of ended uniqueness windows.

The server-side functions are listed in ``_functions`` (those of version 2 in ``_functions_v2``). Version 4
sets ``jit = off`` on the two claims. Version 5 replaces the claim without limits with one that enters each
priority group at its first pending task instead of walking, three times per group, over the index entries
that earlier claims left behind until the next vacuum (see ``_functions``). Version 6 writes the ``CHECK`` on
``state`` as a test against one array constant, which the server reads back faster on every write (see
``_V6``). Version 7 moves that test onto the column's type, the domain ``lifecycle_state`` over ``text``,
which the server reads once per session instead of once per statement (see ``_V7``). Version 8 gives
``attempts`` a volatile default, which makes the binary COPY of a bulk enqueue insert row by row instead of
buffering up to 1 000 rows, whose bookkeeping grows with the square of their number (see ``_V8``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable

import psycopg
from psycopg import sql

from ..._errors import BackendError
from ..._records import RECORD_COLUMNS
from ._functions import (
    CLAIM_FUNCTION,
    CLAIM_LIMITED_FUNCTION,
    FUNCTIONS_V3,
    FUNCTIONS_V5,
    GROUP_ENDED_FUNCTION,
    NAME_GROUPS_FUNCTION,
    NOTIFY_IDS_FUNCTION,
    PRIORITY_GROUPS_FUNCTION,
)
from ._functions_v2 import FUNCTIONS_V2

__all__ = [
    "BUCKETS_TABLE",
    "CLAIM_FUNCTION",
    "CLAIM_LIMITED_FUNCTION",
    "FOLLOW_UP_TYPE",
    "GROUPS_TABLE",
    "GROUP_ENDED_FUNCTION",
    "MAX_IDENTIFIER",
    "MEMBERS_TABLE",
    "NAME_GROUPS_FUNCTION",
    "NOTIFY_IDS_FUNCTION",
    "PAUSED_TABLE",
    "PRIORITY_GROUPS_FUNCTION",
    "SCHEMA_TABLE",
    "SCHEMA_VERSION",
    "STATE_DOMAIN",
    "TASKS_TABLE",
    "TASK_COLUMNS",
    "WINDOWS_TABLE",
    "channel_for",
    "ensure_schema",
    "notice_channel_for",
]

#: The layout version this code writes. Bump it and add a step to ``_MIGRATIONS`` when the layout changes.
SCHEMA_VERSION = 8

TASKS_TABLE = "lifecycle_tasks"
SCHEMA_TABLE = "lifecycle_schema"
BUCKETS_TABLE = "lifecycle_buckets"
WINDOWS_TABLE = "lifecycle_windows"
PAUSED_TABLE = "lifecycle_paused"
FOLLOW_UP_TYPE = "lifecycle_follow_up"
GROUPS_TABLE = "lifecycle_groups"
MEMBERS_TABLE = "lifecycle_group_members"
STATE_DOMAIN = "lifecycle_state"

MAX_IDENTIFIER = 63
"""PostgreSQL's NAMEDATALEN - 1: the longest name (of a schema, a channel), in bytes."""


def channel_for(schema: str) -> str:
    """The ``NOTIFY`` channel that wakes idle workers of ``schema`` (payload: a queue name)."""
    channel = f"lifecycle.{schema}"
    if len(channel.encode()) <= MAX_IDENTIFIER:
        return channel
    return "lifecycle." + hashlib.sha256(schema.encode()).hexdigest()[:40]


def notice_channel_for(schema: str) -> str:
    """The ``NOTIFY`` channel of the notices of ``schema`` (cancel requests, settlements; see ``_listen``).
    Its prefix differs from :func:`channel_for`'s, so no schema's notice channel is another's work channel."""
    channel = f"lifecycle-notices.{schema}"
    if len(channel.encode()) <= MAX_IDENTIFIER:
        return channel
    return "lifecycle-notices." + hashlib.sha256(schema.encode()).hexdigest()[:40]


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

# Version 2 (flow control, issue 13). Adding columns with a constant default rewrites nothing (PostgreSQL
# 11+); the new indexes are built inside the migration's transaction, which blocks writers of the table
# meanwhile.
_V2 = (
    """
    CREATE TYPE {follow_up_type} AS (
        name            text,
        queue           text,
        payload         bytea,
        max_retries     integer,
        timeout         double precision,
        enqueued_at     double precision,
        run_at          double precision,
        meta            text,
        priority        bigint,
        concurrency_key text,
        expires_at      double precision
    )
    """,
    "ALTER TABLE {tasks} ADD COLUMN priority bigint NOT NULL DEFAULT 0, "
    "ADD COLUMN concurrency_key text, ADD COLUMN expires_at double precision, "
    "ADD COLUMN follow_up {follow_up_type}",
    # The claim order within a queue: the highest priority first, then run_at, then enqueue order.
    "DROP INDEX {pending_qualified}",
    "CREATE INDEX {pending} ON {tasks} (queue, priority DESC, run_at, seq) WHERE state = 'pending'",
    "CREATE INDEX {pending_by_name} ON {tasks} (queue, name, priority DESC, run_at, seq) "
    "WHERE state = 'pending'",
    "CREATE INDEX {expiring} ON {tasks} (queue, expires_at) "
    "WHERE state = 'pending' AND expires_at IS NOT NULL",
    "CREATE INDEX {running} ON {tasks} (name, concurrency_key) WHERE state = 'active'",
    """
    CREATE TABLE {buckets} (
        name    text             NOT NULL PRIMARY KEY,
        tokens  double precision NOT NULL,
        at      double precision NOT NULL,
        refused bigint           NOT NULL DEFAULT 0
    )
    """,
    "CREATE TABLE {windows} (key text NOT NULL PRIMARY KEY, until double precision NOT NULL)",
    "CREATE INDEX {windows_until} ON {windows} (until)",
    "CREATE TABLE {paused} (queue text NOT NULL PRIMARY KEY)",
    *FUNCTIONS_V2,
)

# Version 3 (control of running work, issue 14): the cancel request, progress and group of each task, the
# groups and their members (each member's last ending and result, kept when retention removes its record), and
# the claims replaced by versions that end the group of a member they find expired. Adding nullable columns,
# or one with a constant default, rewrites nothing.
_V3 = (
    "ALTER TABLE {tasks} ADD COLUMN cancel_requested boolean NOT NULL DEFAULT false, "
    "ADD COLUMN progress_done double precision, ADD COLUMN progress_total double precision, "
    "ADD COLUMN progress_message text, ADD COLUMN group_id text",
    """
    CREATE TABLE {groups} (
        id           text             NOT NULL PRIMARY KEY,
        created_at   double precision NOT NULL,
        meta         text,
        remaining    integer          NOT NULL,
        outcome      text             CHECK (outcome IN ('succeeded', 'dead', 'cancelled')),
        finished_at  double precision,
        then_task_id text,
        then_task    {follow_up_type},
        then_id      text
    ) WITH (autovacuum_vacuum_scale_factor = 0.02, autovacuum_analyze_scale_factor = 0.02)
    """,
    "CREATE INDEX {groups_finished} ON {groups} (finished_at) WHERE outcome IS NOT NULL",
    """
    CREATE TABLE {members} (
        group_id text    NOT NULL,
        task_id  text    NOT NULL,
        position integer NOT NULL,
        state    text,
        result   bytea,
        PRIMARY KEY (group_id, task_id)
    ) WITH (autovacuum_vacuum_scale_factor = 0.02, autovacuum_analyze_scale_factor = 0.02)
    """,
    *FUNCTIONS_V3,
)

# Version 4: the two claims run without JIT compilation, whatever the session's setting. Their generic plans
# carry the disabled paths' costs (see _functions), far above jit_above_cost, so a session with jit = on (the
# server's default; the backend's own connections turn it off, a caller's or a psql session may not)
# compiled the limited claim's statements on every call: 1.6 s for a claim that runs in a millisecond.
# ALTER FUNCTION keeps each function as version 3 defined it, with the setting added.
_V4 = (
    "ALTER FUNCTION {claim_function}(text[], double precision, integer, double precision, text[]) "
    "SET jit = off",
    "ALTER FUNCTION {claim_limited_function}(text[], double precision, integer, double precision, text, "
    "text[], double precision[], double precision[], bigint[], bigint[]) SET jit = off",
)

# Version 5: the claim without limits enters each priority group at its first pending task (see _functions);
# CREATE OR REPLACE keeps the function's identity (and grants), and the new definition sets jit = off itself.
_V5 = FUNCTIONS_V5

# Version 6: the CHECK on the state written as one array constant. PostgreSQL reads a table's CHECK
# expressions back from their stored text, and plans them, on every statement that writes the table
# (ExecConstraints): the IN list version 1 wrote (an array of five separate constants) cost 45 600 of the
# 283 000 instructions the server spends on a single enqueue, the same test against one text[] constant
# 29 000 (callgrind, PostgreSQL 15). The constraint is added NOT VALID: the rows were under the same test
# until this statement, and a validation would read the whole table while holding the migration's lock (a
# row in another state, written where the check was dropped by hand, stays readable as dead: see
# _records.stored_state).
_V6 = (
    "ALTER TABLE {tasks} DROP CONSTRAINT IF EXISTS {state_check}",
    "ALTER TABLE {tasks} ADD CONSTRAINT {state_check} "
    "CHECK (state = ANY ('{{pending,active,succeeded,dead,cancelled}}'::text[])) NOT VALID",
)

# Version 7: the test of the state on the column's type. A table's CHECK is read back from its stored text and
# planned on every statement that writes the table, however few rows it writes and whether or not it sets the
# state: with version 6's single array constant still 32 000 of the 247 000 instructions the server spends on
# a single enqueue (callgrind, PostgreSQL 15), 26 000 of them in stringToNode. A domain's CHECK is read and
# planned once per session (the type cache) and only set up per statement that assigns the state: 224 000
# instructions per single enqueue (the index predicates, which now read the column as text, cost 2 800 more of
# them), 311 000 instead of 323 000 per task claimed and settled in a drain. A value outside the five states
# is refused as before, with a check violation (SQLSTATE 23514). The column becomes the domain before the
# domain gets its CHECK: with the CHECK in place, the type change would rewrite the table to test every row;
# without it, nothing is rewritten (the same bytes), and the partial indexes, whose predicates read the
# column, are rebuilt. The CHECK is added NOT VALID for the reason given at _V6; the rows were under the same
# test until this transaction.
_V7 = (
    "CREATE DOMAIN {state_domain} AS text",
    "ALTER TABLE {tasks} DROP CONSTRAINT IF EXISTS {state_check}",
    "ALTER TABLE {tasks} ALTER COLUMN state TYPE {state_domain}",
    "ALTER DOMAIN {state_domain} ADD CONSTRAINT {state_domain_check} "
    "CHECK (VALUE = ANY ('{{pending,active,succeeded,dead,cancelled}}'::text[])) NOT VALID",
)

# Version 8: the bulk enqueue's binary COPY inserts row by row. attempts, which the COPY leaves to its default
# (0), gets a volatile one: (random() * 0)::integer, 0 all the same. With only constant or nextval defaults to
# fill in, COPY buffers up to 1 000 rows before writing them, each in a slot of its own that registers the
# table's row type with the statement's resource owner, which keeps one entry per registration in a hash
# table where every entry for the same row type probes from the same place: registering and forgetting n
# slots costs about n * n / 2 probes each way, 8 500 of the 88 500 instructions the server spends per task of
# a 1 000-task COPY (callgrind, PostgreSQL 15), growing with the batch up to the buffer's 1 000 rows. With a
# volatile default to evaluate, COPY inserts each row as it reads it, through one slot: 80 000 instructions
# per task, and one WAL record per row (about 44 bytes more per task than the buffered inserts' shared
# records). Every other insert names attempts, so only the COPY evaluates the default. SET DEFAULT changes
# the catalog only.
_V8 = ("ALTER TABLE {tasks} ALTER COLUMN attempts SET DEFAULT (random() * 0)::integer",)

Migration = Callable[["psycopg.AsyncCursor[tuple[object, ...]]", str], Awaitable[None]]


def _names(schema: str) -> dict[str, sql.Composable]:
    """The identifiers the layout statements are formatted with."""
    return {
        "schema": sql.Identifier(schema),
        "tasks": sql.Identifier(schema, TASKS_TABLE),
        "versions": sql.Identifier(schema, SCHEMA_TABLE),
        "buckets": sql.Identifier(schema, BUCKETS_TABLE),
        "windows": sql.Identifier(schema, WINDOWS_TABLE),
        "paused": sql.Identifier(schema, PAUSED_TABLE),
        "groups": sql.Identifier(schema, GROUPS_TABLE),
        "members": sql.Identifier(schema, MEMBERS_TABLE),
        "groups_finished": sql.Identifier(f"{GROUPS_TABLE}_finished"),
        "group_ended": sql.Identifier(schema, GROUP_ENDED_FUNCTION),
        "notify_ids": sql.Identifier(schema, NOTIFY_IDS_FUNCTION),
        "channel": sql.Literal(channel_for(schema)),
        "notice_channel": sql.Literal(notice_channel_for(schema)),
        "follow_up_type": sql.Identifier(schema, FOLLOW_UP_TYPE),
        "pending": sql.Identifier(f"{TASKS_TABLE}_pending"),
        "pending_qualified": sql.Identifier(schema, f"{TASKS_TABLE}_pending"),
        "pending_by_name": sql.Identifier(f"{TASKS_TABLE}_pending_by_name"),
        "expiring": sql.Identifier(f"{TASKS_TABLE}_expiring"),
        "running": sql.Identifier(f"{TASKS_TABLE}_running"),
        "active": sql.Identifier(f"{TASKS_TABLE}_active"),
        "finished": sql.Identifier(f"{TASKS_TABLE}_finished"),
        "enqueued": sql.Identifier(f"{TASKS_TABLE}_enqueued"),
        "state_check": sql.Identifier(f"{TASKS_TABLE}_state_check"),
        "state_domain": sql.Identifier(schema, STATE_DOMAIN),
        "state_domain_check": sql.Identifier(f"{STATE_DOMAIN}_check"),
        "windows_until": sql.Identifier(f"{WINDOWS_TABLE}_until"),
        "priority_groups": sql.Identifier(schema, PRIORITY_GROUPS_FUNCTION),
        "name_groups": sql.Identifier(schema, NAME_GROUPS_FUNCTION),
        "claim_function": sql.Identifier(schema, CLAIM_FUNCTION),
        "claim_limited_function": sql.Identifier(schema, CLAIM_LIMITED_FUNCTION),
    }


async def _run(
    cursor: psycopg.AsyncCursor[tuple[object, ...]], schema: str, statements: tuple[str, ...]
) -> None:
    names = _names(schema)
    for statement in statements:
        await cursor.execute(sql.SQL(statement).format(**names))


async def _migrate_1_to_2(cursor: psycopg.AsyncCursor[tuple[object, ...]], schema: str) -> None:
    """Flow control: priority, concurrency key, expiry and debounce follow-up columns, their indexes, and the
    rate buckets, uniqueness windows and paused queues."""
    await _run(cursor, schema, _V2)


async def _migrate_2_to_3(cursor: psycopg.AsyncCursor[tuple[object, ...]], schema: str) -> None:
    """Control of running work: cancel request, progress and group columns, the group tables, the group and
    notice functions, and the claims that use them."""
    await _run(cursor, schema, _V3)


async def _migrate_3_to_4(cursor: psycopg.AsyncCursor[tuple[object, ...]], schema: str) -> None:
    """No JIT compilation in the claim functions."""
    await _run(cursor, schema, _V4)


async def _migrate_4_to_5(cursor: psycopg.AsyncCursor[tuple[object, ...]], schema: str) -> None:
    """The claim without limits that enters each priority group at its first pending task."""
    await _run(cursor, schema, _V5)


async def _migrate_5_to_6(cursor: psycopg.AsyncCursor[tuple[object, ...]], schema: str) -> None:
    """The CHECK on the state as one array constant: its cost on every statement that writes tasks (see
    ``_V6``)."""
    await _run(cursor, schema, _V6)


async def _migrate_6_to_7(cursor: psycopg.AsyncCursor[tuple[object, ...]], schema: str) -> None:
    """The test of the state on the column's type, the domain ``lifecycle_state``: its cost on every
    statement that writes tasks (see ``_V7``)."""
    await _run(cursor, schema, _V7)


async def _migrate_7_to_8(cursor: psycopg.AsyncCursor[tuple[object, ...]], schema: str) -> None:
    """The bulk COPY's rows inserted one by one: the cost of buffering them (see ``_V8``)."""
    await _run(cursor, schema, _V8)


# version N -> the coroutine that migrates a schema at version N to N + 1 (inside the open transaction). A new
# schema is created at version 1 and migrated up, so a new and a migrated schema are the same.
_MIGRATIONS: dict[int, Migration] = {
    1: _migrate_1_to_2,
    2: _migrate_2_to_3,
    3: _migrate_3_to_4,
    4: _migrate_4_to_5,
    5: _migrate_5_to_6,
    6: _migrate_6_to_7,
    7: _migrate_7_to_8,
}


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
    names = _names(schema)
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
            await _run(cursor, schema, _CREATE_V1)
            for step in range(1, SCHEMA_VERSION):
                await _MIGRATIONS[step](cursor, schema)
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
