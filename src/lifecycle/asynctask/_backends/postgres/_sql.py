"""The SQL statements of :class:`~lifecycle.asynctask.postgres.PostgresBackend`, rendered once per schema.

Every statement names its tables fully qualified (``"schema"."lifecycle_tasks"``, quoted by
:mod:`psycopg.sql`), so it works on any connection whatever its ``search_path``, including a caller's own
connection in :meth:`PostgresBackend.enqueue_many_in`. Batches travel as arrays and are expanded with
``unnest``: one statement per batch, whatever its size. The text of each statement never changes, so psycopg
prepares it on the server after a few executions.
"""

from __future__ import annotations

from dataclasses import dataclass

from psycopg import sql

from ._schema import TASK_COLUMNS, TASKS_TABLE

__all__ = ["NOTIFY_QUEUE", "Statements"]

_NEW_TASK_ARRAYS = (
    "%s::text[], %s::text[], %s::text[], %b::bytea[], %s::int[], %s::float8[], %s::float8[], "
    "%s::float8[], %s::text[]"
)
_NEW_TASK_COLUMNS = "id, name, queue, payload, max_retries, timeout, enqueued_at, run_at, meta"
_INSERT_HEAD = (
    "INSERT INTO {tasks} AS t (id, name, queue, payload, state, attempts, max_retries, timeout, "
    "enqueued_at, run_at, meta) SELECT n.id, n.name, n.queue, n.payload, 'pending', 0, n.max_retries, "
    "n.timeout, n.enqueued_at, n.run_at, n.meta "
)
#: Notify the channel (a parameter) that ``queue`` got work. NOTIFY payloads are limited to 8000 bytes, so
#: an absurdly long queue name wakes every waiter instead ("*") rather than failing the statement.
NOTIFY_QUEUE = "pg_notify(%s, CASE WHEN octet_length(queue) < 7900 THEN queue ELSE '*' END)"
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


def _render(template: str, schema: str) -> bytes:
    query = sql.SQL(template).format(tasks=sql.Identifier(schema, TASKS_TABLE))
    return query.as_bytes(None)


@dataclass(frozen=True, slots=True)
class Statements:
    """The fixed statements for one schema (bytes, ready for ``cursor.execute``); ``channel`` is the
    NOTIFY channel name; ``tasks`` the qualified table for statements composed per call."""

    schema: str
    channel: str
    tasks: sql.Identifier
    insert_new: bytes
    insert_checked: bytes
    lock_existing: bytes
    delete_ids: bytes
    claim: bytes
    reclaim: bytes
    extend: bytes
    settle: bytes
    next_due: bytes
    get: bytes
    cancel: bytes

    @classmethod
    def for_schema(cls, schema: str, channel: str) -> Statements:
        """Render every statement for ``schema``, notifying on ``channel``."""

        def render(template: str) -> bytes:
            return _render(template, schema)

        unnest_new = f"FROM unnest({_NEW_TASK_ARRAYS}) WITH ORDINALITY AS n({_NEW_TASK_COLUMNS}, ord) "
        return cls(
            schema=schema,
            channel=channel,
            tasks=sql.Identifier(schema, TASKS_TABLE),
            # Params: the nine arrays, then the channel. Rows whose id exists are skipped; every stored row
            # notifies its queue (PostgreSQL folds repeated notifications of one transaction into one).
            insert_new=render(
                "WITH stored AS ("
                + _INSERT_HEAD
                + unnest_new
                + "ORDER BY n.ord ON CONFLICT (id) DO NOTHING RETURNING t.id, t.queue) "
                "SELECT id, " + NOTIFY_QUEUE + " FROM stored"
            ),
            insert_checked=render(
                "WITH stored AS (" + _INSERT_HEAD + unnest_new + "ORDER BY n.ord RETURNING t.id, t.queue) "
                "SELECT id, " + NOTIFY_QUEUE + " FROM stored"
            ),
            lock_existing=render("SELECT id, state FROM {tasks} WHERE id = ANY(%s::text[]) FOR UPDATE"),
            delete_ids=render("DELETE FROM {tasks} WHERE id = ANY(%s::text[])"),
            # Params: queues (priority order), now, limit, limit, now, lease_until. One index range per
            # queue, each locked with SKIP LOCKED so concurrent claimers never wait for each other. The
            # pick is a MATERIALIZED CTE so that its LIMIT applies once (a join could rescan it).
            claim=render(
                "WITH pick AS MATERIALIZED (SELECT c.id "
                "FROM unnest(%s::text[]) WITH ORDINALITY AS q(name, ord) "
                "CROSS JOIN LATERAL (SELECT p.id, p.run_at, p.seq FROM {tasks} AS p "
                "WHERE p.state = 'pending' AND p.queue = q.name AND p.run_at <= %s "
                "ORDER BY p.run_at, p.seq LIMIT %s FOR UPDATE SKIP LOCKED) AS c "
                "ORDER BY q.ord, c.run_at, c.seq LIMIT %s) "
                "UPDATE {tasks} AS t SET state = 'active', attempts = " + _COUNTED_UP + ", started_at = %s, "
                "lease_until = %s, token = gen_random_uuid()::text "
                "WHERE t.id = ANY(ARRAY(SELECT id FROM pick)) AND " + _still("pending") + " "
                f"RETURNING t.seq, t.token, {_RETURNED}"
            ),
            # Params: now, limit, lease_until.
            reclaim=render(
                "WITH pick AS MATERIALIZED (SELECT a.id FROM {tasks} AS a "
                "WHERE a.state = 'active' AND a.lease_until < %s "
                "ORDER BY a.lease_until, a.seq LIMIT %s FOR UPDATE SKIP LOCKED) "
                "UPDATE {tasks} AS t SET lease_until = %s, token = gen_random_uuid()::text "
                "WHERE t.id = ANY(ARRAY(SELECT id FROM pick)) AND " + _still("active") + " "
                f"RETURNING t.seq, t.token, {_RETURNED}"
            ),
            # Params: lease_until, ids, tokens, ids (the last lets the planner probe the primary key).
            extend=render(
                "UPDATE {tasks} AS t SET lease_until = %s "
                "FROM unnest(%s::text[], %s::text[]) AS l(id, token) "
                "WHERE " + _held("l") + " "
                "RETURNING t.id"
            ),
            # Params: the eight settlement arrays, the ids again (for a primary key probe), the nine
            # follow-up arrays plus their parents' ids, then the channel twice. One statement applies every
            # verdict whose lease is held, stores the follow-ups of exactly those, and notifies the queues
            # that got claimable work.
            settle=render(
                "WITH s AS (SELECT * FROM unnest(%s::text[], %s::text[], %s::text[], %s::float8[], "
                "%s::float8[], %s::text[], %b::bytea[], %s::int[]) "
                "AS s(id, token, state, at, run_at, error, result, refund)), "
                "done AS (UPDATE {tasks} AS t SET state = s.state, "
                "run_at = CASE WHEN s.state = 'pending' THEN s.run_at ELSE t.run_at END, "
                "attempts = CASE WHEN s.state = 'pending' AND t.attempts > 0 THEN t.attempts - s.refund "
                "WHEN s.state = 'pending' THEN 0 "
                "ELSE t.attempts END, "
                "finished_at = CASE WHEN s.state = 'pending' THEN NULL ELSE s.at END, "
                "result = CASE WHEN s.state = 'succeeded' THEN s.result "
                "WHEN s.state = 'pending' THEN t.result ELSE coalesce(s.result, t.result) END, "
                "last_error = coalesce(s.error, t.last_error), lease_until = NULL, token = NULL "
                "FROM s WHERE " + _held("s") + " "
                "RETURNING t.id, t.queue, t.state), "
                "follow AS (" + _INSERT_HEAD + f"FROM unnest({_NEW_TASK_ARRAYS}, %s::text[]) "
                f"WITH ORDINALITY AS n({_NEW_TASK_COLUMNS}, parent, ord) "
                "WHERE n.parent IN (SELECT id FROM done) ORDER BY n.ord "
                "ON CONFLICT (id) DO NOTHING RETURNING t.queue) "
                "SELECT id, CASE WHEN state = 'pending' THEN " + NOTIFY_QUEUE + " END FROM done "
                "UNION ALL SELECT NULL, " + NOTIFY_QUEUE + " FROM follow"
            ),
            # Params: queues. The earliest pending (run_at, seq) of each queue, one index probe each.
            next_due=render(
                "SELECT m.run_at, m.seq FROM unnest(%s::text[]) AS q(name) CROSS JOIN LATERAL "
                "(SELECT p.run_at, p.seq FROM {tasks} AS p WHERE p.state = 'pending' AND p.queue = q.name "
                "ORDER BY p.run_at, p.seq LIMIT 1) AS m ORDER BY m.run_at, m.seq LIMIT 1"
            ),
            get=render(f"SELECT {TASK_COLUMNS} FROM {{tasks}} WHERE id = %s"),
            # Params: now, ids.
            cancel=render(
                "UPDATE {tasks} SET state = 'cancelled', finished_at = %s, lease_until = NULL, token = NULL "
                "WHERE state = 'pending' AND id = ANY(%s::text[]) RETURNING id"
            ),
        )
