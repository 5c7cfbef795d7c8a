"""The SQLite layout of :class:`~lifecycle.asynctask.SQLiteBackend`: tables, indexes, versioning, migrations.

Everything here is synchronous and runs on the backend's connection thread.

Layout (schema version 5)
-------------------------
``lifecycle_schema(version)``
    One row: the schema version that wrote this file. A file written by a newer version is refused, an older
    one is migrated step by step inside one ``BEGIN IMMEDIATE`` transaction (safe with several processes
    opening the same file at once).
``lifecycle_tasks``
    One row per task. ``seq`` (the rowid) is the enqueue order. Times are ``REAL`` seconds since the epoch,
    ``payload``/``result`` are ``BLOB``, ``state`` is the :class:`TaskState` value text, ``token`` the current
    lease token while ``ACTIVE``. ``priority``, ``concurrency_key`` and ``expires_at`` are flow control's;
    ``cancel_requested`` (0/1), ``progress_done``/``progress_total``/``progress_message`` and ``group_id``
    are control of running work's. ``newest_enqueued`` serves the newest-first listing (below).
``lifecycle_rate_buckets(name, tokens, updated_at, refused)``
    The token bucket of each rate-limited task name: the tokens as of ``updated_at``.
``lifecycle_unique(key, until)``
    Uniqueness windows: an enqueue with ``unique_key`` is refused while its window lasts.
``lifecycle_paused(queue)``
    The paused queues.
``lifecycle_follow_ups(id, ...)``
    The one follow-up run a debounce keeps for an active task, applied by that task's settlement.
``lifecycle_groups(id, outcome, created_at, finished_at, unfinished, then_id, then_stored, meta, then_...)``
    One row per group: its outcome once final, how many members have not succeeded (the fan-in stores
    ``then``, kept in the ``then_...`` columns, when a success brings it to 0), whether ``then`` was stored.
``lifecycle_group_members(group_id, idx, task_id, ended, result)``
    Each member in call order: the final state it last ended in (what a purged member counts as) and its
    result once it succeeded (kept with the group, so it outlives the member's record).

Indexes: a partial index over pending tasks ``(queue, priority DESC, run_at, seq)`` serves claims (in claim
order, no sort) and ``wait_for_work`` (one probe per priority in use); a partial index over pending tasks
that can expire ``(queue, expires_at)`` lets each claim cancel the expired ones; a partial index over active
tasks ``(lease_until)`` serves recovery and the running counts; a partial index over the tasks in neither
state ``(state, coalesce(finished_at, enqueued_at))`` (:data:`SETTLED`: finished, or in no known state) serves
retention purges, requeues and the look for records in no known state. Pending and active tasks have their own
partial indexes, so the finished one leaves them out: an enqueue writes one index page fewer and a claim does
not move the task in it.

The newest-first listing (``enqueued_at`` descending, then ``seq`` descending) needs no index over every row:
an insert stores in ``newest_enqueued`` the larger of its own ``enqueued_at`` and the ``newest_enqueued`` of
the row with the highest ``seq`` (:data:`NEWEST_SO_FAR`), so that column never decreases along ``seq`` and
bounds the ``enqueued_at`` of every row before it that is :data:`LISTED_BY_SEQ` (``enqueued_at IS
newest_enqueued``). Those rows, all the rows stored in clock order, are therefore in listing order by ``seq``
(the rowid: no index); the others (a group's ``then`` or a debounce's follow-up stored after later tasks, a
process whose clock is behind, a follow-up's new ``enqueued_at``, rows from before version 5 or written by
hand) are in the partial index ``lifecycle_tasks_unordered (enqueued_at) WHERE`` :data:`NOT_LISTED_BY_SEQ`,
and a listing merges the two. An in-order enqueue thus writes one index page fewer (a one-task enqueue
~3.5 WAL pages instead of ~4.6; its WAL frames are most of its cost). An update of ``enqueued_at`` keeps the
row's ``newest_enqueued``, which stays a bound for the rows before it and below the rows after it, so the
row is listed by ``seq`` only when its new time equals that bound; a deleted row leaves the others as they
are.

Version 1 (before flow control) is migrated in place: the columns are added (old records get priority 0),
the pending index is rebuilt in the new order, and the flow tables are created. Version 2 (before control of
running work) gets its five columns (old records: no cancel request, no progress, no group) and the group
tables. Version 3 gets the finished index rebuilt as the partial one. Version 4 gets ``newest_enqueued``
(``NULL`` in its rows, ``-inf`` in its last one: they all go to ``lifecycle_tasks_unordered``, which replaces
the index over every row's ``enqueued_at``; no row is rewritten but the last). Should every row stored since
be deleted while older ones remain, the next insert's look for the last ``newest_enqueued`` reads those older
rows once.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

from ..._errors import BackendError
from ..._records import RECORD_COLUMNS

__all__ = [
    "LISTED_BY_SEQ",
    "MIN_SQLITE_VERSION",
    "NEWEST_SO_FAR",
    "NOT_LISTED_BY_SEQ",
    "SCHEMA_VERSION",
    "SETTLED",
    "TASK_COLUMNS",
    "check_sqlite_version",
    "ensure_schema",
]

#: The schema version this code writes. Bump it and add a step to ``_MIGRATIONS`` when the layout changes.
SCHEMA_VERSION = 5

#: The condition of the partial index ``lifecycle_tasks_finished``: a query uses that index only when its
#: ``WHERE`` holds this very text (SQLite's planner proves a partial index usable by matching terms), so the
#: queries that want it add it to their own conditions.
SETTLED = "state NOT IN ('pending', 'active')"

#: The rows in listing order by ``seq``, and the condition of the partial index ``lifecycle_tasks_unordered``
#: that holds the others (a query names the index and repeats the condition, as with :data:`SETTLED`).
LISTED_BY_SEQ = "enqueued_at IS newest_enqueued"
NOT_LISTED_BY_SEQ = "enqueued_at IS NOT newest_enqueued"

#: The ``newest_enqueued`` of an insert, given its ``enqueued_at`` as ``{0}``: the larger of that and the
#: ``newest_enqueued`` of the row with the highest ``seq`` (the new row's ``seq`` is higher still). The look
#: skips rows without one (from before version 5, or written by hand; none of them is listed by ``seq``):
#: it reads the last row of the table, and more only after those. An ``INSERT`` takes the write lock before
#: it reads anything, so two inserts (of any processes) never read the same last row.
NEWEST_SO_FAR = (
    "max({0}, coalesce((SELECT newest_enqueued FROM lifecycle_tasks WHERE newest_enqueued IS NOT NULL "
    "ORDER BY seq DESC LIMIT 1), -1e999))"
)

#: ``UPDATE ... RETURNING`` needs SQLite 3.35.
MIN_SQLITE_VERSION = (3, 35, 0)

#: The columns of ``lifecycle_tasks`` in the order ``record_from_row`` reads them.
TASK_COLUMNS = RECORD_COLUMNS

_CREATE_V1 = (
    """
    CREATE TABLE IF NOT EXISTS lifecycle_tasks (
        seq          INTEGER PRIMARY KEY,
        id           TEXT    NOT NULL UNIQUE,
        name         TEXT    NOT NULL,
        queue        TEXT    NOT NULL,
        payload      BLOB    NOT NULL,
        state        TEXT    NOT NULL,
        attempts     INTEGER NOT NULL DEFAULT 0,
        max_retries  INTEGER NOT NULL,
        timeout      REAL,
        enqueued_at  REAL    NOT NULL,
        run_at       REAL    NOT NULL,
        started_at   REAL,
        finished_at  REAL,
        lease_until  REAL,
        token        TEXT,
        last_error   TEXT,
        result       BLOB,
        meta         TEXT
    )
    """,
    "CREATE INDEX IF NOT EXISTS lifecycle_tasks_pending "
    "ON lifecycle_tasks (queue, run_at) WHERE state = 'pending'",
    "CREATE INDEX IF NOT EXISTS lifecycle_tasks_active "
    "ON lifecycle_tasks (lease_until) WHERE state = 'active'",
    "CREATE INDEX IF NOT EXISTS lifecycle_tasks_finished "
    "ON lifecycle_tasks (state, coalesce(finished_at, enqueued_at))",
    "CREATE INDEX IF NOT EXISTS lifecycle_tasks_enqueued ON lifecycle_tasks (enqueued_at)",
)

_FLOW_V2 = (
    "ALTER TABLE lifecycle_tasks ADD COLUMN priority INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE lifecycle_tasks ADD COLUMN concurrency_key TEXT",
    "ALTER TABLE lifecycle_tasks ADD COLUMN expires_at REAL",
    "DROP INDEX IF EXISTS lifecycle_tasks_pending",
    "CREATE INDEX lifecycle_tasks_pending ON lifecycle_tasks (queue, priority DESC, run_at) "
    "WHERE state = 'pending'",
    "CREATE INDEX lifecycle_tasks_expiring ON lifecycle_tasks (queue, expires_at) "
    "WHERE state = 'pending' AND expires_at IS NOT NULL",
    """
    CREATE TABLE lifecycle_rate_buckets (
        name        TEXT    PRIMARY KEY,
        tokens      REAL    NOT NULL,
        updated_at  REAL    NOT NULL,
        refused     INTEGER NOT NULL DEFAULT 0
    )
    """,
    "CREATE TABLE lifecycle_unique (key TEXT PRIMARY KEY, until REAL NOT NULL)",
    "CREATE INDEX lifecycle_unique_until ON lifecycle_unique (until)",
    "CREATE TABLE lifecycle_paused (queue TEXT PRIMARY KEY)",
    """
    CREATE TABLE lifecycle_follow_ups (
        id               TEXT    PRIMARY KEY,
        name             TEXT    NOT NULL,
        queue            TEXT    NOT NULL,
        payload          BLOB    NOT NULL,
        max_retries      INTEGER NOT NULL,
        timeout          REAL,
        enqueued_at      REAL    NOT NULL,
        run_at           REAL    NOT NULL,
        meta             TEXT,
        priority         INTEGER NOT NULL,
        concurrency_key  TEXT,
        expires_at       REAL
    )
    """,
)


_CONTROL_V3 = (
    "ALTER TABLE lifecycle_tasks ADD COLUMN cancel_requested INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE lifecycle_tasks ADD COLUMN progress_done REAL",
    "ALTER TABLE lifecycle_tasks ADD COLUMN progress_total REAL",
    "ALTER TABLE lifecycle_tasks ADD COLUMN progress_message TEXT",
    "ALTER TABLE lifecycle_tasks ADD COLUMN group_id TEXT",
    """
    CREATE TABLE lifecycle_groups (
        id                    TEXT    PRIMARY KEY,
        outcome               TEXT,
        created_at            REAL    NOT NULL,
        finished_at           REAL,
        unfinished            INTEGER NOT NULL,
        meta                  TEXT,
        then_id               TEXT,
        then_stored           INTEGER NOT NULL DEFAULT 0,
        then_name             TEXT,
        then_queue            TEXT,
        then_payload          BLOB,
        then_max_retries      INTEGER,
        then_timeout          REAL,
        then_enqueued_at      REAL,
        then_run_at           REAL,
        then_meta             TEXT,
        then_priority         INTEGER,
        then_concurrency_key  TEXT,
        then_expires_at       REAL
    )
    """,
    "CREATE INDEX lifecycle_groups_finished ON lifecycle_groups (outcome, finished_at) "
    "WHERE outcome IS NOT NULL",
    """
    CREATE TABLE lifecycle_group_members (
        group_id  TEXT    NOT NULL,
        idx       INTEGER NOT NULL,
        task_id   TEXT    NOT NULL,
        ended     TEXT,
        result    BLOB,
        PRIMARY KEY (group_id, idx)
    )
    """,
    "CREATE UNIQUE INDEX lifecycle_group_members_task ON lifecycle_group_members (group_id, task_id)",
)

_SETTLED_V4 = (
    "DROP INDEX IF EXISTS lifecycle_tasks_finished",
    "CREATE INDEX lifecycle_tasks_finished ON lifecycle_tasks (state, coalesce(finished_at, enqueued_at)) "
    f"WHERE {SETTLED}",
)

_LISTED_V5 = (
    "ALTER TABLE lifecycle_tasks ADD COLUMN newest_enqueued REAL",
    "DROP INDEX IF EXISTS lifecycle_tasks_enqueued",
    f"CREATE INDEX lifecycle_tasks_unordered ON lifecycle_tasks (enqueued_at) WHERE {NOT_LISTED_BY_SEQ}",
    # The last row of a migrated file gets -inf (a bound no row needs: none is listed by seq yet, and its own
    # enqueued_at is larger, so it stays in the index), so that the first inserts' look (NEWEST_SO_FAR)
    # stops at it instead of reading every older row, which have none.
    "UPDATE lifecycle_tasks SET newest_enqueued = -1e999 WHERE seq = (SELECT max(seq) FROM lifecycle_tasks)",
)


def _migrate_1_to_2(connection: sqlite3.Connection) -> None:
    for statement in _FLOW_V2:
        connection.execute(statement)


def _migrate_2_to_3(connection: sqlite3.Connection) -> None:
    for statement in _CONTROL_V3:
        connection.execute(statement)


def _migrate_3_to_4(connection: sqlite3.Connection) -> None:
    for statement in _SETTLED_V4:
        connection.execute(statement)


def _migrate_4_to_5(connection: sqlite3.Connection) -> None:
    for statement in _LISTED_V5:
        connection.execute(statement)


# version N -> the function that migrates a file at version N to N + 1 (inside the open transaction).
_MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {
    1: _migrate_1_to_2,
    2: _migrate_2_to_3,
    3: _migrate_3_to_4,
    4: _migrate_4_to_5,
}


def check_sqlite_version(version: tuple[int, int, int] = sqlite3.sqlite_version_info) -> None:
    """Raise :class:`BackendError` when the linked SQLite library is too old for ``UPDATE ... RETURNING``."""
    if version < MIN_SQLITE_VERSION:
        have = ".".join(map(str, version))
        need = ".".join(map(str, MIN_SQLITE_VERSION))
        raise BackendError(
            f"SQLiteBackend needs SQLite >= {need} (for UPDATE ... RETURNING), but Python's sqlite3 "
            f"module is linked against SQLite {have}; use a Python build with a newer SQLite (for example "
            "from python.org or a recent distribution package), or another backend"
        )


def ensure_schema(connection: sqlite3.Connection, *, where: str) -> int:
    """Create the tables on an empty file, migrate an older one, refuse a newer one; return the version.

    ``where`` names the file in error messages. Runs in its own ``BEGIN IMMEDIATE`` transaction.
    """
    connection.execute("BEGIN IMMEDIATE")
    try:
        connection.execute("CREATE TABLE IF NOT EXISTS lifecycle_schema (version INTEGER NOT NULL)")
        rows = connection.execute("SELECT version FROM lifecycle_schema").fetchall()
        if len(rows) > 1:
            raise BackendError(
                f"the SQLite task database {where} is damaged: lifecycle_schema holds {len(rows)} rows "
                "instead of one; restore it from a backup or point SQLiteBackend at a new file"
            )
        if not rows:
            for statement in (*_CREATE_V1, *_FLOW_V2, *_CONTROL_V3, *_SETTLED_V4, *_LISTED_V5):
                connection.execute(statement)
            connection.execute("INSERT INTO lifecycle_schema (version) VALUES (?)", (SCHEMA_VERSION,))
            version = SCHEMA_VERSION
        else:
            version = int(rows[0][0])
            if version < 1:
                raise BackendError(
                    f"the SQLite task database {where} is damaged: lifecycle_schema says version {version}; "
                    "restore it from a backup or point SQLiteBackend at a new file"
                )
            if version > SCHEMA_VERSION:
                raise BackendError(
                    f"the SQLite task database {where} was written by a newer anyio-lifecycle "
                    f"(schema version {version}; this version understands up to {SCHEMA_VERSION}); upgrade "
                    "anyio-lifecycle in this process, or use another file"
                )
            while version < SCHEMA_VERSION:
                _MIGRATIONS[version](connection)
                version += 1
            connection.execute("UPDATE lifecycle_schema SET version = ?", (version,))
        connection.execute("COMMIT")
    except BaseException:
        connection.execute("ROLLBACK")
        raise
    return version
