"""The server-side functions of :class:`~lifecycle.asynctask.postgres.PostgresBackend` as schema version 3
defines them, and the claim without limits that version 5 puts in place of version 3's (``FUNCTIONS_V5``),
created by the schema migration (``_schema``) in the backend's schema. (The functions version 2 created are
kept as they were in ``_functions_v2``: a new schema replays every migration step, and version 3 replaces the
two claims.)

The claims are PL/pgSQL functions, as the Redis backend's are Lua scripts: one call does the whole atomic
step, and PostgreSQL plans the statements inside once per session (a claim written as one large SQL statement
cost more to plan, on every call, than to run). Each claim function sets, for its own statements only:

- ``plan_cache_mode = force_generic_plan``: left to itself, PostgreSQL re-plans a statement on every call
  whenever its statistics make the generic plan look dearer than one made for the call's values (0.4 ms
  per claim);
- ``enable_sort``, ``enable_seqscan`` and ``enable_bitmapscan`` off: a generic plan is made without the
  values, and priced that way it may read a due range whole to sort it, or scan the table for a name's
  first pending task, where an index probe stops at once: 454 instead of 28 buffers for a claim of one task
  from 20 000 due ones, 749 instead of about 200 for a claim stepping over 40 000 held tasks (see
  tests/asynctask/postgres/test_postgres_plans.py). Every statement of these functions is an index probe or
  an ordered index range by design; the settings only price the other plans out (the sorts the claim with
  limits needs for its window functions remain, dear but unavoidable).

Each text is a template for :mod:`psycopg.sql`: ``{tasks}``, ``{paused}``, ``{buckets}``, ``{groups}``,
``{members}``, the function names and the two ``NOTIFY`` channels (``{channel}`` and ``{notice_channel}``, as
literals) are filled in with the schema's (literal braces are doubled).

- ``lifecycle_claim(queues, now, wanted, lease, held)``: the claim without limits.
- ``lifecycle_claim_limited(queues, now, wanted, lease, space, names, rates, pers, max_runnings, per_keys)``:
  the claim with limits: it takes a transaction-scoped advisory lock per limited name that has pending tasks
  (in the order given, sorted by the caller), then counts, refills, picks and leases. In a volatile PL/pgSQL
  function every statement takes a fresh snapshot, so the statements after the locks see every task the
  previous holder of a lock leased (it committed before the lock was released): the counts are exact, across
  every process.
- ``lifecycle_priority_groups(queues)``: the (queue, priority) groups of pending tasks (``wait_for_work``;
  as version 2 created it).
- ``lifecycle_name_groups(queues, skipped)``: the (queue, name, priority) groups (the claim with limits; as
  version 2 created it).
- ``lifecycle_group_ended(group_ids, task_ids, states, results, ats)``: the group bookkeeping of members that
  ended, run by the transaction that ended them (a settlement, a cancel, a claim that found them expired);
  the comment above ``_GROUP_ENDED`` says why a group's ``then`` is stored exactly once.
- ``lifecycle_notify_ids(kind, ids)``: the notices of ``ids`` (see :func:`notice_query`).

Schema version 4 adds ``jit = off`` to the two claims (``ALTER FUNCTION``, see ``_schema``): their generic
plans carry the disabled paths' costs, far above ``jit_above_cost``, so a session with JIT on compiled them
on every call.

A change to a function is a layout change: bump the schema version and replace it in a migration step.
"""

from __future__ import annotations

__all__ = [
    "CLAIM_FUNCTION",
    "CLAIM_LIMITED_FUNCTION",
    "FUNCTIONS_V3",
    "FUNCTIONS_V5",
    "GROUP_ENDED_FUNCTION",
    "NAME_GROUPS_FUNCTION",
    "NOTICE_ID_BYTES",
    "NOTIFY_IDS_FUNCTION",
    "PRIORITY_GROUPS_FUNCTION",
    "notice_query",
]

CLAIM_FUNCTION = "lifecycle_claim"
CLAIM_LIMITED_FUNCTION = "lifecycle_claim_limited"
PRIORITY_GROUPS_FUNCTION = "lifecycle_priority_groups"
NAME_GROUPS_FUNCTION = "lifecycle_name_groups"
GROUP_ENDED_FUNCTION = "lifecycle_group_ended"
NOTIFY_IDS_FUNCTION = "lifecycle_notify_ids"

NOTICE_ID_BYTES = 3900
"""The ids of one notice payload take up to this many bytes (as JSON, with separators), plus at most one
more such id: with the kind letter and the brackets a payload stays under PostgreSQL's 8000-byte limit. An id
longer than this as JSON is never in a notice: whoever waits for it finds it by polling."""

_ONE_PAYLOAD = 2 * NOTICE_ID_BYTES
"""Ids that take up to this many bytes in all (as JSON, with separators) go in one payload."""


def notice_query(kind: str, source: str, channel: str = "{notice_channel}") -> str:
    """A query that sends the notices of kind ``kind`` (SQL text: ``'c'`` cancel, ``'s'`` settled) for the
    ids of ``source`` (a query with columns ``id`` and ``ord``, the order to send them in): its payload is the
    kind letter then a JSON array of ids, under 8000 bytes. Ids that fit go in one ``NOTIFY`` (the common
    case: a settlement batch is one); more are split into chunks (see :data:`NOTICE_ID_BYTES`), which the
    query computes only when needed (a one-time filter). Returns one row per ``NOTIFY`` sent, none for no
    ids. ``channel`` is the SQL text of the channel, twice in the query: by default the notice channel as a
    literal (``{notice_channel}``, filled in with the schema's), or a parameter such as ``%s``."""
    size = "sum(octet_length(to_json({0}.id)::text) + 2)"
    return (
        f"SELECT pg_notify({channel}, {kind} || json_agg(x.id ORDER BY x.ord)::text) "
        f"FROM ({source}) AS x HAVING count(*) > 0 AND {size.format('x')} <= {_ONE_PAYLOAD} "
        f"UNION ALL SELECT pg_notify({channel}, {kind} || json_agg(n.id ORDER BY n.ord)::text) "
        "FROM (SELECT x.id, x.ord, sum(octet_length(to_json(x.id)::text) + 2) OVER ("
        "ORDER BY x.ord ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW) AS reach "
        f"FROM ({source}) AS x WHERE octet_length(to_json(x.id)::text) <= {NOTICE_ID_BYTES}) AS n "
        f"WHERE (SELECT {size.format('y')} FROM ({source}) AS y) > {_ONE_PAYLOAD} "
        f"GROUP BY (n.reach - 1) / {NOTICE_ID_BYTES}"
    )


# The claim without limits, the hot path of every worker: one call, whose statements are planned once per
# session. Queue by queue (paused ones skipped), priority group by priority group from the highest (a
# loose index scan of the pending index), it locks due tasks in claim order with SKIP LOCKED until it
# holds `wanted`, never more. A due task found expired on the way is cancelled instead and takes no room:
# the scan goes on behind it (at most 1000 such per claim); the group of an expired member ends cancelled
# in the same transaction and a "settled" notice goes out for each (nothing of that runs when nothing
# expired). `held`: names it must not take. Returns the rows it leased or cancelled, as they are now. A
# typical claim is two statements: the first group's scan (with the pause check and the priority probe)
# and the UPDATE.
_CLAIM_FUNCTION = """
CREATE OR REPLACE FUNCTION {claim_function}(queues text[], now double precision, wanted integer,
                                 lease double precision, held text[])
RETURNS SETOF {tasks} LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan SET enable_sort = off SET enable_seqscan = off
SET enable_bitmapscan = off AS $$
DECLARE
    picked text[] := '{{}}';
    expired text[] := '{{}}';
    live_ids text[];
    gone_ids text[];
    runs double precision[];
    seqs bigint[];
    current_queue text;
    level bigint;
    room integer;
BEGIN
    FOREACH current_queue IN ARRAY queues LOOP
        EXIT WHEN cardinality(picked) >= wanted;
        room := wanted - cardinality(picked);
        -- The highest priority of the queue (none when it is paused or has no pending task), and its
        -- first due tasks, in one statement.
        SELECT g.level, coalesce(array_agg(c.id) FILTER (WHERE c.live), '{{}}'),
               coalesce(array_agg(c.id) FILTER (WHERE NOT c.live), '{{}}'),
               array_agg(c.run_at), array_agg(c.seq)
        INTO level, live_ids, gone_ids, runs, seqs
        FROM (SELECT (SELECT p.priority FROM {tasks} AS p
                      WHERE p.state = 'pending' AND p.queue = current_queue
                      ORDER BY p.priority DESC LIMIT 1) AS level
              WHERE NOT EXISTS (SELECT FROM {paused} AS z WHERE z.queue = current_queue)) AS g
        LEFT JOIN LATERAL (
            SELECT p.id, p.run_at, p.seq, (p.expires_at IS NULL OR p.expires_at > now) AS live
            FROM {tasks} AS p
            WHERE p.state = 'pending' AND p.queue = current_queue AND p.priority = g.level
            AND p.run_at <= now AND p.name <> ALL(held)
            ORDER BY p.run_at, p.seq LIMIT room FOR UPDATE SKIP LOCKED) AS c ON true
        GROUP BY g.level;
        WHILE level IS NOT NULL LOOP
            picked := picked || live_ids;
            expired := expired || gone_ids;
            IF cardinality(gone_ids) > 0 AND cardinality(live_ids) + cardinality(gone_ids) = room
               AND cardinality(expired) < 1000 THEN
                -- Expired tasks took room: scan on behind them in the same group.
                room := wanted - cardinality(picked);
                SELECT coalesce(array_agg(c.id) FILTER (WHERE c.live), '{{}}'),
                       coalesce(array_agg(c.id) FILTER (WHERE NOT c.live), '{{}}'),
                       array_agg(c.run_at), array_agg(c.seq)
                INTO live_ids, gone_ids, runs, seqs
                FROM (SELECT p.id, p.run_at, p.seq, (p.expires_at IS NULL OR p.expires_at > now) AS live
                      FROM {tasks} AS p
                      WHERE p.state = 'pending' AND p.queue = current_queue AND p.priority = level
                      AND p.run_at <= now AND (p.run_at, p.seq) > (runs[cardinality(runs)],
                                                                   seqs[cardinality(seqs)])
                      AND p.name <> ALL(held)
                      ORDER BY p.run_at, p.seq LIMIT room FOR UPDATE SKIP LOCKED) AS c;
                CONTINUE;
            END IF;
            EXIT WHEN cardinality(picked) >= wanted;
            room := wanted - cardinality(picked);
            -- The next lower priority of the queue, and its first due tasks.
            SELECT g.level, coalesce(array_agg(c.id) FILTER (WHERE c.live), '{{}}'),
                   coalesce(array_agg(c.id) FILTER (WHERE NOT c.live), '{{}}'),
                   array_agg(c.run_at), array_agg(c.seq)
            INTO level, live_ids, gone_ids, runs, seqs
            FROM (SELECT (SELECT p.priority FROM {tasks} AS p
                          WHERE p.state = 'pending' AND p.queue = current_queue AND p.priority < level
                          ORDER BY p.priority DESC LIMIT 1) AS level) AS g
            LEFT JOIN LATERAL (
                SELECT p.id, p.run_at, p.seq, (p.expires_at IS NULL OR p.expires_at > now) AS live
                FROM {tasks} AS p
                WHERE p.state = 'pending' AND p.queue = current_queue AND p.priority = g.level
                AND p.run_at <= now AND p.name <> ALL(held)
                ORDER BY p.run_at, p.seq LIMIT room FOR UPDATE SKIP LOCKED) AS c ON true
            GROUP BY g.level;
        END LOOP;
    END LOOP;
    IF cardinality(picked) + cardinality(expired) = 0 THEN
        RETURN;
    END IF;
    -- The state recheck sits in a CASE so that the planner probes the primary key for each id rather
    -- than intersecting it with the partial index over pending tasks (see _sql._still).
    RETURN QUERY UPDATE {tasks} AS t SET
        state = CASE WHEN t.expires_at <= now THEN 'cancelled' ELSE 'active' END,
        attempts = CASE WHEN t.expires_at <= now OR t.attempts < 0 OR t.attempts >= 2147483647
                        THEN t.attempts ELSE t.attempts + 1 END,
        started_at = CASE WHEN t.expires_at <= now THEN t.started_at ELSE now END,
        finished_at = CASE WHEN t.expires_at <= now THEN now ELSE t.finished_at END,
        last_error = CASE WHEN t.expires_at <= now THEN 'expired before it started' ELSE t.last_error END,
        lease_until = CASE WHEN t.expires_at <= now THEN NULL ELSE lease END,
        token = CASE WHEN t.expires_at <= now THEN NULL ELSE gen_random_uuid()::text END
    WHERE t.id = ANY(picked || expired) AND CASE WHEN t.state = 'pending' THEN true ELSE false END
    RETURNING t.*;
    IF cardinality(expired) > 0 THEN
        -- The expired tasks were cancelled: a group one of them belongs to ends cancelled in this same
        -- transaction, and a notice wakes whoever waits for them.
        PERFORM {group_ended}(e.groups, e.ids, array_fill('cancelled'::text, ARRAY[cardinality(e.ids)]),
                              array_fill(NULL::bytea, ARRAY[cardinality(e.ids)]),
                              array_fill(now, ARRAY[cardinality(e.ids)]))
        FROM (SELECT array_agg(t.group_id) AS groups, array_agg(t.id) AS ids FROM {tasks} AS t
              WHERE t.id = ANY(expired) AND t.group_id IS NOT NULL) AS e
        WHERE e.ids IS NOT NULL;
        PERFORM {notify_ids}('s', expired);
    END IF;
END
$$
"""

# The claim without limits as schema version 5 defines it: as version 3's (above), but each priority group is
# entered at its first pending task. Every claim leaves the index entries of the tasks it took behind at the
# head of the pending index until a vacuum removes them (a claimed version no longer matches the index's
# predicate, and nothing else deletes them), so every scan that starts at the head of a queue's group steps
# over them: version 3 made three such scans per group (the priority probe, the same probe again, as the
# planner copied it into the lateral scan, and the scan of the due tasks), each reading about 110 index pages
# late in a 20 000-task drain. Here one probe finds the first pending task (an index-only scan in the index's
# order) and the scan of the due tasks starts at its (run_at, seq): every entry before it in the group is of a
# task this statement's snapshot does not see as pending, which the scan would have skipped anyway. The
# group ordering is unchanged, and so is the claim order. It also sets jit = off itself (CREATE OR REPLACE
# replaces the settings version 4 added).
_CLAIM_FUNCTION_V5 = """
CREATE OR REPLACE FUNCTION {claim_function}(queues text[], now double precision, wanted integer,
                                 lease double precision, held text[])
RETURNS SETOF {tasks} LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan SET enable_sort = off SET enable_seqscan = off
SET enable_bitmapscan = off SET jit = off AS $$
DECLARE
    picked text[] := '{{}}';
    expired text[] := '{{}}';
    live_ids text[];
    gone_ids text[];
    runs double precision[];
    seqs bigint[];
    current_queue text;
    level bigint;
    room integer;
BEGIN
    FOREACH current_queue IN ARRAY queues LOOP
        EXIT WHEN cardinality(picked) >= wanted;
        room := wanted - cardinality(picked);
        -- The first pending task of the queue in claim order (none when the queue is paused or has no
        -- pending task): its priority is the highest, and the due tasks of that priority are taken from
        -- its (run_at, seq) on, in one statement (see the comment above the function).
        SELECT g.level, coalesce(array_agg(c.id) FILTER (WHERE c.live), '{{}}'),
               coalesce(array_agg(c.id) FILTER (WHERE NOT c.live), '{{}}'),
               array_agg(c.run_at), array_agg(c.seq)
        INTO level, live_ids, gone_ids, runs, seqs
        FROM (SELECT f.priority AS level, f.run_at AS first_run, f.seq AS first_seq FROM {tasks} AS f
              WHERE f.state = 'pending' AND f.queue = current_queue
              AND NOT EXISTS (SELECT FROM {paused} AS z WHERE z.queue = current_queue)
              ORDER BY f.priority DESC, f.run_at, f.seq LIMIT 1) AS g
        LEFT JOIN LATERAL (
            SELECT p.id, p.run_at, p.seq, (p.expires_at IS NULL OR p.expires_at > now) AS live
            FROM {tasks} AS p
            WHERE p.state = 'pending' AND p.queue = current_queue AND p.priority = g.level
            AND p.run_at <= now AND (p.run_at, p.seq) >= (g.first_run, g.first_seq)
            AND p.name <> ALL(held)
            ORDER BY p.run_at, p.seq LIMIT room FOR UPDATE SKIP LOCKED) AS c ON true
        GROUP BY g.level;
        WHILE level IS NOT NULL LOOP
            picked := picked || live_ids;
            expired := expired || gone_ids;
            IF cardinality(gone_ids) > 0 AND cardinality(live_ids) + cardinality(gone_ids) = room
               AND cardinality(expired) < 1000 THEN
                -- Expired tasks took room: scan on behind them in the same group.
                room := wanted - cardinality(picked);
                SELECT coalesce(array_agg(c.id) FILTER (WHERE c.live), '{{}}'),
                       coalesce(array_agg(c.id) FILTER (WHERE NOT c.live), '{{}}'),
                       array_agg(c.run_at), array_agg(c.seq)
                INTO live_ids, gone_ids, runs, seqs
                FROM (SELECT p.id, p.run_at, p.seq, (p.expires_at IS NULL OR p.expires_at > now) AS live
                      FROM {tasks} AS p
                      WHERE p.state = 'pending' AND p.queue = current_queue AND p.priority = level
                      AND p.run_at <= now AND (p.run_at, p.seq) > (runs[cardinality(runs)],
                                                                   seqs[cardinality(seqs)])
                      AND p.name <> ALL(held)
                      ORDER BY p.run_at, p.seq LIMIT room FOR UPDATE SKIP LOCKED) AS c;
                CONTINUE;
            END IF;
            EXIT WHEN cardinality(picked) >= wanted;
            room := wanted - cardinality(picked);
            -- The first pending task of the next lower priority, and the due tasks from it on.
            SELECT g.level, coalesce(array_agg(c.id) FILTER (WHERE c.live), '{{}}'),
                   coalesce(array_agg(c.id) FILTER (WHERE NOT c.live), '{{}}'),
                   array_agg(c.run_at), array_agg(c.seq)
            INTO level, live_ids, gone_ids, runs, seqs
            FROM (SELECT f.priority AS level, f.run_at AS first_run, f.seq AS first_seq FROM {tasks} AS f
                  WHERE f.state = 'pending' AND f.queue = current_queue AND f.priority < level
                  ORDER BY f.priority DESC, f.run_at, f.seq LIMIT 1) AS g
            LEFT JOIN LATERAL (
                SELECT p.id, p.run_at, p.seq, (p.expires_at IS NULL OR p.expires_at > now) AS live
                FROM {tasks} AS p
                WHERE p.state = 'pending' AND p.queue = current_queue AND p.priority = g.level
                AND p.run_at <= now AND (p.run_at, p.seq) >= (g.first_run, g.first_seq)
                AND p.name <> ALL(held)
                ORDER BY p.run_at, p.seq LIMIT room FOR UPDATE SKIP LOCKED) AS c ON true
            GROUP BY g.level;
        END LOOP;
    END LOOP;
    IF cardinality(picked) + cardinality(expired) = 0 THEN
        RETURN;
    END IF;
    -- The state recheck sits in a CASE so that the planner probes the primary key for each id rather
    -- than intersecting it with the partial index over pending tasks (see _sql._still).
    RETURN QUERY UPDATE {tasks} AS t SET
        state = CASE WHEN t.expires_at <= now THEN 'cancelled' ELSE 'active' END,
        attempts = CASE WHEN t.expires_at <= now OR t.attempts < 0 OR t.attempts >= 2147483647
                        THEN t.attempts ELSE t.attempts + 1 END,
        started_at = CASE WHEN t.expires_at <= now THEN t.started_at ELSE now END,
        finished_at = CASE WHEN t.expires_at <= now THEN now ELSE t.finished_at END,
        last_error = CASE WHEN t.expires_at <= now THEN 'expired before it started' ELSE t.last_error END,
        lease_until = CASE WHEN t.expires_at <= now THEN NULL ELSE lease END,
        token = CASE WHEN t.expires_at <= now THEN NULL ELSE gen_random_uuid()::text END
    WHERE t.id = ANY(picked || expired) AND CASE WHEN t.state = 'pending' THEN true ELSE false END
    RETURNING t.*;
    IF cardinality(expired) > 0 THEN
        -- The expired tasks were cancelled: a group one of them belongs to ends cancelled in this same
        -- transaction, and a notice wakes whoever waits for them.
        PERFORM {group_ended}(e.groups, e.ids, array_fill('cancelled'::text, ARRAY[cardinality(e.ids)]),
                              array_fill(NULL::bytea, ARRAY[cardinality(e.ids)]),
                              array_fill(now, ARRAY[cardinality(e.ids)]))
        FROM (SELECT array_agg(t.group_id) AS groups, array_agg(t.id) AS ids FROM {tasks} AS t
              WHERE t.id = ANY(expired) AND t.group_id IS NOT NULL) AS e
        WHERE e.ids IS NOT NULL;
        PERFORM {notify_ids}('s', expired);
    END IF;
END
$$
"""

# The claim with limits. After the locks (see the module docstring), the due tasks that expired are locked
# (at most 1000 per queue); then, in one statement:
# - `lim`: per limited name, the bucket refilled to now (full when it has no row yet) and what max_running
#   leaves (`other_cap`, NULL without that limit). Running tasks are counted up to the limit only: a count
#   reads at most that many index entries, whatever runs (the limit was lowered, or tasks ran without it);
#   the ORDER BY is the running index's order, so that the LIMIT never makes a sequential scan look cheaper.
# - `allow`: how many tasks of the name may start now, and `scan`: how many due tasks of each of its groups
#   to read: one more than the tokens allow when the bucket holds it back (to see that a task was refused a
#   token), up to `wanted` when keys decide, none when it may start none (not locked, or max_running full).
# - `groups`/`cand`: the candidates, per (queue, name, priority) group, locked with SKIP LOCKED; a name's
#   tasks of a key already full are stepped over in the scan.
# - then, in claim order: a keyed task passes while its key has room, a limited name's task while the name
#   has room (max_running, then tokens), and the batch takes the first `wanted` that pass; a task refused a
#   token before the batch was full counts one refusal for its name (`refused`).
# - `leased` leases the chosen tasks and cancels the expired ones; `spent` takes the tokens and counts the
#   refusals.
# Then, as in the claim without limits, the groups of expired members end cancelled and notices go out.
_CLAIM_LIMITED_FUNCTION = """
CREATE OR REPLACE FUNCTION {claim_limited_function}(queues text[], now double precision, wanted integer,
                                         lease double precision, space text, names text[],
                                         rates double precision[], pers double precision[],
                                         max_runnings bigint[], per_keys bigint[])
RETURNS SETOF {tasks} LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan SET enable_sort = off SET enable_seqscan = off
SET enable_bitmapscan = off AS $$
DECLARE
    locks boolean[] := '{{}}';
    expired text[];
    i integer;
BEGIN
    FOR i IN 1 .. coalesce(cardinality(names), 0) LOOP
        IF EXISTS (SELECT FROM {tasks} AS p
                   WHERE p.state = 'pending' AND p.queue = ANY(queues) AND p.name = names[i]) THEN
            PERFORM pg_advisory_xact_lock(hashtext(space), hashtext(names[i]));
            locks := locks || true;
        ELSE
            locks := locks || false;
        END IF;
    END LOOP;
    IF NOT true = ANY(locks) THEN
        -- No limited name has a pending task here: the claim without limits, leaving them out (a task of
        -- theirs enqueued meanwhile waits for the next claim, which locks its name).
        RETURN QUERY SELECT * FROM {claim_function}(queues, now, wanted, lease, names);
        RETURN;
    END IF;
    -- The due tasks that expired (at most 1000 per queue): the UPDATE below cancels them.
    expired := ARRAY(
        SELECT e.id FROM unnest(queues) AS q(name)
        CROSS JOIN LATERAL (
            SELECT p.id FROM {tasks} AS p
            WHERE p.state = 'pending' AND p.queue = q.name AND p.expires_at <= now AND p.run_at <= now
            ORDER BY p.expires_at LIMIT 1000 FOR UPDATE SKIP LOCKED) AS e
        WHERE NOT EXISTS (SELECT FROM {paused} AS z WHERE z.queue = q.name));
    RETURN QUERY
    WITH lim AS MATERIALIZED (
        SELECT l.name, l.locked, l.rate, l.per, l.per_key, b.at AS bucket_at,
               CASE WHEN l.rate IS NULL THEN NULL WHEN b.name IS NULL THEN l.rate
                    WHEN now > b.at THEN least(l.rate, b.tokens + (now - b.at) * l.rate / l.per)
                    ELSE least(l.rate, b.tokens) END AS tokens,
               CASE WHEN l.max_running IS NULL THEN NULL
                    ELSE l.max_running - (SELECT count(*) FROM (
                        SELECT FROM {tasks} AS a WHERE a.state = 'active' AND a.name = l.name
                        ORDER BY a.concurrency_key LIMIT greatest(l.max_running, 0)) AS a) END AS other_cap
        FROM unnest(names, locks, rates, pers, max_runnings, per_keys)
             AS l(name, locked, rate, per, max_running, per_key)
        LEFT JOIN {buckets} AS b ON b.name = l.name),
    allow AS MATERIALIZED (
        SELECT m.name, m.per_key, m.rate, m.tokens, m.other_cap, m.allowance,
               CASE WHEN NOT m.locked OR coalesce(m.other_cap, 1) <= 0 THEN 0
                    WHEN m.per_key IS NOT NULL THEN wanted
                    WHEN m.allowance < least(wanted, coalesce(m.other_cap, wanted)) THEN m.allowance + 1
                    ELSE m.allowance END AS scan
        FROM (SELECT n.*,
                     CASE WHEN NOT n.locked THEN 0
                          ELSE greatest(0, least(wanted, coalesce(n.other_cap, wanted),
                                                 coalesce(floor(n.tokens)::bigint, wanted))) END AS allowance
              FROM lim AS n) AS m),
    groups AS MATERIALIZED (
        SELECT * FROM {name_groups}(queues, ARRAY(SELECT s.name FROM allow AS s WHERE s.scan = 0))),
    cand AS MATERIALIZED (
        SELECT g.ord, c.id, c.name, c.key, c.priority, c.run_at, c.seq, a.name IS NOT NULL AS limited,
               a.per_key, a.rate, a.tokens, a.other_cap
        FROM groups AS g LEFT JOIN allow AS a ON a.name = g.name
        CROSS JOIN LATERAL (
            SELECT p.id, p.name, p.concurrency_key AS key, p.priority, p.run_at, p.seq FROM {tasks} AS p
            WHERE p.state = 'pending' AND p.queue = g.queue AND p.name = g.name AND p.priority = g.priority
            AND p.run_at <= now AND (p.expires_at IS NULL OR p.expires_at > now)
            AND (a.per_key IS NULL OR p.concurrency_key IS NULL OR (
                SELECT count(*) FROM (SELECT FROM {tasks} AS r
                                      WHERE r.state = 'active' AND r.name = p.name
                                      AND r.concurrency_key = p.concurrency_key
                                      LIMIT greatest(a.per_key, 0)) AS r) < a.per_key)
            ORDER BY p.run_at, p.seq LIMIT coalesce(a.scan, wanted) FOR UPDATE SKIP LOCKED) AS c
        WHERE coalesce(a.scan, 1) > 0),
    keyed AS (
        SELECT c.*, row_number() OVER (PARTITION BY c.name, c.key
                                       ORDER BY c.ord, c.priority DESC, c.run_at, c.seq) AS key_rank
        FROM cand AS c),
    key_ok AS (
        SELECT k.* FROM keyed AS k
        WHERE k.per_key IS NULL OR k.key IS NULL OR k.key_rank <= k.per_key - (
            SELECT count(*) FROM (SELECT FROM {tasks} AS r
                                  WHERE r.state = 'active' AND r.name = k.name AND r.concurrency_key = k.key
                                  LIMIT greatest(k.per_key, 0)) AS r)),
    named AS (
        SELECT o.*, row_number() OVER (PARTITION BY o.name
                                       ORDER BY o.ord, o.priority DESC, o.run_at, o.seq) AS name_rank
        FROM key_ok AS o),
    judged AS (
        SELECT n.*,
               (NOT n.limited OR ((n.other_cap IS NULL OR n.name_rank <= n.other_cap)
                                  AND (n.rate IS NULL OR n.name_rank <= n.tokens))) AS passes,
               (n.rate IS NOT NULL AND n.name_rank > n.tokens
                AND (n.other_cap IS NULL OR n.name_rank <= n.other_cap)) AS no_token
        FROM named AS n),
    walked AS (
        SELECT j.*, count(*) FILTER (WHERE j.passes) OVER (
                        ORDER BY j.ord, j.priority DESC, j.run_at, j.seq
                        ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW) AS passed
        FROM judged AS j),
    chosen AS MATERIALIZED (SELECT w.id FROM walked AS w WHERE w.passes AND w.passed <= wanted),
    refused AS MATERIALIZED (SELECT DISTINCT w.name FROM walked AS w WHERE w.no_token AND w.passed < wanted),
    leased AS (
        UPDATE {tasks} AS t SET
            state = CASE WHEN t.expires_at <= now THEN 'cancelled' ELSE 'active' END,
            attempts = CASE WHEN t.expires_at <= now OR t.attempts < 0 OR t.attempts >= 2147483647
                            THEN t.attempts ELSE t.attempts + 1 END,
            started_at = CASE WHEN t.expires_at <= now THEN t.started_at ELSE now END,
            finished_at = CASE WHEN t.expires_at <= now THEN now ELSE t.finished_at END,
            last_error = CASE WHEN t.expires_at <= now THEN 'expired before it started' ELSE t.last_error END,
            lease_until = CASE WHEN t.expires_at <= now THEN NULL ELSE lease END,
            token = CASE WHEN t.expires_at <= now THEN NULL ELSE gen_random_uuid()::text END
        WHERE t.id = ANY(ARRAY(SELECT h.id FROM chosen AS h) || expired)
        AND CASE WHEN t.state = 'pending' THEN true ELSE false END
        RETURNING t.*),
    taken AS (SELECT l.name, count(*) AS n FROM leased AS l WHERE l.state = 'active' GROUP BY l.name),
    spent AS (
        INSERT INTO {buckets} AS b (name, tokens, at, refused)
        SELECT a.name, a.tokens - coalesce(t.n, 0),
               CASE WHEN a.bucket_at > now THEN a.bucket_at ELSE now END,
               CASE WHEN a.name IN (SELECT f.name FROM refused AS f) THEN 1 ELSE 0 END
        FROM lim AS a LEFT JOIN taken AS t ON t.name = a.name
        WHERE a.rate IS NOT NULL AND (t.n IS NOT NULL OR a.name IN (SELECT f.name FROM refused AS f))
        ON CONFLICT (name) DO UPDATE SET tokens = excluded.tokens, at = excluded.at,
                                         refused = b.refused + excluded.refused)
    SELECT l.* FROM leased AS l;
    IF cardinality(expired) > 0 THEN
        -- The expired tasks were cancelled: a group one of them belongs to ends cancelled in this same
        -- transaction, and a notice wakes whoever waits for them.
        PERFORM {group_ended}(e.groups, e.ids, array_fill('cancelled'::text, ARRAY[cardinality(e.ids)]),
                              array_fill(NULL::bytea, ARRAY[cardinality(e.ids)]),
                              array_fill(now, ARRAY[cardinality(e.ids)]))
        FROM (SELECT array_agg(t.group_id) AS groups, array_agg(t.id) AS ids FROM {tasks} AS t
              WHERE t.id = ANY(expired) AND t.group_id IS NOT NULL) AS e
        WHERE e.ids IS NOT NULL;
        PERFORM {notify_ids}('s', expired);
    END IF;
END
$$
"""

# The notices of `ids` (see notice_query), for the functions that cannot inline the query.
_NOTIFY_IDS = (
    """
CREATE FUNCTION {notify_ids}(kind text, ids text[]) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    PERFORM subquery.* FROM ("""
    + notice_query("kind", "SELECT u.id, u.ord FROM unnest(ids) WITH ORDINALITY AS u(id, ord)")
    .replace("{", "{{")
    .replace("}", "}}")
    .replace("{{notice_channel}}", "{notice_channel}")
    + """) AS subquery;
END
$$
"""
)

# The group bookkeeping of members that ended (one entry per member: its group, its id, the final state it
# was settled in, its result, when), called in the transaction that ended them. Fan-in is exactly once
# because:
# - the groups are locked first, in id order (FOR UPDATE): every transaction that ends members of a group
#   waits for the one before it, and two transactions ending members of the same groups never deadlock; the
#   statement after the lock takes a fresh snapshot, so it sees what the previous holder committed;
# - `remaining` counts the members not succeeded yet, and a member's row is counted down once: only while
#   its state is not 'succeeded' yet (a member that succeeded cannot be settled again: its lease is gone);
# - the update that takes `remaining` to 0 with no outcome yet is the one that makes the group succeed and
#   stores `then`, in the same statement; no other update can (remaining stays 0, the outcome is set).
# A settlement replayed after a lost reply finds its lease gone and never reaches this function. A member
# that ends dead or cancelled gives a group without an outcome that outcome (the first in the batch).
# Returns how many `then` tasks were stored (each wakes its queue).
_GROUP_ENDED = """
CREATE FUNCTION {group_ended}(group_ids text[], task_ids text[], states text[], results bytea[],
                              ats double precision[])
RETURNS integer LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan SET enable_seqscan = off SET enable_bitmapscan = off AS $$
DECLARE
    stored integer;
BEGIN
    PERFORM FROM {groups} AS g WHERE g.id = ANY(group_ids) ORDER BY g.id FOR UPDATE;
    WITH e AS (
        SELECT * FROM unnest(group_ids, task_ids, states, results, ats) WITH ORDINALITY
                      AS e(group_id, task_id, state, result, at, ord)),
    m AS (
        UPDATE {members} AS m SET state = e.state,
                                  result = CASE WHEN e.state = 'succeeded' THEN e.result ELSE m.result END
        FROM e WHERE m.group_id = e.group_id AND m.task_id = e.task_id
        AND m.state IS DISTINCT FROM 'succeeded'
        RETURNING m.group_id, e.state, e.at, e.ord),
    c AS (
        SELECT m.group_id, count(*) FILTER (WHERE m.state = 'succeeded') AS won,
               (array_agg(m.at ORDER BY m.ord DESC) FILTER (WHERE m.state = 'succeeded'))[1] AS won_at,
               (array_agg(m.state ORDER BY m.ord) FILTER (WHERE m.state <> 'succeeded'))[1] AS failed,
               (array_agg(m.at ORDER BY m.ord) FILTER (WHERE m.state <> 'succeeded'))[1] AS failed_at
        FROM m GROUP BY m.group_id),
    g AS (
        UPDATE {groups} AS g SET
            remaining = g.remaining - c.won,
            outcome = CASE WHEN g.outcome IS NOT NULL THEN g.outcome WHEN c.failed IS NOT NULL THEN c.failed
                           WHEN g.remaining - c.won <= 0 THEN 'succeeded' END,
            finished_at = CASE WHEN g.outcome IS NOT NULL THEN g.finished_at
                               WHEN c.failed IS NOT NULL THEN c.failed_at
                               WHEN g.remaining - c.won <= 0 THEN c.won_at END,
            then_id = CASE WHEN g.outcome IS NULL AND c.failed IS NULL AND g.remaining - c.won <= 0
                           THEN g.then_task_id ELSE g.then_id END
        FROM c WHERE g.id = c.group_id
        RETURNING g.id, g.then_task_id, g.then_task,
                  (g.outcome = 'succeeded' AND g.remaining <= 0 AND c.won > 0
                   AND c.failed IS NULL) AS completed),
    t AS (
        INSERT INTO {tasks} AS t (id, name, queue, payload, state, attempts, max_retries, timeout,
                                 enqueued_at, run_at, meta, priority, concurrency_key, expires_at)
        SELECT g.then_task_id, (g.then_task).name, (g.then_task).queue, (g.then_task).payload, 'pending', 0,
               (g.then_task).max_retries, (g.then_task).timeout, (g.then_task).enqueued_at,
               (g.then_task).run_at, (g.then_task).meta, (g.then_task).priority,
               (g.then_task).concurrency_key, (g.then_task).expires_at
        FROM g WHERE g.completed AND g.then_task_id IS NOT NULL
        ON CONFLICT (id) DO NOTHING RETURNING t.queue)
    SELECT count(pg_notify({channel}, CASE WHEN octet_length(t.queue) < 7900 THEN t.queue ELSE '*' END))
    INTO stored FROM t;
    RETURN stored;
END
$$
"""

#: The functions version 3 creates or replaces, in creation order (a function must exist before one that
#: calls it).
FUNCTIONS_V3 = (_NOTIFY_IDS, _GROUP_ENDED, _CLAIM_FUNCTION, _CLAIM_LIMITED_FUNCTION)

#: The functions schema version 5 replaces: the claim without limits.
FUNCTIONS_V5 = (_CLAIM_FUNCTION_V5,)
