"""The SQL statements of :class:`~lifecycle.asynctask.postgres.PostgresBackend`, rendered once per schema.

Every statement names its tables fully qualified (``"schema"."lifecycle_tasks"``, quoted by
:mod:`psycopg.sql`), so it works on any connection whatever its ``search_path``, including a caller's own
connection in :meth:`PostgresBackend.enqueue_many_in`. Batches travel as arrays and are expanded with
``unnest``: one statement per batch, whatever its size (a large batch of new tasks goes by binary COPY
instead, and a single task as scalars: see ``_ops.enqueue``). The text of each statement never changes, so
psycopg prepares it on the server after a few executions; the single enqueue's INSERT (``insert_one``, or
``insert_one_new`` for an id the caller chose) is prepared by the backend itself on its connections' first use
of it, and run through libpq (see ``_direct``).

The two claims (without and with limits) are calls of server-side functions (see ``_functions``).
"""

from __future__ import annotations

from dataclasses import dataclass

from psycopg import sql

from ._functions import (
    CLAIM_FUNCTION,
    CLAIM_LIMITED_FUNCTION,
    GROUP_ENDED_FUNCTION,
    NAME_GROUPS_FUNCTION,
    NOTIFY_IDS_FUNCTION,
    PRIORITY_GROUPS_FUNCTION,
    notice_query,
)
from ._schema import (
    BUCKETS_TABLE,
    FOLLOW_UP_TYPE,
    GROUPS_TABLE,
    MEMBERS_TABLE,
    PAUSED_TABLE,
    TASK_COLUMNS,
    TASKS_TABLE,
    WINDOWS_TABLE,
    channel_for,
    notice_channel_for,
)

__all__ = [
    "COPY_COLUMNS",
    "COPY_TYPES",
    "HOT_STATEMENTS",
    "INSERT_ONE_TYPES",
    "NOTIFY_PAYLOAD_LIMIT",
    "NOTIFY_QUEUE",
    "Statements",
]

#: The statements a worker or a producer runs on every call (names of :class:`Statements` fields). psycopg
#: keeps its parse of a statement's placeholders only for a text of at most 4096 bytes
#: (``psycopg._queries.MAX_CACHED_STATEMENT_LENGTH``) and parses a longer one again on every call: these stay
#: under that for any schema name (tests check it). The settlement with chain follow-ups (``settle``) is over
#: it, as are the operator actions.
HOT_STATEMENTS = (
    "insert_one",
    "insert_one_new",
    "insert_new",
    "claim",
    "claim_limited",
    "extend",
    "settle_plain",
    "next_due",
    "save_progress",
    "cancel_requests",
    "reclaim",
)

_NEW_TASK_ARRAYS = (
    "%s::text[], %s::text[], %s::text[], %b::bytea[], %s::int[], %s::float8[], %s::float8[], "
    "%s::float8[], %s::text[], %s::int8[], %s::text[], %s::float8[], %s::text[]"
)
#: The type of each parameter of ``insert_one`` and ``insert_one_new`` (PostgreSQL type OIDs: text 25,
#: bytea 17, int4 23, float8 701, int8 20), as their casts say: the single enqueue sends them in binary
#: through libpq (see ``_direct``). The last two are the wake-up's channel and payload.
INSERT_ONE_TYPES = (25, 25, 25, 17, 23, 701, 701, 701, 25, 20, 25, 701, 25, 25, 25)
_NEW_TASK_COLUMNS = (
    "id, name, queue, payload, max_retries, timeout, enqueued_at, run_at, meta, priority, concurrency_key, "
    "expires_at, group_id"
)
_INSERT_COLUMNS = (
    "id, name, queue, payload, state, attempts, max_retries, timeout, enqueued_at, run_at, meta, priority, "
    "concurrency_key, expires_at, group_id"
)
_ONE_TASK_VALUES = (
    "VALUES (%s::text, %s::text, %s::text, %b::bytea, 'pending', 0, %s::int, %s::float8, %s::float8, "
    "%s::float8, %s::text, %s::int8, %s::text, %s::float8, %s::text)"
)
#: The columns of the binary COPY of new tasks, in the order of their values (``attempts`` takes its default
#: 0): ``_NEW_TASK_COLUMNS``, then the state (a row is a new task's row and one more value); ``COPY_TYPES``
#: their types.
COPY_COLUMNS = _NEW_TASK_COLUMNS + ", state"
COPY_TYPES = (
    "text",
    "text",
    "text",
    "bytea",
    "int4",
    "float8",
    "float8",
    "float8",
    "text",
    "int8",
    "text",
    "float8",
    "text",
    "text",
)
_INSERT_HEAD = (
    "INSERT INTO {tasks} AS t (" + _INSERT_COLUMNS + ") SELECT n.id, n.name, "
    "n.queue, n.payload, 'pending', 0, n.max_retries, n.timeout, n.enqueued_at, n.run_at, n.meta, "
    "n.priority, n.concurrency_key, n.expires_at, n.group_id "
)
#: A queue name this long (in bytes, UTF-8) or longer is no NOTIFY payload (see ``NOTIFY_QUEUE``).
NOTIFY_PAYLOAD_LIMIT = 7900
#: Notify the channel (a parameter) that ``queue`` got work. NOTIFY payloads are limited to 8000 bytes, so
#: an absurdly long queue name wakes every waiter instead ("*") rather than failing the statement.
NOTIFY_QUEUE = (
    f"pg_notify(%s, CASE WHEN octet_length(queue) < {NOTIFY_PAYLOAD_LIMIT} THEN queue ELSE '*' END)"
)
#: The single enqueue's wake-up: the channel and its payload are parameters, ``NOTIFY_QUEUE``'s rule applied
#: by the caller (``_ops.wake_payload``).
_WAKE = "pg_notify(%s::text, %s::text)"
# A claim's new attempts: one more, unless the stored value is damaged (negative, or so large that one more
# overflows the integer column and fails the whole batch); that one is left as it is for the reader to name.
_COUNTED_UP = "CASE WHEN t.attempts >= 0 AND t.attempts < 2147483647 THEN t.attempts + 1 ELSE t.attempts END"
_RETURNED = ", ".join(f"t.{column.strip()}" for column in TASK_COLUMNS.split(","))


def _held(alias: str) -> str:
    """The rows of ``{tasks} AS t`` whose lease is held per the ``(id, token)`` rows of ``alias``; the ids
    are passed once more as an array parameter. The state test sits inside a CASE on purpose: written
    plainly, it lets the planner scan the partial index over active tasks, which between two vacuums holds
    a dead entry for every task ever claimed; this way it probes the primary key for each id."""
    return (
        f"t.id = ANY(%s::text[]) AND t.id = {alias}.id "
        f"AND CASE WHEN t.state = 'active' THEN t.token = {alias}.token ELSE false END"
    )


def _still(state: str) -> str:
    """The recheck that a row picked (and locked) above is still in ``state``, as a CASE for the reason
    given in :func:`_held`: written plainly, the planner may scan the whole partial index of that state to
    intersect it with the primary key probe. It does so when the table's statistics are stale (a large
    backlog written since the last ANALYZE), and a claim then reads every pending index entry: 4 ms
    instead of 0.3 ms with 100 000 delayed tasks (see docs/backends.md)."""
    return f"CASE WHEN t.state = '{state}' THEN true ELSE false END"


# -- the claims ---------------------------------------------------------------------------------------------

# The (queue, priority) groups of pending tasks in the given queues, paused queues left out, by a loose index
# scan of the pending index (see the function in _functions): for the next due time of wait_for_work.
_PRIORITY_GROUPS = "{priority_groups}(%(queues)s::text[]) AS g"

# The claim without limits (see _functions). Params: queues (priority order), now, limit, lease_until, held
# (names never to take).
_CLAIM = (
    f"SELECT t.seq, t.token, {_RETURNED} FROM {{claim_function}}(%(queues)s::text[], %(now)s::float8, "
    "%(limit)s::int, %(lease_until)s::float8, %(held)s::text[]) AS t"
)

# The claim with limits (see _functions). Params: queues, now, limit, lease_until, space (the text whose hash
# is the first key of the advisory locks), and one array entry per limited name, names sorted: names, rate,
# per, max_running, per_key.
_CLAIM_LIMITED = (
    f"SELECT t.seq, t.token, {_RETURNED} FROM {{claim_limited_function}}(%(queues)s::text[], "
    "%(now)s::float8, %(limit)s::int, %(lease_until)s::float8, %(space)s::text, %(names)s::text[], "
    "%(rate)s::float8[], %(per)s::float8[], %(max_running)s::int8[], %(per_key)s::int8[]) AS t"
)

# Records no claim or reclaim selects because a field they are selected by holds no usable time: an active
# task whose lease_until is NULL, NaN or infinite, a pending task whose run_at is NaN or infinite (found group
# by group, (queue, priority), with a loose scan of the pending index). NaN sorts above Infinity. The
# candidates are locked and tested again (SKIP LOCKED: concurrent reclaimers never take the same); the
# statement returns each one's values from before it was leased, so the reader names the damaged field.
_DAMAGED_WHERE = (
    "(t.state = 'active' AND (t.lease_until IS NULL OR t.lease_until >= 'Infinity')) "
    "OR (t.state = 'pending' AND t.run_at >= 'Infinity')"
)
_DAMAGED = (
    "WITH RECURSIVE groups(queue, priority) AS ("
    "(SELECT queue, priority FROM {tasks} WHERE state = 'pending' ORDER BY queue, priority DESC LIMIT 1) "
    "UNION ALL SELECT x.queue, x.priority FROM groups AS g CROSS JOIN LATERAL ("
    "(SELECT p.queue, p.priority FROM {tasks} AS p WHERE p.state = 'pending' AND p.queue = g.queue "
    "AND p.priority < g.priority ORDER BY p.priority DESC LIMIT 1) "
    "UNION ALL (SELECT p.queue, p.priority FROM {tasks} AS p WHERE p.state = 'pending' AND p.queue > g.queue "
    "ORDER BY p.queue, p.priority DESC LIMIT 1) LIMIT 1) AS x), "
    "found AS (SELECT a.id FROM {tasks} AS a WHERE a.state = 'active' AND a.lease_until IS NULL "
    "UNION ALL SELECT a.id FROM {tasks} AS a WHERE a.state = 'active' AND a.lease_until >= 'Infinity' "
    "UNION ALL SELECT p.id FROM groups AS g CROSS JOIN LATERAL (SELECT p.id FROM {tasks} AS p "
    "WHERE p.state = 'pending' AND p.queue = g.queue AND p.priority = g.priority "
    "AND p.run_at >= 'Infinity') AS p LIMIT %s), "
    "pick AS MATERIALIZED (SELECT t.seq, " + _RETURNED + " FROM {tasks} AS t "
    "WHERE t.id IN (SELECT id FROM found) AND (" + _DAMAGED_WHERE + ") FOR UPDATE SKIP LOCKED), "
    "leased AS (UPDATE {tasks} AS t SET state = 'active', lease_until = %s, "
    "token = gen_random_uuid()::text FROM pick WHERE t.id = pick.id RETURNING t.id, t.token) "
    "SELECT leased.token, pick.* FROM pick JOIN leased ON leased.id = pick.id ORDER BY pick.seq"
)

# The settlement. A record with a follow-up run (a debounce while it was active) becomes that run's pending
# period whatever the verdict: the follow-up's fields, attempts 0, run_at the later of the follow-up's and the
# retry's. The follow-up is read from the row the UPDATE locks, so a debounce committed meanwhile is seen.
_HAS_FOLLOW_UP = "(t.follow_up).payload IS NOT NULL"


def _from_follow_up(column: str) -> str:
    if column == "payload":  # the follow-up's marker: the same as the CASE below, shorter
        return "payload = coalesce((t.follow_up).payload, t.payload)"
    return f"{column} = CASE WHEN {_HAS_FOLLOW_UP} THEN (t.follow_up).{column} ELSE t.{column} END"


# The group bookkeeping of the rows of `source` (a query over rows with `group_id`, `id`, a final `state`, a
# `result` and `at`), by one call of the group function (see _functions), or none when no row is a member.
# One row (its count of `then` tasks stored) when it was called.
def _group_ended(source: str) -> str:
    return (
        "SELECT {group_ended}(array_agg(group_id), array_agg(id), array_agg(state), array_agg(result), "
        f"array_agg(at)) FROM ({source}) AS m HAVING count(*) > 0"
    )


_SETTLE_HEAD = (
    "WITH s AS (SELECT * FROM unnest(%s::text[], %s::text[], %s::text[], %s::float8[], "
    "%s::float8[], %s::text[], %b::bytea[], %s::int[]) "
    "AS s(id, token, state, at, run_at, error, result, refund)), "
    "done AS (UPDATE {tasks} AS t SET "
    "state = CASE WHEN " + _HAS_FOLLOW_UP + " THEN 'pending' ELSE s.state END, "
    "run_at = CASE WHEN " + _HAS_FOLLOW_UP + " AND s.state = 'pending' "
    "THEN greatest((t.follow_up).run_at, s.run_at) "
    "WHEN " + _HAS_FOLLOW_UP + " THEN (t.follow_up).run_at "
    "WHEN s.state = 'pending' THEN s.run_at ELSE t.run_at END, "
    "attempts = CASE WHEN " + _HAS_FOLLOW_UP + " THEN 0 "
    "WHEN s.state = 'pending' AND t.attempts > 0 THEN t.attempts - s.refund "
    "WHEN s.state = 'pending' THEN 0 "
    "ELSE t.attempts END, "
    "started_at = CASE WHEN " + _HAS_FOLLOW_UP + " THEN NULL ELSE t.started_at END, "
    "finished_at = CASE WHEN s.state = 'pending' OR " + _HAS_FOLLOW_UP + " THEN NULL ELSE s.at END, "
    "result = CASE WHEN " + _HAS_FOLLOW_UP + " THEN NULL WHEN s.state = 'succeeded' THEN s.result "
    "WHEN s.state = 'pending' THEN t.result ELSE coalesce(s.result, t.result) END, "
    "cancel_requested = CASE WHEN "
    + _HAS_FOLLOW_UP
    + " THEN false ELSE t.cancel_requested END, "
    + ", ".join(
        _from_follow_up(column)
        for column in (
            "name",
            "queue",
            "payload",
            "max_retries",
            "timeout",
            "enqueued_at",
            "meta",
            "priority",
            "concurrency_key",
            "expires_at",
        )
    )
    + ", last_error = coalesce(s.error, t.last_error), lease_until = NULL, token = NULL, follow_up = NULL "
    "FROM s WHERE " + _held("s") + " "
    "RETURNING t.id, t.queue, t.state, t.name, t.group_id, s.state AS verdict, s.result AS verdict_result, "
    "s.at AS verdict_at), "
)


def _settle(follow_ups: bool) -> str:
    """The settlement statement; with ``follow_ups``, it stores the chain follow-ups too (thirteen arrays of
    their fields and one of their parents' ids as parameters after the ids again). Without, those fourteen
    parameters and the ``follow`` step are left out: a batch without follow-ups (the common case) does not
    send fourteen empty arrays, each of which costs the client a list adaptation."""
    follow = (
        "follow AS (" + _INSERT_HEAD + f"FROM unnest({_NEW_TASK_ARRAYS}, %s::text[]) "
        f"WITH ORDINALITY AS n({_NEW_TASK_COLUMNS}, parent, ord) "
        "WHERE n.parent IN (SELECT id FROM done) ORDER BY n.ord "
        "ON CONFLICT (id) DO NOTHING RETURNING t.queue), "
        if follow_ups
        else ""
    )
    woken = "UNION ALL SELECT NULL, " + NOTIFY_QUEUE + " FROM follow " if follow_ups else ""
    return (
        _SETTLE_HEAD
        + follow
        + "grouped AS MATERIALIZED ("
        + _group_ended(
            "SELECT group_id, id, verdict AS state, verdict_result AS result, verdict_at AS at FROM done "
            "WHERE group_id IS NOT NULL AND verdict <> 'pending'"
        )
        + "), "
        # The "settled" notices, in id order. The channel is a parameter (twice), and the texts here are
        # short, so that the statement stays under psycopg's limit (see HOT_STATEMENTS) for any schema name.
        # (The schema's notify_ids function sends the same notices, but costs the server 0.3-0.5 ms more
        # per call than the query written out.)
        "noticed AS MATERIALIZED (" + notice_query("'s'", "SELECT id, id AS ord FROM done", "%s") + ") "
        "SELECT id, CASE WHEN state = 'pending' OR name = ANY(%s::text[]) THEN "
        + NOTIFY_QUEUE
        + " END FROM done "
        + woken
        + "UNION ALL SELECT NULL, NULL FROM grouped "
        "UNION ALL SELECT NULL, NULL FROM noticed"
    )


# The cancel: pending tasks become cancelled (a member's group ends cancelled in the same statement), active
# ones get their cancel request (their debounce follow-up dropped); each kind gets its notices. The state
# tests sit in CASEs for the reason given in _held. Params: now, ids. Rows: (id, new state) per task changed,
# then rows with a NULL id.
_CANCEL = (
    "WITH hit AS (UPDATE {tasks} AS t SET "
    "state = CASE WHEN t.state = 'pending' THEN 'cancelled' ELSE t.state END, "
    "finished_at = CASE WHEN t.state = 'pending' THEN %(now)s::float8 ELSE t.finished_at END, "
    "lease_until = CASE WHEN t.state = 'pending' THEN NULL ELSE t.lease_until END, "
    "token = CASE WHEN t.state = 'pending' THEN NULL ELSE t.token END, "
    "cancel_requested = CASE WHEN t.state = 'active' THEN true ELSE t.cancel_requested END, "
    "follow_up = CASE WHEN t.state = 'active' THEN NULL ELSE t.follow_up END "
    "WHERE t.id = ANY(%(ids)s::text[]) "
    "AND CASE WHEN t.state IN ('pending', 'active') THEN true ELSE false END "
    "RETURNING t.id, t.state, t.group_id), "
    "grouped AS MATERIALIZED ("
    + _group_ended(
        "SELECT h.group_id, h.id, h.state, NULL::bytea AS result, %(now)s::float8 AS at FROM hit AS h "
        "WHERE h.group_id IS NOT NULL AND h.state = 'cancelled'"
    )
    + "), "
    "ended AS MATERIALIZED ("
    + notice_query(
        "'s'",
        "SELECT h.id, array_position(%(ids)s::text[], h.id) AS ord FROM hit AS h WHERE h.state = 'cancelled'",
    )
    + "), "
    "asked AS MATERIALIZED ("
    + notice_query(
        "'c'",
        "SELECT h.id, array_position(%(ids)s::text[], h.id) AS ord FROM hit AS h WHERE h.state = 'active'",
    )
    + ") "
    "SELECT id, state FROM hit "
    "UNION ALL SELECT NULL, NULL FROM grouped "
    "UNION ALL SELECT NULL, NULL FROM ended "
    "UNION ALL SELECT NULL, NULL FROM asked"
)


def _render(template: str, schema: str) -> bytes:
    query = sql.SQL(template).format(
        tasks=sql.Identifier(schema, TASKS_TABLE),
        buckets=sql.Identifier(schema, BUCKETS_TABLE),
        windows=sql.Identifier(schema, WINDOWS_TABLE),
        paused=sql.Identifier(schema, PAUSED_TABLE),
        follow_up_type=sql.Identifier(schema, FOLLOW_UP_TYPE),
        priority_groups=sql.Identifier(schema, PRIORITY_GROUPS_FUNCTION),
        name_groups=sql.Identifier(schema, NAME_GROUPS_FUNCTION),
        claim_function=sql.Identifier(schema, CLAIM_FUNCTION),
        claim_limited_function=sql.Identifier(schema, CLAIM_LIMITED_FUNCTION),
        groups=sql.Identifier(schema, GROUPS_TABLE),
        members=sql.Identifier(schema, MEMBERS_TABLE),
        group_ended=sql.Identifier(schema, GROUP_ENDED_FUNCTION),
        notify_ids=sql.Identifier(schema, NOTIFY_IDS_FUNCTION),
        channel=sql.Literal(channel_for(schema)),
        notice_channel=sql.Literal(notice_channel_for(schema)),
    )
    return query.as_bytes(None)


@dataclass(frozen=True, slots=True)
class Statements:
    """The fixed statements for one schema (bytes, ready for ``cursor.execute``); ``channel`` is the
    NOTIFY channel name of new work, ``notice_channel`` that of the notices; ``tasks`` and ``groups`` the
    qualified tables for statements composed per call; ``lock_space`` the text whose hash is the first key of
    the advisory locks of the claim with limits."""

    schema: str
    channel: str
    notice_channel: str
    lock_space: str
    tasks: sql.Identifier
    groups: sql.Identifier
    members: sql.Identifier
    insert_new: bytes
    insert_one: bytes
    insert_one_new: bytes
    copy_new: bytes
    notify_queues: bytes
    insert_checked: bytes
    lock_existing: bytes
    delete_ids: bytes
    replace_pending: bytes
    set_follow_up: bytes
    lock_windows: bytes
    write_windows: bytes
    claim: bytes
    claim_limited: bytes
    reclaim: bytes
    damaged: bytes
    extend: bytes
    settle: bytes
    settle_plain: bytes
    next_due: bytes
    get: bytes
    cancel: bytes
    pause: bytes
    resume: bytes
    paused: bytes
    flow_state: bytes
    cancel_requests: bytes
    save_progress: bytes
    insert_group: bytes
    get_group: bytes

    @classmethod
    def for_schema(cls, schema: str) -> Statements:
        """Render every statement for ``schema`` (notifying on its channels, see ``_schema``)."""

        def render(template: str) -> bytes:
            return _render(template, schema)

        unnest_new = f"FROM unnest({_NEW_TASK_ARRAYS}) WITH ORDINALITY AS n({_NEW_TASK_COLUMNS}, ord) "
        return cls(
            schema=schema,
            channel=channel_for(schema),
            notice_channel=notice_channel_for(schema),
            lock_space=f"lifecycle.flow:{schema}",
            tasks=sql.Identifier(schema, TASKS_TABLE),
            groups=sql.Identifier(schema, GROUPS_TABLE),
            members=sql.Identifier(schema, MEMBERS_TABLE),
            # Params: the twelve arrays, then the channel. Rows whose id exists are skipped; every stored row
            # notifies its queue (PostgreSQL folds repeated notifications of one transaction into one).
            insert_new=render(
                "WITH stored AS ("
                + _INSERT_HEAD
                + unnest_new
                + "ORDER BY n.ord ON CONFLICT (id) DO NOTHING RETURNING t.id, t.queue) "
                "SELECT id, " + NOTIFY_QUEUE + " FROM stored"
            ),
            # Params: the thirteen fields of one task (scalars), then the channel and the payload of its
            # wake-up (the queue, or "*" for a name too long for a payload: NOTIFY_QUEUE's rule, applied by
            # the caller, see _ops.wake_payload). insert_checked for one task whose id the engine generated (a
            # random UUID: no record has it): scalars are adapted by psycopg's C dumpers, where each array
            # parameter costs a Python-level list adaptation (13 of them were a third of the client's CPU per
            # single enqueue). Without ON CONFLICT, the server neither probes the primary key before the
            # insert nor confirms a speculative insertion after it: 17 000 of its 300 000 instructions per
            # call, and 48 of its 670 bytes of WAL. The wake-up is the RETURNING list (one row: one
            # notification) rather than a query over a CTE of the insert: 7 000 instructions fewer; and it is
            # all of that list, with a payload the server does not compute: RETURNING t.id and the CASE over
            # the stored queue cost the server 6 000 more of its 221 000 instructions per call (callgrind,
            # PostgreSQL 15). The caller knows the id; a row says the task was stored.
            insert_one=render(
                "INSERT INTO {tasks} AS t ("
                + _INSERT_COLUMNS
                + ") "
                + _ONE_TASK_VALUES
                + " RETURNING "
                + _WAKE
            ),
            # The same for a task whose id the caller chose: an id that exists is expected (that is what the
            # id is for), so it stores nothing and returns no row (so sends no notification), rather than
            # failing with an error the server would log and a second round trip would sort out. The wake-up
            # in the RETURNING list of the INSERT itself, rather than in a query over a CTE of it: 14 000
            # of the server's 249 000 instructions per call fewer.
            insert_one_new=render(
                "INSERT INTO {tasks} AS t ("
                + _INSERT_COLUMNS
                + ") "
                + _ONE_TASK_VALUES
                + " ON CONFLICT (id) DO NOTHING RETURNING "
                + _WAKE
            ),
            # A batch of new tasks by binary COPY, rows in batch order (so seq follows it): COPY_COLUMNS.
            # No ON CONFLICT: an id that exists fails it (see _ops.enqueue).
            copy_new=render("COPY {tasks} (" + COPY_COLUMNS + ") FROM STDIN (FORMAT BINARY)"),
            # Params: the channel, the queues to wake.
            notify_queues=render("SELECT " + NOTIFY_QUEUE + " FROM unnest(%s::text[]) AS q(queue)"),
            insert_checked=render(
                "WITH stored AS (" + _INSERT_HEAD + unnest_new + "ORDER BY n.ord RETURNING t.id, t.queue) "
                "SELECT id, " + NOTIFY_QUEUE + " FROM stored"
            ),
            lock_existing=render("SELECT id, state FROM {tasks} WHERE id = ANY(%s::text[]) FOR UPDATE"),
            delete_ids=render("DELETE FROM {tasks} WHERE id = ANY(%s::text[])"),
            # Params: the twelve arrays, then the channel. A debounce of pending records (locked by the
            # caller): every field but the id, the state, attempts and enqueued_at.
            replace_pending=render(
                "WITH moved AS (UPDATE {tasks} AS t SET name = n.name, queue = n.queue, payload = n.payload, "
                "max_retries = n.max_retries, timeout = n.timeout, run_at = n.run_at, meta = n.meta, "
                "priority = n.priority, concurrency_key = n.concurrency_key, expires_at = n.expires_at "
                + unnest_new
                + "WHERE t.id = n.id AND t.state = 'pending' RETURNING t.id, t.queue) "
                "SELECT id, " + NOTIFY_QUEUE + " FROM moved"
            ),
            # Params: the twelve arrays. A debounce of active records (locked by the caller): their one
            # follow-up run, which their settlement turns into their next pending period.
            set_follow_up=render(
                "UPDATE {tasks} AS t SET follow_up = ROW(n.name, n.queue, n.payload, n.max_retries, "
                "n.timeout, n.enqueued_at, n.run_at, n.meta, n.priority, n.concurrency_key, "
                "n.expires_at)::{follow_up_type} "
                + unnest_new
                + "WHERE t.id = n.id AND t.state = 'active' RETURNING t.id"
            ),
            lock_windows=render("SELECT key, until FROM {windows} WHERE key = ANY(%s::text[]) FOR UPDATE"),
            # Params: keys and ends of the windows that exist (locked by the caller), of the new ones, then
            # the time before which ended windows are dropped and every key written (kept). A new key
            # inserted by a concurrent enqueue meanwhile fails the statement (unique violation): the caller
            # retries.
            write_windows=render(
                "WITH moved AS (UPDATE {windows} AS w SET until = n.until "
                "FROM unnest(%s::text[], %s::float8[]) AS n(key, until) WHERE w.key = n.key), "
                "opened AS (INSERT INTO {windows} (key, until) "
                "SELECT * FROM unnest(%s::text[], %s::float8[])) "
                "DELETE FROM {windows} WHERE key IN (SELECT e.key FROM {windows} AS e WHERE e.until <= %s "
                "ORDER BY e.until LIMIT 100 FOR UPDATE SKIP LOCKED) AND key <> ALL(%s::text[])"
            ),
            claim=render(_CLAIM),
            claim_limited=render(_CLAIM_LIMITED),
            # Params: now, limit, lease_until.
            reclaim=render(
                "WITH pick AS MATERIALIZED (SELECT a.id FROM {tasks} AS a "
                "WHERE a.state = 'active' AND a.lease_until < %s "
                "ORDER BY a.lease_until, a.seq LIMIT %s FOR UPDATE SKIP LOCKED) "
                "UPDATE {tasks} AS t SET lease_until = %s, token = gen_random_uuid()::text "
                "WHERE t.id = ANY(ARRAY(SELECT id FROM pick)) AND " + _still("active") + " "
                f"RETURNING t.seq, t.token, {_RETURNED}"
            ),
            # Params: limit, lease_until.
            damaged=render(_DAMAGED),
            # Params: lease_until, ids, tokens, ids (the last lets the planner probe the primary key).
            extend=render(
                "UPDATE {tasks} AS t SET lease_until = %s "
                "FROM unnest(%s::text[], %s::text[]) AS l(id, token) "
                "WHERE " + _held("l") + " "
                "RETURNING t.id"
            ),
            # Params: the eight settlement arrays, the ids again (for a primary key probe), the thirteen
            # follow-up arrays plus their parents' ids, the notice channel twice, the names whose settled
            # tasks free a slot some worker may wait for (max_running, max_running_per_key), then the channel
            # twice. One statement applies
            # every verdict whose lease is held, stores the chain follow-ups of exactly those, does the group
            # bookkeeping of the members among them (see _functions), notifies the queues that got claimable
            # work, and sends the "settled" notices.
            settle=render(_settle(follow_ups=True)),
            # Params: as settle's, without the fourteen follow-up arrays and the second channel: a batch that
            # stores no follow-up.
            settle_plain=render(_settle(follow_ups=False)),
            # Params: queues. The earliest pending (run_at, seq) of the queues that are not paused, one index
            # probe per (queue, priority) group.
            next_due=render(
                "SELECT m.run_at, m.seq FROM " + _PRIORITY_GROUPS + " CROSS JOIN LATERAL "
                "(SELECT p.run_at, p.seq FROM {tasks} AS p WHERE p.state = 'pending' AND p.queue = g.queue "
                "AND p.priority = g.priority ORDER BY p.run_at, p.seq LIMIT 1) AS m "
                "ORDER BY m.run_at, m.seq LIMIT 1"
            ),
            get=render(f"SELECT {TASK_COLUMNS} FROM {{tasks}} WHERE id = %s"),
            cancel=render(_CANCEL),
            pause=render("INSERT INTO {paused} (queue) VALUES (%s) ON CONFLICT (queue) DO NOTHING"),
            # Params: queue, channel. Wakes the workers of the queue.
            resume=render(
                "WITH gone AS (DELETE FROM {paused} WHERE queue = %s RETURNING queue) "
                "SELECT " + NOTIFY_QUEUE + " FROM gone"
            ),
            paused=render("SELECT queue FROM {paused}"),
            # Params: name, name, key, name, key, name.
            flow_state=render(
                "SELECT (SELECT count(*) FROM {tasks} WHERE state = 'active' AND name = %s), "
                "CASE WHEN %s::text IS NULL THEN 0 ELSE (SELECT count(*) FROM {tasks} "
                "WHERE state = 'active' AND name = %s AND concurrency_key = %s) END, "
                "b.tokens, b.at, b.refused FROM (SELECT) AS one LEFT JOIN {buckets} AS b ON b.name = %s"
            ),
            # Params: ids. The active tasks among them with a cancel request (a primary key probe each).
            cancel_requests=render(
                "SELECT t.id FROM {tasks} AS t WHERE t.id = ANY(%s::text[]) "
                "AND CASE WHEN t.state = 'active' THEN t.cancel_requested ELSE false END"
            ),
            # Params: ids, tokens, done, total, message (one entry per update, the last of an id wins), then
            # the ids again (for a primary key probe). Returns the ids updated.
            save_progress=render(
                "UPDATE {tasks} AS t SET progress_done = u.done, progress_total = u.total, "
                "progress_message = u.message FROM (SELECT DISTINCT ON (x.id) x.* FROM unnest(%s::text[], "
                "%s::text[], %s::float8[], %s::float8[], %s::text[]) WITH ORDINALITY "
                "AS x(id, token, done, total, message, ord) ORDER BY x.id, x.ord DESC) AS u "
                "WHERE " + _held("u") + " RETURNING t.id"
            ),
            # Params: the group's id, created_at, meta, its member ids (in call order), then its then task's
            # id and the eleven fields of its follow-up type (all NULL without a then). Stores the group and
            # its member rows unless the id exists; returns the id when stored.
            insert_group=render(
                "WITH g AS (INSERT INTO {groups} (id, created_at, meta, remaining, then_task_id, then_task) "
                "SELECT %s, %s, %s, cardinality(%s::text[]), %s::text, "
                "CASE WHEN %s::text IS NULL THEN NULL ELSE ROW(%s::text, %s::text, %b::bytea, %s::int, "
                "%s::float8, %s::float8, %s::float8, %s::text, %s::int8, %s::text, %s::float8)"
                "::{follow_up_type} END "
                "ON CONFLICT (id) DO NOTHING RETURNING id), "
                "m AS (INSERT INTO {members} (group_id, task_id, position) "
                "SELECT g.id, x.id, x.ord FROM g "
                "CROSS JOIN unnest(%s::text[]) WITH ORDINALITY AS x(id, ord)) "
                "SELECT id FROM g"
            ),
            # Params: group id. One row per member in call order (none for a group without members): the
            # group's fields, then the member's id, result, and state (its record's, or the ending the group
            # recorded once the record is gone or belongs to another task). The record's state is read by a
            # correlated subquery, a primary key probe per member whatever the statistics (as a join, the
            # planner may scan the whole task table for a large group).
            get_group=render(
                "SELECT g.id, g.outcome, g.created_at, g.finished_at, g.then_id, g.meta, m.task_id, "
                "m.result, coalesce((SELECT t.state FROM {tasks} AS t "
                "WHERE t.id = m.task_id AND t.group_id = m.group_id), m.state) FROM {groups} AS g "
                "LEFT JOIN {members} AS m ON m.group_id = g.id "
                "WHERE g.id = %s ORDER BY m.position"
            ),
        )
