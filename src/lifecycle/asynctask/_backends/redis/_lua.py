"""The Lua scripts of the Redis backend's hot path, and the key layout every script shares.

Every state change of :class:`~lifecycle.asynctask.redis.RedisBackend` is one script (the claim, with every
flow-control rule, is in ``_lua_claim``; operator actions in ``_lua_admin``).

Each script receives the key prefix ``{name}:`` as ``ARGV[1]`` and one declared key (``{name}:seq``) so that
Redis Cluster routes it; every key a script builds starts with the same ``{name}`` hash tag, so all of them
live in the declared key's slot. The key layout, version 4 (documented in ``docs/backends.md``):

- ``{P}:t:<id>``           hash, the record. Fields: n name, q queue, p payload, s state, a attempts, m
                           max_retries, to timeout, e enqueued_at, r run_at, st started_at, f finished_at, l
                           lease_until, err last_error, res result, meta meta, pr priority, ck concurrency
                           key, ex expires_at; and the backend's own: o enqueue sequence (16 hex digits), k
                           lease token (a group member's ends in ``g``), c id of the enqueue call, x id of the
                           last cancel/requeue call, rs run_at as 16 hex digits that sort as the times do, w
                           the parked set a claim moved the PENDING task to (a key suffix; stale once it is
                           back), rn the name and key the claim counted the ACTIVE task under, fu ``1`` while
                           a debounce follow-up waits, sv the verdict a settlement applied before a follow-up
                           replaced it; cr ``1`` once the cancellation of the ACTIVE task was asked; pd, pt,
                           pm the progress (done, total, message); g the group the task is a member of. Times
                           are the engine's floats as Python ``repr`` text; ``""`` means None for to/st/f/l;
                           err/res/meta/pr/ck/ex/cr/pd/pt/pm/g are absent when None (pr when 0).
- Claim structures of a queue's PENDING tasks, all with the member ``rs .. o .. id`` (a "claim member"):
  ``{P}:dl:<queue>`` (delayed: score run_at; a claim moves the due ones to ready), ``{P}:rd:<queue>`` (ready:
  score minus the priority, so the highest priority comes first and equal priorities sort by the member:
  run_at, then enqueue order), ``{P}:h:<len>:<queue><kind><name>...`` (parked: tasks a claim found held back
  by a flow limit, scored like ready; see ``_lua_claim``).
- ``{P}:x:<queue>``        sorted set of the queue's PENDING tasks that have an expiry, score the later of
                           run_at and expires_at, member id: what claims cancel as expired.
- ``{P}:i:<state>:<queue>`` sorted set per queue and state, score enqueued_at, member ``o .. id``: stats,
                           listing, requeue and purge; the truth about where a record is. An active index
                           also holds the prelude's ``KEPT`` member (score +inf), which keeps it a skiplist.
- ``{P}:leases``           sorted set of ACTIVE task ids by lease_until: what reclaim takes from; and ``KEPT``
                           (score +inf) once a claim leased something, until a purge finds it alone.
- ``{P}:an:<name>``, ``{P}:ak:<len>:<name><key>`` sets of the ACTIVE task ids of a name, and of a name and
  concurrency key. Every way out of ACTIVE removes the id from the sets its rn field names; an id whose
  record was deleted behind the backend's back is found when its lease expires (recovery then sets
  ``{P}:check`` for five minutes, during which claims check the sets they find at a limit).
- ``{P}:hs:<queue>``, ``{P}:hk:<len>:<queue><name>``, ``{P}:hq:<name>``: parked tasks' bookkeeping (see
  ``_lua_claim``); ``{P}:tb`` hash name -> rate bucket ``"tokens as_of"``; ``{P}:tr`` hash name -> how
  many claims found its due tasks waiting for a token; ``{P}:paused`` set of paused queues;
  ``{P}:uq:<unique key>`` uniqueness window ``"until call_id"`` (expires a minute after the window ends);
  ``{P}:fu:<id>`` list, the debounce follow-up of an ACTIVE task (the 16 values of a new task).
- ``{P}:w:<queue>``        list holding at most one wake-up token (pushed only when absent); idle workers
                           block on it (BLPOP).
- ``{P}:u:<nonce>``        one waiting backend object's alarm list: it pushes to it itself to end its own
                           BLPOP exactly on time (Redis ends blocking commands up to 100 ms late).
- ``{P}:u:<nonce>:t``      string, the server's TIME when that object's idle wait began and the id of the
                           claim sent behind it, read and deleted by that claim (expires after an hour,
                           deleted at close).
- ``{P}:queues``           set of queue names seen; ``{P}:seq`` enqueue counter; ``{P}:layout`` version.
- ``{P}:c:<call id>``      string, the task ids one claim/reclaim call leased, each as ``<length>:<id>``
                           (expires), so a call retried after a dropped connection returns the same tasks
                           instead of leasing more.
- ``{P}:sc:<call id>``     string, set by a settle call that applied settlements (expires once the caller no
                           longer retries), so that only a retry of that call (or a later call that names
                           it, see the settle script) counts them as applied.
- ``{P}:sr:<call id>``     set, ``<token> <state> <id>`` of each settlement such a call applied that left
                           its task PENDING (a retry, or a debounce follow-up's next period), expiring with
                           the marker: a claim may lease the task again before the repeat (a new token).
- Groups: ``{P}:g:<gid>`` hash (n members, ok succeeded, o outcome once final, c created_at, f finished_at, ti
  then's id once stored, meta, x the enqueue call), ``{P}:gm:<gid>`` list of member ids in call order,
  ``{P}:gr:<gid>`` hash member id -> how it ended (``s`` + result, ``n`` succeeded without one, ``d``,
  ``c``), ``{P}:gt:<gid>`` list, then's 16 values until the group is final, ``{P}:gf:<outcome>`` sorted set
  of final groups by finished_at. Kept up to date by the script that ends a member (settle, cancel, a claim's
  expiry), so a group's then is stored in the same atomic step as its last member's success.
- ``{P}:notices``          pub/sub channel: ``s`` (settled; ``s:<nonce>`` from the settle script of that
                           backend object) and ``c`` (cancellation asked) notices, each the kind letter
                           and task ids, NUL-separated.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

__all__ = [
    "CALL_LOG_TTL",
    "LAYOUT_VERSION",
    "PRELUDE",
    "SETTLE_PLAIN_BOUND",
    "WORKER_SCRIPTS",
    "LuaScript",
    "script",
]

LAYOUT_VERSION = 4
"""Version of the key layout; stored in ``{P}:layout``. A newer one is refused at open, an older one is
migrated (``_lua_claim``'s ``migrate`` script): version 1 had one ``{P}:r:<queue>`` set scored by run_at, no
priorities, keys, expiry or running-task sets; version 2 no groups, cancellation requests or progress (its
records read as they are); version 3 no ``KEPT`` member in ``{P}:leases`` and the active indexes (the next
claim adds it; a version-3 reader would count it as a running task)."""

CALL_LOG_TTL = 300
"""Seconds a claim call's log survives, so a retry after a dropped connection can find its tasks."""

# The prelude in parts; PRELUDE is all of them, in this order.
_PRELUDE_HEAD = """
local P = ARGV[1]
local FIELDS = {'n', 'q', 'p', 's', 'a', 'm', 'to', 'e', 'r', 'st', 'f', 'l', 'err', 'res', 'meta', 'pr',
  'ck', 'ex', 'cr', 'pd', 'pt', 'pm', 'g'}
local STATES = {'pending', 'active', 'succeeded', 'dead', 'cancelled'}
local EXPIRED = 'expired before it started'
local function rkey(id) return P .. 't:' .. id end
local function idx(state, q) return P .. 'i:' .. state .. ':' .. q end
local function ready(q) return P .. 'rd:' .. q end
local function delayed(q) return P .. 'dl:' .. q end
local function expiring(q) return P .. 'x:' .. q end
local function enc(s) return #s .. ':' .. s end
local function read(key) return redis.call('HMGET', key, unpack(FIELDS)) end
-- The member the claim puts first in every ZADD to {P}:leases and to an active index, scored +inf: no task id
-- (it holds a NUL), longer than zset-max-listpack-value (64 bytes by default), so the set is made a skiplist
-- and stays one. These sets hold the running tasks, few enough to be a listpack otherwise, which every ZADD
-- walks from its head parsing each score as text, and every ZREM or ZMSCORE searches: a third of the
-- server's work per task in a drain. Left out by whatever reads these sets (stats, listing, purge).
local KEPT = '\\0 keeps this set a skiplist: a member longer than zset-max-listpack-value'
local WOKEN = {}
-- The wake-up list holds at most one token: one command while a token waits (no worker idle), two when an
-- idle worker took the last one.
local function wake(q)
  if WOKEN[q] then return end
  WOKEN[q] = true
  local key = P .. 'w:' .. q
  if redis.call('EXISTS', key) == 0 then redis.call('LPUSH', key, '1') end
end
local function announce(queues)
  for q in pairs(queues) do
    redis.call('SADD', P .. 'queues', q)
    wake(q)
  end
end
local function emit(out, token, id, rec)
  out[#out + 1] = token
  out[#out + 1] = id
  for i = 1, #FIELDS do out[#out + 1] = rec[i] end
end
-- Sorted-set writes of many members at once, in slices that stay below Lua's unpack limit.
local function bulk(command, key, items)
  for first = 1, #items, 4000 do
    redis.call(command, key, unpack(items, first, math.min(first + 3999, #items)))
  end
end
-- A count field (attempts) as a Lua number, or nil when it is not plain digits: a damaged value is left
-- as it is for the engine to report, never computed with.
local function count(v)
  if v and #v <= 15 and string.match(v, '^%d+$') then return tonumber(v) end
  return nil
end
-- The ready-set score of a stored priority: minus it, so that the highest priority sorts first; 0 for a
-- missing or unreadable value (the record reads as priority 0 then, too).
local function pscore(p)
  if p == '0' or type(p) ~= 'string' then return '0' end
  local digits = p
  local negative = string.sub(p, 1, 1) == '-'
  if negative then digits = string.sub(p, 2) end
  if #digits == 0 or #digits > 15 or not string.match(digits, '^%d+$') or tonumber(digits) == 0 then
    return '0'
  end
  if negative then return digits end
  return '-' .. digits
end
"""

_PRELUDE_LOCATE = """\
-- Where record id sits in the indexes: {state, queue, member, score}. Its s, q and o fields say where; when
-- the s or q field is damaged, every state and queue is looked through (the indexes are the truth). nil when
-- no index holds the record under its o field. Reads only, so scripts call it before their first write.
local function locate(id, s, q, o)
  if type(o) ~= 'string' then return nil end
  local member = o .. id
  local function probe(state, queue)
    local score = redis.call('ZSCORE', idx(state, queue), member)
    if score then return {state, queue, member, score} end
    return nil
  end
  if type(q) == 'string' then
    if type(s) == 'string' then
      local found = probe(s, q)
      if found then return found end
    end
    for _, state in ipairs(STATES) do
      if state ~= s then
        local found = probe(state, q)
        if found then return found end
      end
    end
  end
  for _, queue in ipairs(redis.call('SMEMBERS', P .. 'queues')) do
    if queue ~= q then
      for _, state in ipairs(STATES) do
        local found = probe(state, queue)
        if found then return found end
      end
    end
  end
  return nil
end
"""

_PRELUDE_PLACE = """\
-- With DEFER set (scripts that store each task at most once), the sorted-set additions are collected per
-- key and made by added() at the end, many members per command.
local DEFER, ADDS = false, {}
local function zadd(key, score, member)
  if not DEFER then
    redis.call('ZADD', key, score, member)
    return
  end
  local list = ADDS[key]
  if not list then
    list = {}
    ADDS[key] = list
  end
  list[#list + 1] = score
  list[#list + 1] = member
end
local function added()
  for key, list in pairs(ADDS) do bulk('ZADD', key, list) end
  ADDS = {}
end
-- Put PENDING task id (enqueue sequence o; rs: its run_at as sortable hex, from the caller) into queue q's
-- claim structures: ready when due by `now` (the caller's time: an enqueue's enqueued_at, a settlement's at;
-- or true/false when the caller compared already), else delayed; and into the expiry set when it has an
-- expiry. The caller writes rs into the record.
local function place(id, q, o, run_at, rs, prio, ex, now)
  local cm = rs .. o .. id
  if now == true or (now ~= false and tonumber(run_at) <= tonumber(now)) then
    zadd(ready(q), pscore(prio), cm)
  else
    zadd(delayed(q), run_at, cm)
  end
  if ex and ex ~= '' and tonumber(ex) then
    local xs = run_at
    if tonumber(ex) > tonumber(run_at) then xs = ex end
    zadd(expiring(q), xs, id)
  end
end
"""

_PRELUDE_MOVES = """\
-- Take PENDING task id of queue q out of its claim structure (w and rs: its record's fields, w naming the
-- parked set a claim moved it to, if any; o: its enqueue sequence) and out of the expiry set. Returns the
-- key suffix it was taken from (nil: none held it). A task unparked again keeps a stale w, so the ready and
-- delayed sets are tried too.
local function unplace(id, q, w, rs, o)
  redis.call('ZREM', expiring(q), id)
  if type(rs) ~= 'string' or type(o) ~= 'string' then return nil end
  local cm = rs .. o .. id
  if type(w) == 'string' and w ~= '' and redis.call('ZREM', P .. w, cm) == 1 then return w end
  if redis.call('ZREM', ready(q), cm) == 1 then return 'rd:' .. q end
  if redis.call('ZREM', delayed(q), cm) == 1 then return 'dl:' .. q end
  return nil
end
-- Parked tasks (see the claim script) wait for a recheck. signal() marks queue q's parked tasks of name N
-- (and of its key K) for one at the next claim, and wakes the queue's idle workers.
local function signal(q, N, K)
  local hs = P .. 'hs:' .. q
  if redis.call('HEXISTS', hs, 'n' .. N) == 1 then redis.call('HSET', hs, 'n' .. N, '-') end
  if K then redis.call('ZADD', P .. 'hk:' .. enc(q) .. N, 'XX', '-inf', K) end
  wake(q)
end
-- A PENDING task of name N (key K) left queue q's ready set (or emptied a parked set) without being claimed
-- (cancelled, expired, purged, replaced): if it had been unparked to take a free slot, the slot is free
-- again, so q's parked tasks of N are rechecked.
local function nudge(q, N, K, from)
  if type(N) ~= 'string' or not from then return end
  if from ~= 'rd:' .. q and not (string.sub(from, 1, 2) == 'h:' and redis.call('EXISTS', P .. from) == 0) then
    return
  end
  if redis.call('SISMEMBER', P .. 'hq:' .. N, q) == 1 then
    if type(K) ~= 'string' then K = nil end
    signal(q, N, K)
  end
end
-- Task id leaves ACTIVE (settled, purged, or its lease found stale): rn is its record's rn field, the name
-- and key the claim counted it under (whatever its other fields hold now). Collected, then applied by
-- released(): removed from those running sets (removing twice is harmless), and the parked tasks of its name
-- rechecked in every queue that has some.
local RELEASED, RELEASED_NAMES, RN = {}, {}, {}
local function release(id, rn)
  if type(rn) ~= 'string' then return end
  local sets = RN[rn]
  if not sets then
    local size, rest = string.match(rn, '^(%d+):(.*)$')
    if not size then return end
    size = tonumber(size)
    local N = string.sub(rest, 1, size)
    local keys = RELEASED_NAMES[N]
    if not keys then
      keys = {}
      RELEASED_NAMES[N] = keys
    end
    sets = {'an:' .. N}
    if #rest > size then
      local K = string.sub(rest, size + 2)
      keys[K] = true
      sets[2] = 'ak:' .. enc(N) .. K
    end
    RN[rn] = sets
  end
  for _, setkey in ipairs(sets) do
    local ids = RELEASED[setkey]
    if not ids then
      ids = {}
      RELEASED[setkey] = ids
    end
    ids[#ids + 1] = id
  end
end
local function released()
  for setkey, ids in pairs(RELEASED) do bulk('SREM', P .. setkey, ids) end
  for N, keys in pairs(RELEASED_NAMES) do
    for _, q in ipairs(redis.call('SMEMBERS', P .. 'hq:' .. N)) do
      local hs = P .. 'hs:' .. q
      if redis.call('HEXISTS', hs, 'n' .. N) == 1 then redis.call('HSET', hs, 'n' .. N, '-') end
      for K in pairs(keys) do redis.call('ZADD', P .. 'hk:' .. enc(q) .. N, 'XX', '-inf', K) end
      wake(q)
    end
  end
  RELEASED, RELEASED_NAMES, RN = {}, {}, {}
end
"""

_PRELUDE_STORE = """\
-- A new task is 16 values (see the codec's new_task_args) at src[b .. b+15], src being ARGV or a follow-up
-- list: id, name, queue, payload, max_retries, timeout, enqueued_at, run_at, flags (5 characters '0'/'1':
-- has meta, has a key, opens a uniqueness window, due at its enqueue, has an expiry), meta, priority, key,
-- expires_at, unique key, unique_until, run_at as sortable hex.
-- Append its optional record fields (meta, priority, key, expiry) to an HSET field list.
local function optional(fields, src, b)
  local flags = src[b + 8]
  if string.byte(flags, 1) == 49 then
    fields[#fields + 1] = 'meta'
    fields[#fields + 1] = src[b + 9]
  end
  if src[b + 10] ~= '0' then
    fields[#fields + 1] = 'pr'
    fields[#fields + 1] = src[b + 10]
  end
  if string.byte(flags, 2) == 49 then
    fields[#fields + 1] = 'ck'
    fields[#fields + 1] = src[b + 11]
  end
  if string.byte(flags, 5) == 49 then
    fields[#fields + 1] = 'ex'
    fields[#fields + 1] = src[b + 12]
  end
end
-- Store the new task at src[b] as a fresh PENDING record with enqueue sequence number seq. old (a record
-- with the same id that is replaced, in a final state): its locate() result, or {} when no index holds it.
-- extra: more record fields to write (a group member's g), or nil.
local function store(src, b, seq, callid, old, queues, extra)
  local id, q, enqueued_at = src[b], src[b + 2], src[b + 6]
  local key = rkey(id)
  if old then
    if old[3] then redis.call('ZREM', idx(old[1], old[2]), old[3]) end
    redis.call('DEL', key)
  end
  local o = string.format('%016x', seq)
  place(id, q, o, src[b + 7], src[b + 15], src[b + 10], src[b + 12], string.byte(src[b + 8], 4) == 49)
  local fields = {'n', src[b + 1], 'q', q, 'p', src[b + 3], 's', 'pending', 'a', '0', 'm', src[b + 4],
    'to', src[b + 5], 'e', enqueued_at, 'r', src[b + 7], 'o', o, 'c', callid, 'rs', src[b + 15]}
  optional(fields, src, b)
  if extra then
    for j = 1, #extra do fields[#fields + 1] = extra[j] end
  end
  redis.call('HSET', key, unpack(fields))
  zadd(idx('pending', q), enqueued_at, o .. id)
  queues[q] = true
end
"""

_PRELUDE_NOTICES = """\
-- Notices for the processes using the store (RedisBackend.wait_for_notices): notify() collects task ids per
-- kind ('s' a task settled, 'c' a running task's cancellation was asked), notified() publishes one message
-- per kind on {P}:notices: the kind letter and the ids, NUL-separated (the settle script's kind is 's:' and
-- the settling backend object's nonce, which that object skips). Best effort, as pub/sub is: a user
-- whose ACL does not allow PUBLISH on the channel gets no notices, and no error.
local NOTES = {}
local function notify(kind, id)
  local list = NOTES[kind]
  if not list then
    list = {}
    NOTES[kind] = list
  end
  list[#list + 1] = id
end
local function publish(kind, ids)
  redis.pcall('PUBLISH', P .. 'notices', kind .. '\0' .. table.concat(ids, '\0'))
end
local function notified()
  for kind, ids in pairs(NOTES) do publish(kind, ids) end
  NOTES = {}
end
-- Groups. {P}:g:<gid> hash: n members, ok members succeeded, o outcome (absent until final), c created_at,
-- f finished_at, ti then's id once stored, meta, x the enqueue call; {P}:gm:<gid> list of the member ids in
-- call order; {P}:gr:<gid> hash, per member id, what the member ended as: 's' .. result, 'n' succeeded
-- without a result, 'd' dead, 'c' cancelled; {P}:gt:<gid> list, the 16 values of then until the group is
-- final; {P}:gf:<outcome> sorted set of final groups by finished_at (what purge takes). A member's record
-- names its group in g.
local function gkey(part, gid) return P .. part .. ':' .. gid end
-- The group becomes final with `outcome` at `at` (its then is dropped: stored already, or never).
local function group_final(gid, outcome, at, fields)
  fields[#fields + 1] = 'o'
  fields[#fields + 1] = outcome
  fields[#fields + 1] = 'f'
  fields[#fields + 1] = at
  redis.call('HSET', gkey('g', gid), unpack(fields))
  redis.call('DEL', gkey('gt', gid))
  redis.call('ZADD', gkey('gf', outcome), at, gid)
end
-- The last member succeeded: store the group's then (unless a task with its id exists) and make the group
-- SUCCEEDED, in the caller's atomic step.
local function group_succeeded(gid, at, callid, queues)
  local fields = {}
  local t = redis.call('LRANGE', gkey('gt', gid), 0, -1)
  if #t == 16 then
    if redis.call('EXISTS', rkey(t[1])) == 0 then
      store(t, 1, redis.call('INCR', P .. 'seq'), callid, nil, queues)
    end
    fields = {'ti', t[1]}
  end
  group_final(gid, 'succeeded', at, fields)
end
-- Member id of group gid ended `state` (succeeded, dead or cancelled) at `at`; res: its
-- encoded result (nil: none). Called once per ended attempt, from the step that ends it: the results slot is
-- written, the succeeded count goes up once per member (whatever its slot held before), and the group that
-- is not final yet takes its outcome: SUCCEEDED with the last success (then stored in the same step), DEAD
-- or CANCELLED with the first member that ends so.
local function member_ended(gid, id, state, at, res, callid, queues)
  local gk = gkey('g', gid)
  local group = redis.call('HMGET', gk, 'n', 'o')
  if not group[1] then return end  -- purged (or damaged): nothing to keep up to date
  local rk = gkey('gr', gid)
  local slot = string.sub(state, 1, 1)
  if state == 'succeeded' then
    slot = 'n'
    if res then slot = 's' .. res end
  end
  -- The member's first end writes its slot in one command; a later one (requeued) looks at what it held: a
  -- success stays (and is counted once).
  if redis.call('HSETNX', rk, id, slot) == 0 then
    local prev = redis.call('HGET', rk, id)
    if string.sub(prev, 1, 1) == 's' or prev == 'n' then
      if state == 'succeeded' then return end
    else
      redis.call('HSET', rk, id, slot)
    end
  end
  if state == 'succeeded' then
    local ok = redis.call('HINCRBY', gk, 'ok', 1)
    if not group[2] and ok >= tonumber(group[1]) then group_succeeded(gid, at, callid, queues) end
  elseif not group[2] then
    group_final(gid, state, at, {})
  end
end
-- Store the header of a group at src[b] (id, created_at, has meta, meta, has then, then's 16 values when it
-- has one) with member ids `ids` (stored by the caller, each with g); by enqueue call callid. A group
-- without members succeeds at once.
local function group_stored(src, b, ids, callid, queues)
  local gid = src[b]
  local fields = {'n', #ids, 'ok', '0', 'c', src[b + 1], 'x', callid}
  if src[b + 2] == '1' then
    fields[#fields + 1] = 'meta'
    fields[#fields + 1] = src[b + 3]
  end
  redis.call('HSET', gkey('g', gid), unpack(fields))
  bulk('RPUSH', gkey('gm', gid), ids)
  if src[b + 4] == '1' then redis.call('RPUSH', gkey('gt', gid), unpack(src, b + 5, b + 20)) end
  if #ids == 0 then group_succeeded(gid, src[b + 1], callid, queues) end
end
-- A claim or reclaim call's log: the ids it leased, each as enc(id), in one string that expires after ttl
-- seconds (one SET, where a list took an RPUSH and an EXPIRE).
local function logged(log, ids, ttl)
  local parts = {}
  for j = 1, #ids do parts[j] = enc(ids[j]) end
  redis.call('SET', log, table.concat(parts), 'EX', ttl)
end
-- A claim or reclaim call retried after a dropped connection: return what the first execution leased
-- (text: its log's value).
local function replay(text, callid)
  local out, ids = {}, {}
  local at = 1
  while at <= #text do
    local colon = string.find(text, ':', at, true)
    local size = colon and tonumber(string.sub(text, at, colon - 1))
    if not size then break end  -- not what logged() writes: the ids read so far
    ids[#ids + 1] = string.sub(text, colon + 1, colon + size)
    at = colon + size + 1
  end
  for i, id in ipairs(ids) do
    local key = rkey(id)
    local token = callid .. ':' .. i
    local k = redis.call('HGET', key, 'k')
    if k == token or k == token .. 'g' then
      local rec = read(key)
      if rec[4] == 'active' then emit(out, k, id, rec) end
    end
  end
  return out
end
local function forget(previous)
  if previous ~= '' then redis.call('DEL', P .. 'c:' .. previous) end
end
"""

PRELUDE = (
    _PRELUDE_HEAD + _PRELUDE_LOCATE + _PRELUDE_PLACE + _PRELUDE_MOVES + _PRELUDE_STORE + _PRELUDE_NOTICES
)
"""The functions every script of the backend may use, defined at the start of each script."""

# ARGV: P, call id, then the 16 values of one task (see store()) whose id the engine generated, so no record
# can hold it, and that opens no uniqueness window and is no group member: the single enqueue's path, with
# no existence check. Returns 1. A retry of the call (its reply was lost) runs the general script below
# instead, which finds the record this call stored by its call id.
# What store(ARGV, 3, INCR seq, call id, nil, queues) and announce(queues) do, the same commands in the same
# order, written out without the prelude: defining the prelude's functions and tables on every call was a
# third of the script's time on the server (test_redis_single_enqueue compares what both paths store).
_ENQUEUE_NEW = """
local P, id, q, flags = ARGV[1], ARGV[3], ARGV[5], ARGV[11]
local enqueued_at, run_at, prio, ex, rs = ARGV[9], ARGV[10], ARGV[13], ARGV[15], ARGV[18]
local o = string.format('%016x', redis.call('INCR', P .. 'seq'))
local cm = rs .. o .. id
if string.byte(flags, 4) == 49 then
  -- pscore(prio): the ready-set score, minus the priority
  local score = '0'
  if prio ~= '0' then
    local digits = prio
    local negative = string.sub(prio, 1, 1) == '-'
    if negative then digits = string.sub(prio, 2) end
    if #digits > 0 and #digits <= 15 and string.match(digits, '^%d+$') and tonumber(digits) ~= 0 then
      if negative then score = digits else score = '-' .. digits end
    end
  end
  redis.call('ZADD', P .. 'rd:' .. q, score, cm)
else
  redis.call('ZADD', P .. 'dl:' .. q, run_at, cm)
end
if ex ~= '' and tonumber(ex) then
  local xs = run_at
  if tonumber(ex) > tonumber(run_at) then xs = ex end
  redis.call('ZADD', P .. 'x:' .. q, xs, id)
end
local fields = {'n', ARGV[4], 'q', q, 'p', ARGV[6], 's', 'pending', 'a', '0', 'm', ARGV[7], 'to', ARGV[8],
  'e', enqueued_at, 'r', run_at, 'o', o, 'c', ARGV[2], 'rs', rs}
if string.byte(flags, 1) == 49 then
  fields[#fields + 1] = 'meta'
  fields[#fields + 1] = ARGV[12]
end
if prio ~= '0' then
  fields[#fields + 1] = 'pr'
  fields[#fields + 1] = prio
end
if string.byte(flags, 2) == 49 then
  fields[#fields + 1] = 'ck'
  fields[#fields + 1] = ARGV[14]
end
if string.byte(flags, 5) == 49 then
  fields[#fields + 1] = 'ex'
  fields[#fields + 1] = ex
end
redis.call('HSET', P .. 't:' .. id, unpack(fields))
redis.call('ZADD', P .. 'i:pending:' .. q, enqueued_at, o .. id)
redis.call('SADD', P .. 'queues', q)
local w = P .. 'w:' .. q
if redis.call('EXISTS', w) == 0 then redis.call('LPUSH', w, '1') end
return 1
"""

# ARGV: P, mode ('error' | 'skip' | 'debounce' | 'group'), call id, task count, then 16 values per task (see
# store()); with 'group' (the tasks are a group's members, stored as with 'error'), then the group's header
# (see group_stored()).
# A sixth flag character '1' (not stored; only in the enqueue call's own arguments, never in a follow-up or
# then) says the engine generated the task's id: no record is looked for. The caller sends it on a call's
# first attempt only, so a repeat after a lost reply finds what the first attempt stored.
# Returns {1, flags} with one '1' (stored) or '0' (skipped) per task, or {0, {conflicting ids}} (with
# 'group', the group's id when a group with it exists). Uniqueness windows are compared with each task's
# enqueued_at (never the server's clock); a window's key expires a minute after the window, only to free
# memory.
_ENQUEUE = """
local mode, callid, n = ARGV[2], ARGV[3], tonumber(ARGV[4])
local dups, dupseen, opened = {}, {}, {}
local gid, hb = nil, nil
if mode == 'group' then
  hb = 5 + n * 16
  gid = ARGV[hb]
  local x = redis.call('HGET', gkey('g', gid), 'x')
  if x == callid then return {1, string.rep('1', n)} end  -- stored by this very call, before a retry
  if x then return {0, {gid}} end
end
local function conflict(id)
  if not dupseen[id] then
    dups[#dups + 1] = id
    dupseen[id] = true
  end
end
-- Whether a window on the unique key of the task at ARGV[b] (opened earlier in this batch, or stored) ends
-- after its enqueued_at.
local function refused(b)
  if string.byte(ARGV[b + 8], 3) ~= 49 then return false end
  local ends = nil
  local mine = opened[ARGV[b + 13]]
  if mine then
    ends = tonumber(ARGV[mine + 14])
  else
    local v = redis.call('GET', P .. 'uq:' .. ARGV[b + 13])
    if v then
      local e, cid = string.match(v, '^(%S+) (.*)$')
      if cid ~= callid then ends = tonumber(e) end  -- else opened by this very call, before a retry
    end
  end
  return ends ~= nil and ends > tonumber(ARGV[b + 6])
end
local function opens(b)
  if string.byte(ARGV[b + 8], 3) == 49 then opened[ARGV[b + 13]] = b end
end
local queues = {}
local flags = {}
if mode == 'debounce' then
  for i = 1, n do
    local b = 5 + (i - 1) * 16
    if refused(b) then conflict(ARGV[b]) end
    opens(b)
  end
  if #dups > 0 then return {0, dups} end
  local touched = {}
  for i = 1, n do
    local b = 5 + (i - 1) * 16
    local id = ARGV[b]
    local key = rkey(id)
    local cur = redis.call('HMGET', key, 's', 'q', 'o', 'c')
    if cur[4] == callid and not touched[id] then
      -- applied by this very call, before a retry
    elseif not (cur[1] or cur[2] or cur[3]) then
      store(ARGV, b, redis.call('INCR', P .. 'seq'), callid, nil, queues)
    else
      local where = locate(id, cur[1], cur[2], cur[3]) or {}
      if where[1] == 'pending' then
        -- Take the new fields; attempts, enqueued_at and the enqueue sequence stay.
        local q0, member, score = where[2], where[3], where[4]
        local o = string.sub(member, 1, 16)
        local old = redis.call('HMGET', key, 'w', 'rs', 'n', 'ck')
        nudge(q0, old[3], old[4], unplace(id, q0, old[1], old[2], o))
        local q = ARGV[b + 2]
        if q ~= q0 then
          redis.call('ZREM', idx('pending', q0), member)
          redis.call('ZADD', idx('pending', q), score, member)
        end
        redis.call('HDEL', key, 'meta', 'pr', 'ck', 'ex')
        local due = string.byte(ARGV[b + 8], 4) == 49
        place(id, q, o, ARGV[b + 7], ARGV[b + 15], ARGV[b + 10], ARGV[b + 12], due)
        local fields = {'n', ARGV[b + 1], 'q', q, 'p', ARGV[b + 3], 's', 'pending', 'm', ARGV[b + 4],
          'to', ARGV[b + 5], 'r', ARGV[b + 7], 'c', callid, 'rs', ARGV[b + 15]}
        optional(fields, ARGV, b)
        redis.call('HSET', key, unpack(fields))
        queues[q] = true
      elseif where[1] == 'active' then
        -- One follow-up run, which the running attempt's settlement turns into the next PENDING period.
        local fk = P .. 'fu:' .. id
        redis.call('DEL', fk)
        redis.call('RPUSH', fk, unpack(ARGV, b, b + 15))
        redis.call('HSET', key, 'fu', '1', 'c', callid)
      else
        store(ARGV, b, redis.call('INCR', P .. 'seq'), callid, where, queues)
      end
    end
    touched[id] = true
    flags[i] = '1'
  end
else
  local plan, seen = {}, {}
  local fresh = 0
  for i = 1, n do
    local b = 5 + (i - 1) * 16
    local id = ARGV[b]
    local cur = nil
    if seen[id] then
      -- repeated in the batch
    elseif string.byte(ARGV[b + 8], 6) == 49 then
      cur = {}  -- the engine generated the id: no record holds it (the caller's first attempt only)
    else
      cur = redis.call('HMGET', rkey(id), 's', 'q', 'o', 'c')
    end
    if mode == 'error' or gid then
      local bad = seen[id] or refused(b)
      if not bad then
        if cur[4] == callid then
          plan[i] = 1  -- stored by this very call, before a retry
        elseif not (cur[1] or cur[2] or cur[3]) then
          plan[i] = 2
          fresh = fresh + 1
        else
          local where = locate(id, cur[1], cur[2], cur[3]) or {}
          if where[1] == 'pending' or where[1] == 'active' then
            bad = true
          else
            plan[i] = where
            fresh = fresh + 1
          end
        end
      end
      if bad then
        conflict(id)
        plan[i] = 0
      end
      seen[id] = true
      opens(b)
    elseif seen[id] then
      plan[i] = 0
    elseif cur[4] == callid then
      plan[i] = 1
      seen[id] = true
    elseif cur[1] or cur[2] or cur[3] or refused(b) then
      plan[i] = 0
    else
      plan[i] = 2
      fresh = fresh + 1
      seen[id] = true
      opens(b)
    end
  end
  if #dups > 0 then return {0, dups} end
  local seq = 0
  if fresh > 0 then seq = redis.call('INCRBY', P .. 'seq', fresh) - fresh end
  DEFER = true
  for i = 1, n do
    local p = plan[i]
    if p == 0 then
      flags[i] = '0'
    elseif p == 1 then
      flags[i] = '1'
    else
      seq = seq + 1
      if p == 2 then p = nil end
      local extra = nil
      if gid then extra = {'g', gid} end
      store(ARGV, 5 + (i - 1) * 16, seq, callid, p, queues, extra)
      flags[i] = '1'
    end
  end
  if gid then
    local ids = {}
    for i = 1, n do ids[i] = ARGV[5 + (i - 1) * 16] end
    group_stored(ARGV, hb, ids, callid, queues)
  end
  added()
end
for key, b in pairs(opened) do
  local ms = math.ceil((tonumber(ARGV[b + 14]) - tonumber(ARGV[b + 6])) * 1000)
  if ms > 0 then
    redis.call('SET', P .. 'uq:' .. key, ARGV[b + 14] .. ' ' .. callid, 'PX', string.format('%d', ms + 60000))
  end
end
announce(queues)
return {1, table.concat(flags)}
"""

# ARGV: P, now, lease_until, limit, call id, previous call id or ''. Returns like the claim script (without
# its first value). A lease whose record is gone, or sits in no active index, is dropped instead of taken
# over (and its running-set entries with it); a damaged state or queue field is restored from the indexes.
_RECLAIM = """
local now, lease, limit, callid = ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5]
forget(ARGV[6])
local log = P .. 'c:' .. callid
local before = redis.call('GET', log)
if before then return replay(before, callid) end
local out, taken, stale = {}, {}, {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', P .. 'leases', '-inf', '(' .. now, 'LIMIT', 0, limit)) do
  local key = rkey(id)
  local cur = redis.call('HMGET', key, 's', 'q', 'o', 'rn', 'g')
  local where = locate(id, 'active', cur[2], cur[3])
  if where and where[1] == 'active' then
    taken[#taken + 1] = id
    local token = callid .. ':' .. #taken
    if cur[5] then token = token .. 'g' end  -- a group member's token says so (see the settle script)
    local set = {'l', lease, 'k', token}
    if cur[1] ~= 'active' then
      set[#set + 1] = 's'
      set[#set + 1] = 'active'
    end
    if cur[2] ~= where[2] then
      set[#set + 1] = 'q'
      set[#set + 1] = where[2]
    end
    redis.call('HSET', key, unpack(set))
    redis.call('ZADD', P .. 'leases', lease, id)
    emit(out, token, id, read(key))
  else
    stale[#stale + 1] = id
    if cur[4] then
      release(id, cur[4])
    elseif not (cur[1] or cur[2] or cur[3]) then
      -- The record was deleted behind the backend's back: its id is in running sets no script can name.
      -- For a while, claims check the running sets they find at a limit (see the claim script).
      redis.call('SET', P .. 'check', '1', 'EX', 300)
    end
  end
end
if #stale > 0 then bulk('ZREM', P .. 'leases', stale) end
released()
if #taken > 0 then
  logged(log, taken, %(ttl)d)
end
return out
"""

# ARGV: P, lease_until, then (id, token) pairs. Returns the ids whose lease was lost.
_EXTEND = """
local lease = ARGV[2]
local lost = {}
for i = 3, #ARGV, 2 do
  local id, token = ARGV[i], ARGV[i + 1]
  local key = rkey(id)
  local cur = redis.call('HMGET', key, 's', 'k')
  if cur[1] == 'active' and cur[2] == token then
    redis.call('HSET', key, 'l', lease)
    redis.call('ZADD', P .. 'leases', lease, id)
  else
    lost[#lost + 1] = id
  end
end
return lost
"""

# ARGV: P, call id, seconds the call's marker lasts, '1' when the server has ZMSCORE (else '0') followed by
# 'q' when the calling backend object's notices subscription is up (see the end; else '-') and by the ids of
# earlier settle calls, each after a space, whose outcome the caller never learned (their replies were lost
# and their retries gave up) and whose settlements this call repeats, then per settlement: id,
# token, state, at, run_at, run_at as sortable hex, flags (4 characters '0'/'1': has error,
# has result, refund attempt, has groups), error, result, follow-up count, 16 values per follow-up task;
# with groups, then the group count, and per group: its member count, its header (see group_stored()), 16
# values per member.
# A group member's lease token ends in 'g' (the claim and reclaim scripts make it so), so the record's group
# field is read only for members: a plain settlement pays nothing for groups.
# Returns the ids whose lease was lost. A call that applied settlements leaves a marker {P}:sc:<call id> that
# expires after the given seconds (longer than the caller retries), so the same call repeated (a retry after
# a dropped connection), or a later call that names it, counts a settlement it finds applied with its token
# and verdict as applied and changes nothing, while any other call with that token finds the lease gone (a
# second settlement of one lease in one call is left out by the caller): so a group member's success is
# counted in its group once, by the one execution that applied it (and member_ended() counts a member once in
# any case). A settlement that left its task PENDING is listed in {P}:sr:<call id> besides, because a claim
# may have leased the task again before the repeat (a new token): the repeat finds it there.
# Publishes the settled ids (one 's' notice), unless the caller's own subscription (which skips it) is the
# channel's only one.
_SETTLE = """
local callid, marker = ARGV[2], P .. 'sc:' .. ARGV[2]
local lost, queues, requeued = {}, {}, {}
local RAN, CALLS = nil, nil
-- This call and the earlier calls it repeats (named in ARGV[4] after its first two characters).
local function calls()
  if not CALLS then
    CALLS = {callid}
    for earlier in string.gmatch(string.sub(ARGV[4], 3), '[^ ]+') do CALLS[#CALLS + 1] = earlier end
  end
  return CALLS
end
-- Whether an earlier execution of this very call, or one of the earlier calls it repeats, applied
-- settlements (its reply was lost).
local function ran()
  if RAN == nil then
    RAN = false
    for _, c in ipairs(calls()) do
      if redis.call('EXISTS', P .. 'sc:' .. c) == 1 then RAN = true; break end
    end
  end
  return RAN
end
-- Whether one of those applied this settlement (this verdict of this lease) and left its task PENDING (see
-- {P}:sr:<call id>).
local function requeued_before(id, token, state)
  local entry = token .. ' ' .. state .. ' ' .. id
  for _, c in ipairs(calls()) do
    if redis.call('SISMEMBER', P .. 'sr:' .. c, entry) == 1 then return true end
  end
  return false
end
DEFER = true  -- each task is stored or placed at most once per call
-- Sorted-set changes are collected per key and made at the end, many members per command.
local removals, additions = {}, {}
-- The keys of those, built once per call.
local LEASES, IKEYS = P .. 'leases', {}
local function ikey(state, q)
  local byq = IKEYS[state]
  if not byq then
    byq = {}
    IKEYS[state] = byq
  end
  local key = byq[q]
  if not key then
    key = idx(state, q)
    byq[q] = key
  end
  return key
end
local function later(map, key, a, b)
  local list = map[key]
  if not list then list = {}; map[key] = list end
  list[#list + 1] = a
  if b ~= nil then list[#list + 1] = b end
end
-- A group to store is a block: its member count, its header (at the block's start + 1, see group_stored()),
-- then its members. Where the block's members start.
local function members_at(g0)
  if ARGV[g0 + 5] == '1' then return g0 + 22 end
  return g0 + 6
end
-- Where the settlement at ARGV[i] ends (the next one starts): after its follow-ups and its groups.
local function entry_end(i)
  local j = i + 10 + tonumber(ARGV[i + 9]) * 16
  if string.byte(ARGV[i + 6], 4) == 49 then
    local ngroups = tonumber(ARGV[j])
    j = j + 1
    for _ = 1, ngroups do j = members_at(j) + tonumber(ARGV[j]) * 16 end
  end
  return j
end
-- First pass, reads only: every record's fields (a group member's group too), and (with ZMSCORE, Redis 6.2+)
-- the active-index scores of the records whose lease the call holds, one command per queue instead of one
-- ZSCORE per task. A second settlement of the same id in the call reads again in its turn (the first one's
-- writes come before it).
local CUR, SCORE, SEEN, NEXT = {}, {}, {}, {}
local probes = {}
local ZMS = string.byte(ARGV[4], 1) == 49
local i = 5
while i <= #ARGV do
  local id = ARGV[i]
  if not SEEN[id] then
    SEEN[id] = true
    local cur
    if string.byte(ARGV[i + 1], -1) == 103 then  -- a group member's token: its group field too
      cur = redis.call('HMGET', rkey(id), 's', 'k', 'q', 'o', 'a', 'fu', 'rn', 'g')
    else
      cur = redis.call('HMGET', rkey(id), 's', 'k', 'q', 'o', 'a', 'fu', 'rn')
    end
    CUR[i] = cur
    if ZMS and cur[1] == 'active' and cur[2] == ARGV[i + 1] and type(cur[3]) == 'string'
        and type(cur[4]) == 'string' then
      later(probes, cur[3], i)
    end
  end
  NEXT[i] = entry_end(i)
  i = NEXT[i]
end
for q, at in pairs(probes) do
  local members = {}
  for j = 1, #at do members[j] = CUR[at[j]][4] .. ARGV[at[j]] end
  for j0 = 1, #members, 4000 do
    local j1 = math.min(j0 + 3999, #members)
    local scores = redis.pcall('ZMSCORE', idx('active', q), unpack(members, j0, j1))
    -- An error (a server without ZMSCORE after a failover, say): locate() finds each one in its turn.
    if scores.err then scores = {} end
    for j = j0, j1 do SCORE[at[j]] = {'active', q, members[j], scores[j - j0 + 1]} end
  end
end
i = 5
while i <= #ARGV do
  local id, token, state, at, run_at, run_rs = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4],
    ARGV[i + 5]
  local flags, err, res = ARGV[i + 6], ARGV[i + 7], ARGV[i + 8]
  local nthen = tonumber(ARGV[i + 9])
  local first = i + 10
  local ngroups, gfirst = 0, first + nthen * 16
  if string.byte(flags, 4) == 49 then
    ngroups = tonumber(ARGV[gfirst])
    gfirst = gfirst + 1
  end
  local key = rkey(id)
  local cur = CUR[i] or redis.call('HMGET', key, 's', 'k', 'q', 'o', 'a', 'fu', 'rn')
  -- The record's place in the indexes (and its index score) comes from the indexes themselves, so a damaged
  -- queue or enqueued_at field cannot misplace it; a record no active index holds is left to recovery.
  local where = SCORE[i]
  if where and not where[4] then where = nil end
  if not where and cur[1] == 'active' and cur[2] == token then
    where = locate(id, 'active', cur[3], cur[4])
  end
  i = NEXT[i] or entry_end(i)
  if where and where[1] == 'active' then
    local q, member, score = where[2], where[3], where[4]
    local o = string.sub(member, 1, 16)
    later(removals, LEASES, id)
    later(removals, ikey('active', q), member)
    release(id, cur[7])
    local follow = nil
    if cur[6] == '1' then
      local fk = P .. 'fu:' .. id
      follow = redis.call('LRANGE', fk, 0, -1)
      redis.call('DEL', fk)
      -- Damaged (not 16 values, or an enqueued_at or run_at that is no finite number, which ZADD and the
      -- comparison below would fail the whole call on, for good): settle as if there were none.
      if #follow ~= 16 then
        follow = nil
      else
        for _, v in ipairs({follow[7], follow[8]}) do
          local n = tonumber(v)
          if not n or n ~= n or n == math.huge or n == -math.huge then follow = nil end
        end
      end
    end
    if follow then
      -- The debounced follow-up: the record's next PENDING period, with the follow-up's fields.
      local t = follow
      local r, rs = t[8], t[16]
      if state == 'pending' and tonumber(run_at) > tonumber(r) then r, rs = run_at, run_rs end
      local nq = t[3]
      redis.call('HDEL', key, 'meta', 'pr', 'ck', 'ex', 'res', 'fu', 'cr')
      place(id, nq, o, r, rs, t[11], t[13], at)
      local set = {'n', t[2], 'q', nq, 'p', t[4], 's', 'pending', 'a', '0', 'm', t[5], 'to', t[6], 'e', t[7],
        'r', r, 'st', '', 'f', '', 'l', '', 'rs', rs, 'sv', state}
      optional(set, t, 1)
      if string.byte(flags, 1) == 49 then
        set[#set + 1] = 'err'
        set[#set + 1] = err
      end
      redis.call('HSET', key, unpack(set))
      later(additions, idx('pending', nq), t[7], member)
      queues[nq] = true
      requeued[#requeued + 1] = token .. ' ' .. state .. ' ' .. id
    else
      local set = {'s', state, 'l', ''}
      if cur[6] then
        set[#set + 1] = 'fu'
        set[#set + 1] = ''
      end
      if string.byte(flags, 1) == 49 then
        set[#set + 1] = 'err'
        set[#set + 1] = err
      end
      if cur[3] ~= q then
        set[#set + 1] = 'q'
        set[#set + 1] = q
      end
      if state == 'pending' then
        local flow = redis.call('HMGET', key, 'pr', 'ex')
        place(id, q, o, run_at, run_rs, flow[1], flow[2], at)
        set[#set + 1] = 'r'
        set[#set + 1] = run_at
        set[#set + 1] = 'rs'
        set[#set + 1] = run_rs
        local attempts = count(cur[5])
        if string.byte(flags, 3) == 49 and attempts and attempts > 0 then
          set[#set + 1] = 'a'
          set[#set + 1] = string.format('%d', attempts - 1)
        end
        redis.call('HSET', key, unpack(set))
        later(additions, idx('pending', q), score, member)
        queues[q] = true
        requeued[#requeued + 1] = token .. ' ' .. state .. ' ' .. id
      else
        set[#set + 1] = 'f'
        set[#set + 1] = at
        local result = nil
        if string.byte(flags, 2) == 49 then
          set[#set + 1] = 'res'
          set[#set + 1] = res
          result = res
        end
        redis.call('HSET', key, unpack(set))
        later(additions, ikey(state, q), score, member)
        if string.byte(token, -1) == 103 then  -- 'g': a group member
          local gid = cur[8]  -- read with the record (false: none), or not yet when the id came again
          if gid == nil then gid = redis.call('HGET', key, 'g') end
          if gid then member_ended(gid, id, state, at, result, callid, queues) end
        end
      end
    end
    for t = 0, nthen - 1 do
      local b = first + t * 16
      if redis.call('EXISTS', rkey(ARGV[b])) == 0 then
        store(ARGV, b, redis.call('INCR', P .. 'seq'), callid, nil, queues)
      end
    end
    local g0 = gfirst
    for _ = 1, ngroups do
      local m, mb = tonumber(ARGV[g0]), members_at(g0)
      local gid = ARGV[g0 + 1]
      if redis.call('EXISTS', gkey('g', gid)) == 0 then
        local ids = {}
        for j = 1, m do
          local b = mb + (j - 1) * 16
          ids[j] = ARGV[b]
          if redis.call('EXISTS', rkey(ARGV[b])) == 0 then
            store(ARGV, b, redis.call('INCR', P .. 'seq'), callid, nil, queues, {'g', gid})
          end
        end
        group_stored(ARGV, g0 + 1, ids, callid, queues)
      end
      g0 = mb + m * 16
    end
  elseif not ((cur[2] == token and (cur[1] == state or redis.call('HGET', key, 'sv') == state) and ran())
      or requeued_before(id, token, state)) then
    lost[#lost + 1] = id
  end
end
for key, list in pairs(removals) do bulk('ZREM', key, list) end
for key, list in pairs(additions) do bulk('ZADD', key, list) end
added()
released()
announce(queues)
local settled = removals[LEASES]  -- the ids of the settlements applied, in order
if settled then
  redis.call('SET', marker, '1', 'EX', ARGV[3])
  if #requeued > 0 then
    local list = P .. 'sr:' .. callid
    bulk('SADD', list, requeued)
    redis.call('EXPIRE', list, ARGV[3])
  end
  -- The settling backend object skips its own notice: when its subscription is the channel's only one (the
  -- caller says it has one: 'q' after the ZMSCORE flag), nobody would read it, so it is not sent.
  local alone = false
  if string.byte(ARGV[4], 2) == 113 then
    local subscribed = redis.pcall('PUBSUB', 'NUMSUB', P .. 'notices')
    alone = type(subscribed) == 'table' and tonumber(subscribed[2]) == 1
  end
  if not alone then publish('s:' .. string.match(callid, '^[^.]*'), settled) end  -- the object's nonce
end
return lost
"""

SETTLE_PLAIN_BOUND = 1000
"""A settle call of at most this many settlements may take the plain path (see ``_SETTLE_PLAIN``)."""

# The settle script's plain path, before the prelude: a call whose every settlement ends a task this call
# holds the lease of as SUCCEEDED, DEAD or CANCELLED, with no then, no group to store, no group membership, no
# debounce follow-up, whose name has no parked tasks waiting for a slot, and no id twice. It reads everything
# first and writes what the general part below writes for such a call (the record's fields, the lease and
# index moves, the running sets, the call marker, the notice), then returns; anything else, or anything
# unusual it reads (a lost lease, a record no active index holds under its o field, damaged fields), is left
# to the general part with nothing written. Defining the prelude's functions and tables on every call was
# most of what the server spent on the single settlement of an idle worker, which runs between a task's
# start and the next enqueue's claim (test_redis_plain_settle compares what both paths store).
_SETTLE_PLAIN = """
local n = (#ARGV - 4) / 10
if n >= 1 and n <= %(plain)d and n == math.floor(n) then
  local P = ARGV[1]
  local plain, SEEN, NAMES = true, {}, {}
  -- Per settlement: its record key, queue, claim member and active-index score; per running set the ids it
  -- loses (in call order, as released() collects them), the sets in first-seen order.
  local KEY, Q, MEMBER, SCORE, REL, RELKEYS = {}, {}, {}, {}, {}, {}
  -- With ZMSCORE (Redis 6.2+), the active-index scores of several settlements are read with one command
  -- per queue, as the general part reads them; the settlements to look up, per queue, in call order. A
  -- single settlement (an idle worker's) reads its score with ZSCORE, for fewer instructions.
  local ZMS, probes, pqueues = n > 1 and string.byte(ARGV[4], 1) == 49, {}, {}
  for j = 1, n do
    local i = 5 + (j - 1) * 10
    local id, token, state, flags = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 6]
    if SEEN[id] or ARGV[i + 9] ~= '0' or string.byte(flags, 4) ~= 48 or string.byte(token, -1) == 103
        or not (state == 'succeeded' or state == 'dead' or state == 'cancelled') then
      plain = false
      break
    end
    SEEN[id] = true
    local key = P .. 't:' .. id
    local cur = redis.call('HMGET', key, 's', 'k', 'q', 'o', 'rn', 'fu')
    if cur[1] ~= 'active' or cur[2] ~= token or type(cur[3]) ~= 'string' or type(cur[4]) ~= 'string'
        or cur[6] then
      plain = false
      break
    end
    local q, member = cur[3], cur[4] .. id
    KEY[j], Q[j], MEMBER[j] = key, q, member
    if ZMS then
      local list = probes[q]
      if not list then
        list = {}
        probes[q] = list
        pqueues[#pqueues + 1] = q
      end
      list[#list + 1] = j
    else
      SCORE[j] = redis.call('ZSCORE', P .. 'i:active:' .. q, member)
      if not SCORE[j] then
        plain = false
        break
      end
    end
    -- release(id, rn): the running sets its rn field names; a name with parked tasks goes to the general
    -- part (released() rechecks them).
    local rn = cur[5]
    if type(rn) == 'string' then
      local size, rest = string.match(rn, '^(%d+):(.*)$')
      if size then
        size = tonumber(size)
        local N = string.sub(rest, 1, size)
        if not NAMES[N] then
          NAMES[N] = true
          if redis.call('EXISTS', P .. 'hq:' .. N) == 1 then
            plain = false
            break
          end
        end
        local sets = {'an:' .. N}
        if #rest > size then sets[2] = 'ak:' .. #N .. ':' .. N .. string.sub(rest, size + 2) end
        for _, setkey in ipairs(sets) do
          local ids = REL[setkey]
          if not ids then
            ids = {}
            REL[setkey] = ids
            RELKEYS[#RELKEYS + 1] = setkey
          end
          ids[#ids + 1] = id
        end
      end
    end
  end
  if plain and ZMS then
    for _, q in ipairs(pqueues) do
      local at, members = probes[q], {}
      for k = 1, #at do members[k] = MEMBER[at[k]] end
      local scores = redis.pcall('ZMSCORE', P .. 'i:active:' .. q, unpack(members))
      if scores.err then  -- a server without ZMSCORE after a failover, say: the general part's
        plain = false
        break
      end
      for k = 1, #at do
        if not scores[k] then
          plain = false
          break
        end
        SCORE[at[k]] = scores[k]
      end
      if not plain then break end
    end
  end
  if plain then
    -- The writes: each record, then the sorted sets (the leases, the active indexes, the final indexes:
    -- each key once, many members per command), then the running sets.
    local ids, removals, additions, rkeys, akeys = {}, {}, {}, {}, {}
    for j = 1, n do
      local i = 5 + (j - 1) * 10
      local id, state, at, flags = ARGV[i], ARGV[i + 2], ARGV[i + 3], ARGV[i + 6]
      local set = {'s', state, 'l', ''}
      if string.byte(flags, 1) == 49 then
        set[#set + 1] = 'err'
        set[#set + 1] = ARGV[i + 7]
      end
      set[#set + 1] = 'f'
      set[#set + 1] = at
      if string.byte(flags, 2) == 49 then
        set[#set + 1] = 'res'
        set[#set + 1] = ARGV[i + 8]
      end
      redis.call('HSET', KEY[j], unpack(set))
      ids[j] = id
      local act = P .. 'i:active:' .. Q[j]
      local list = removals[act]
      if not list then
        list = {}
        removals[act] = list
        rkeys[#rkeys + 1] = act
      end
      list[#list + 1] = MEMBER[j]
      local fin = P .. 'i:' .. state .. ':' .. Q[j]
      list = additions[fin]
      if not list then
        list = {}
        additions[fin] = list
        akeys[#akeys + 1] = fin
      end
      list[#list + 1] = SCORE[j]
      list[#list + 1] = MEMBER[j]
    end
    redis.call('ZREM', P .. 'leases', unpack(ids))
    for _, key in ipairs(rkeys) do redis.call('ZREM', key, unpack(removals[key])) end
    for _, key in ipairs(akeys) do redis.call('ZADD', key, unpack(additions[key])) end
    for _, setkey in ipairs(RELKEYS) do redis.call('SREM', P .. setkey, unpack(REL[setkey])) end
    local callid = ARGV[2]
    redis.call('SET', P .. 'sc:' .. callid, '1', 'EX', ARGV[3])
    -- The notice, as the general part sends it (see there).
    local alone = false
    if string.byte(ARGV[4], 2) == 113 then
      local subscribed = redis.pcall('PUBSUB', 'NUMSUB', P .. 'notices')
      alone = type(subscribed) == 'table' and tonumber(subscribed[2]) == 1
    end
    if not alone then
      redis.pcall('PUBLISH', P .. 'notices', 's:' .. string.match(callid, '^[^.]*') .. '\\0'
        .. table.concat(ids, '\\0'))
    end
    return {}
  end
end
"""

# ARGV: P, layout version. Records the layout version on first use; returns the stored version.
_LAYOUT = """
redis.call('SET', P .. 'layout', ARGV[2], 'NX')
return redis.call('GET', P .. 'layout')
"""


@dataclass(frozen=True)
class LuaScript:
    """One script: its name (for messages), full source (the prelude included) and SHA1 (for EVALSHA)."""

    name: str
    source: str
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha", hashlib.sha1(self.source.encode()).hexdigest())


def script(name: str, body: str, *, prelude: str = PRELUDE, **numbers: int) -> LuaScript:
    """The script ``name``: the shared prelude (or the part of it given as ``prelude``, or none, as for the
    claim, whose body holds the prelude after its plain path) followed by ``body``, with ``%(name)d``
    placeholders filled from ``numbers`` (``ttl``, the claim call log's lifetime, is always given)."""
    for placeholder, value in {"ttl": CALL_LOG_TTL, **numbers}.items():
        body = body.replace(f"%({placeholder})d", str(value))
    return LuaScript(name, prelude + body)


WORKER_SCRIPTS: dict[str, LuaScript] = {
    found.name: found
    for found in (
        script("enqueue", _ENQUEUE),
        # The single enqueue's script is written out without the prelude (see _ENQUEUE_NEW).
        LuaScript("enqueue_new", _ENQUEUE_NEW),
        script("reclaim", _RECLAIM),
        script("extend", _EXTEND),
        # The prelude after the plain path, which returns before it is defined (see _SETTLE_PLAIN).
        script("settle", _SETTLE_PLAIN + PRELUDE + _SETTLE, prelude="", plain=SETTLE_PLAIN_BOUND),
        script("layout", _LAYOUT),
    )
}
"""The scripts of the worker's path (and of opening), by name; the claim's are in ``_lua_claim``."""
