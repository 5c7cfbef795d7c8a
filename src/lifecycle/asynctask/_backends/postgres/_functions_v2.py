"""The server-side functions as schema version 2 created them (frozen: the migration of a new schema replays
every version, and version 3 replaces the two claims, see ``_functions``). Do not edit: a change to a function
is a new layout version with its own step."""

from __future__ import annotations

__all__ = ["FUNCTIONS_V2"]

# A loose index scan of the pending index: the (queue, priority) groups of pending tasks, for the next due
# time of wait_for_work (the due tasks of one group are one range of that index).
_PRIORITY_GROUPS = """
CREATE FUNCTION {priority_groups}(queues text[])
RETURNS TABLE (ord bigint, queue text, priority bigint)
LANGUAGE plpgsql STABLE ROWS 2
SET plan_cache_mode = force_generic_plan SET enable_sort = off SET enable_seqscan = off
SET enable_bitmapscan = off AS $$
DECLARE
    position bigint := 0;
    current_queue text;
    level bigint;
BEGIN
    -- The (queue, priority) groups of pending tasks, queues in the order given, paused queues left out,
    -- priorities from the highest: one probe of the pending index per group, and one more per queue.
    FOREACH current_queue IN ARRAY queues LOOP
        position := position + 1;
        CONTINUE WHEN EXISTS (SELECT FROM {paused} AS z WHERE z.queue = current_queue);
        SELECT p.priority INTO level FROM {tasks} AS p
        WHERE p.state = 'pending' AND p.queue = current_queue ORDER BY p.priority DESC LIMIT 1;
        WHILE FOUND LOOP
            ord := position;
            queue := current_queue;
            priority := level;
            RETURN NEXT;
            SELECT p.priority INTO level FROM {tasks} AS p
            WHERE p.state = 'pending' AND p.queue = current_queue AND p.priority < level
            ORDER BY p.priority DESC LIMIT 1;
        END LOOP;
    END LOOP;
END
$$
"""

# The claim without limits, the hot path of every worker: one call, whose statements are planned once per
# session. Queue by queue (paused ones skipped), priority group by priority group from the highest (a
# loose index scan of the pending index), it locks due tasks in claim order with SKIP LOCKED until it
# holds `wanted`, never more. A due task found expired on the way is cancelled instead and takes no room:
# the scan goes on behind it (at most 1000 such per claim). `held`: names it must not take. Returns the
# rows it leased or cancelled, as they are now. A typical claim is two statements: the first group's scan
# (with the pause check and the priority probe) and the UPDATE.
_CLAIM_FUNCTION = """
CREATE FUNCTION {claim_function}(queues text[], now double precision, wanted integer,
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
END
$$
"""

_NAME_GROUPS = """
CREATE FUNCTION {name_groups}(queues text[], skipped text[])
RETURNS TABLE (ord bigint, queue text, name text, priority bigint)
LANGUAGE plpgsql STABLE ROWS 4
SET plan_cache_mode = force_generic_plan SET enable_sort = off SET enable_seqscan = off
SET enable_bitmapscan = off AS $$
DECLARE
    position bigint := 0;
    current_queue text;
    current_name text;
    level bigint;
BEGIN
    -- The (queue, name, priority) groups of pending tasks, for the claim with limits: queues in the order
    -- given, paused ones left out; a name in `skipped` (it may start nothing now) is stepped over
    -- without visiting its priorities.
    FOREACH current_queue IN ARRAY queues LOOP
        position := position + 1;
        CONTINUE WHEN EXISTS (SELECT FROM {paused} AS z WHERE z.queue = current_queue);
        SELECT p.name, p.priority INTO current_name, level FROM {tasks} AS p
        WHERE p.state = 'pending' AND p.queue = current_queue ORDER BY p.name, p.priority DESC LIMIT 1;
        WHILE FOUND LOOP
            IF NOT current_name = ANY(skipped) THEN
                ord := position;
                queue := current_queue;
                name := current_name;
                priority := level;
                RETURN NEXT;
                SELECT p.priority INTO level FROM {tasks} AS p
                WHERE p.state = 'pending' AND p.queue = current_queue AND p.name = current_name
                AND p.priority < level ORDER BY p.priority DESC LIMIT 1;
                CONTINUE WHEN FOUND;
            END IF;
            SELECT p.name, p.priority INTO current_name, level FROM {tasks} AS p
            WHERE p.state = 'pending' AND p.queue = current_queue AND p.name > current_name
            ORDER BY p.name, p.priority DESC LIMIT 1;
        END LOOP;
    END LOOP;
END
$$
"""

# The claim with limits. After the locks (see the module docstring):
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
# - `leased` leases the chosen tasks and cancels the expired ones (found by the index over tasks with an
#   expiry, at most 1000 per queue); `spent` takes the tokens and counts the refusals.
_CLAIM_LIMITED_FUNCTION = """
CREATE FUNCTION {claim_limited_function}(queues text[], now double precision, wanted integer,
                                         lease double precision, space text, names text[],
                                         rates double precision[], pers double precision[],
                                         max_runnings bigint[], per_keys bigint[])
RETURNS SETOF {tasks} LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan SET enable_sort = off SET enable_seqscan = off
SET enable_bitmapscan = off AS $$
DECLARE
    locks boolean[] := '{{}}';
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
    expired AS MATERIALIZED (
        SELECT e.id FROM unnest(queues) AS q(name)
        CROSS JOIN LATERAL (
            SELECT p.id FROM {tasks} AS p
            WHERE p.state = 'pending' AND p.queue = q.name AND p.expires_at <= now AND p.run_at <= now
            ORDER BY p.expires_at LIMIT 1000 FOR UPDATE SKIP LOCKED) AS e
        WHERE NOT EXISTS (SELECT FROM {paused} AS z WHERE z.queue = q.name)),
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
        WHERE t.id = ANY(ARRAY(SELECT h.id FROM chosen AS h UNION ALL SELECT x.id FROM expired AS x))
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
END
$$
"""

#: The functions of layout version 2, in creation order (a function must exist before one that calls it).
FUNCTIONS_V2 = (_PRIORITY_GROUPS, _NAME_GROUPS, _CLAIM_FUNCTION, _CLAIM_LIMITED_FUNCTION)
