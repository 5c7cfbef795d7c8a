"""The Lua scripts of the Redis backend's hot path, and the key layout every script shares.

Every state change of :class:`~lifecycle.asynctask.redis.RedisBackend` is one script (operator actions are in
``_redis_lua_admin``).

Each script receives the key prefix ``{name}:`` as ``ARGV[1]`` and one declared key (``{name}:seq``) so that
Redis Cluster routes it; every key a script builds starts with the same ``{name}`` hash tag, so all of them
live in the declared key's slot. The key layout (documented in ``docs/backends.md``):

- ``{P}:t:<id>``           hash, the record. Fields: n name, q queue, p payload, s state, a attempts,
                           m max_retries, to timeout, e enqueued_at, r run_at, st started_at, f finished_at,
                           l lease_until, err last_error, res result, meta meta, o enqueue sequence (16 hex
                           digits), k lease token, c id of the enqueue call, x id of the last cancel/requeue
                           call. Times are the engine's floats as Python ``repr`` text; ``""`` means None for
                           to/st/f/l; err/res/meta are absent when None.
- ``{P}:r:<queue>``        sorted set of the queue's PENDING tasks, score run_at, member ``o .. id`` (so
                           equal run_at falls back to enqueue order): what claims take from.
- ``{P}:i:<state>:<queue>`` sorted set per queue and state, score enqueued_at, member ``o .. id``: stats,
                           listing, requeue and purge.
- ``{P}:leases``           sorted set of ACTIVE task ids by lease_until: what reclaim takes from.
- ``{P}:w:<queue>``        list holding at most one wake-up token; idle workers block on it (BLPOP).
- ``{P}:u:<nonce>``        one waiting backend object's alarm list: it pushes to it itself to end its own
                           BLPOP exactly on time (Redis ends blocking commands up to 100 ms late).
- ``{P}:queues``           set of queue names seen; ``{P}:seq`` enqueue counter; ``{P}:layout`` version.
- ``{P}:c:<call id>``      list of task ids one claim/reclaim call leased (expires), so a call retried after
                           a dropped connection returns the same tasks instead of leasing more.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

__all__ = ["CALL_LOG_TTL", "LAYOUT_VERSION", "PRELUDE", "WORKER_SCRIPTS", "LuaScript", "script"]

LAYOUT_VERSION = 1
"""Version of the key layout; stored in ``{P}:layout``. A newer one is refused at open."""

CALL_LOG_TTL = 300
"""Seconds a claim call's log survives, so a retry after a dropped connection can find its tasks."""

PRELUDE = """
local P = ARGV[1]
local FIELDS = {'n', 'q', 'p', 's', 'a', 'm', 'to', 'e', 'r', 'st', 'f', 'l', 'err', 'res', 'meta'}
local STATES = {'pending', 'active', 'succeeded', 'dead', 'cancelled'}
local function rkey(id) return P .. 't:' .. id end
local function idx(state, q) return P .. 'i:' .. state .. ':' .. q end
local function ready(q) return P .. 'r:' .. q end
local function read(key) return redis.call('HMGET', key, unpack(FIELDS)) end
local function wake(q)
  local key = P .. 'w:' .. q
  redis.call('LPUSH', key, '1')
  redis.call('LTRIM', key, 0, 0)
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
  for i = 1, 15 do out[#out + 1] = rec[i] end
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
-- Store ARGV[b .. b+9] (id, name, queue, payload, max_retries, timeout, enqueued_at, run_at, has_meta, meta)
-- as a fresh PENDING record with enqueue sequence number seq. old (a record with the same id that is
-- replaced): its locate() result, or {} when no index holds it.
local function store(b, seq, callid, old, queues)
  local id, q = ARGV[b], ARGV[b + 2]
  local key = rkey(id)
  if old then
    if old[3] then redis.call('ZREM', idx(old[1], old[2]), old[3]) end
    redis.call('DEL', key)
  end
  local o = string.format('%016x', seq)
  local member = o .. id
  if ARGV[b + 8] == '1' then
    redis.call('HSET', key, 'n', ARGV[b + 1], 'q', q, 'p', ARGV[b + 3], 's', 'pending', 'a', '0',
      'm', ARGV[b + 4], 'to', ARGV[b + 5], 'e', ARGV[b + 6], 'r', ARGV[b + 7], 'o', o, 'c', callid,
      'meta', ARGV[b + 9])
  else
    redis.call('HSET', key, 'n', ARGV[b + 1], 'q', q, 'p', ARGV[b + 3], 's', 'pending', 'a', '0',
      'm', ARGV[b + 4], 'to', ARGV[b + 5], 'e', ARGV[b + 6], 'r', ARGV[b + 7], 'o', o, 'c', callid)
  end
  redis.call('ZADD', ready(q), ARGV[b + 7], member)
  redis.call('ZADD', idx('pending', q), ARGV[b + 6], member)
  queues[q] = true
end
-- A claim or reclaim call retried after a dropped connection: return what the first execution leased.
local function replay(log, callid)
  local out = {}
  for i, id in ipairs(redis.call('LRANGE', log, 0, -1)) do
    local key = rkey(id)
    local token = callid .. ':' .. i
    if redis.call('HGET', key, 'k') == token then
      local rec = read(key)
      if rec[4] == 'active' then emit(out, token, id, rec) end
    end
  end
  return out
end
local function forget(previous)
  if previous ~= '' then redis.call('DEL', P .. 'c:' .. previous) end
end
"""

# ARGV: P, mode ('error' | 'skip'), call id, task count, then 10 values per task (see store()).
# Returns {1, flags} with one '1' (stored) or '0' (skipped) per task, or {0, {conflicting ids}}.
_ENQUEUE = """
local mode, callid, n = ARGV[2], ARGV[3], tonumber(ARGV[4])
local plan, seen, dups, dupseen = {}, {}, {}, {}
local fresh = 0
for i = 0, n - 1 do
  local id = ARGV[5 + i * 10]
  if seen[id] then
    if mode == 'error' and not dupseen[id] then dups[#dups + 1] = id; dupseen[id] = true end
    plan[i] = 0
  else
    seen[id] = true
    local cur = redis.call('HMGET', rkey(id), 's', 'q', 'o', 'c')
    if cur[4] == callid then
      plan[i] = 1  -- stored by this very call, before a retry
    elseif not (cur[1] or cur[2] or cur[3]) then
      plan[i] = 2
      fresh = fresh + 1
    elseif mode == 'skip' then
      plan[i] = 0
    else
      local where = locate(id, cur[1], cur[2], cur[3]) or {}
      if where[1] == 'pending' or where[1] == 'active' then
        if not dupseen[id] then dups[#dups + 1] = id; dupseen[id] = true end
        plan[i] = 0
      else
        plan[i] = where
        fresh = fresh + 1
      end
    end
  end
end
if #dups > 0 then return {0, dups} end
local seq = 0
if fresh > 0 then seq = redis.call('INCRBY', P .. 'seq', fresh) - fresh end
local flags, queues = {}, {}
for i = 0, n - 1 do
  local p = plan[i]
  if p == 0 then
    flags[i + 1] = '0'
  elseif p == 1 then
    flags[i + 1] = '1'
  else
    seq = seq + 1
    if p == 2 then p = nil end
    store(5 + i * 10, seq, callid, p, queues)
    flags[i + 1] = '1'
  end
end
announce(queues)
return {1, table.concat(flags)}
"""

# ARGV: P, now, lease_until, limit, call id, previous call id or '', queues... in priority order.
# Returns 17 values per claimed task: token, id, the 15 record FIELDS. Every record's change stands alone: a
# damaged field is never computed with (the record is leased and returned as stored, for the engine to
# report), and an index entry whose record is gone is dropped.
_CLAIM = """
local now, lease, limit, callid = ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5]
forget(ARGV[6])
local log = P .. 'c:' .. callid
if redis.call('EXISTS', log) == 1 then return replay(log, callid) end
local out, ids, leases = {}, {}, {}
local n = 0
for qi = 7, #ARGV do
  if n >= limit then break end
  local q = ARGV[qi]
  local rk, pk = ready(q), idx('pending', q)
  -- Again while entries whose record is gone (dropped, not claimed) left the batch short.
  while n < limit do
    local members = redis.call('ZRANGEBYSCORE', rk, '-inf', now, 'LIMIT', 0, limit - n)
    if #members == 0 then break end
    local active = {}
    for _, member in ipairs(members) do
      local id = string.sub(member, 17)
      local key = rkey(id)
      local rec = read(key)
      if rec[1] or rec[2] or rec[4] or redis.call('EXISTS', key) == 1 then
        n = n + 1
        local token = callid .. ':' .. n
        -- The active index is scored by enqueued_at; the pending index holds the same score when the
        -- record's own field is damaged.
        local score = tonumber(rec[8])
        if not score or score ~= score then score = tonumber(redis.call('ZSCORE', pk, member)) or 0 end
        local attempts = count(rec[5])
        local set = {'s', 'active', 'st', now, 'l', lease, 'k', token}
        if attempts then
          rec[5] = string.format('%d', attempts + 1)
          set[#set + 1] = 'a'
          set[#set + 1] = rec[5]
        end
        if rec[2] ~= q then  -- the queue field is damaged: the index says which queue holds the record
          rec[2] = q
          set[#set + 1] = 'q'
          set[#set + 1] = q
        end
        redis.call('HSET', key, unpack(set))
        rec[4], rec[10], rec[12] = 'active', now, lease
        active[#active + 1] = score
        active[#active + 1] = member
        leases[#leases + 1] = lease
        leases[#leases + 1] = id
        ids[n] = id
        emit(out, token, id, rec)
      end
    end
    bulk('ZREM', rk, members)
    bulk('ZREM', pk, members)
    if #active > 0 then bulk('ZADD', idx('active', q), active) end
  end
end
if n >= limit then
  -- More may be due than this call could take: wake another idle worker for the first queue that has some.
  for qi = 7, #ARGV do
    if redis.call('ZRANGEBYSCORE', ready(ARGV[qi]), '-inf', now, 'LIMIT', 0, 1)[1] then
      wake(ARGV[qi])
      break
    end
  end
end
if n > 0 then
  bulk('ZADD', P .. 'leases', leases)
  bulk('RPUSH', log, ids)
  redis.call('EXPIRE', log, %(ttl)d)
end
return out
"""

# ARGV: P, now, lease_until, limit, call id, previous call id or ''. Returns like the claim script. A lease
# whose record is gone, or sits in no active index, is dropped instead of taken over; a damaged state or
# queue field is restored from the indexes.
_RECLAIM = """
local now, lease, limit, callid = ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5]
forget(ARGV[6])
local log = P .. 'c:' .. callid
if redis.call('EXISTS', log) == 1 then return replay(log, callid) end
local out, taken, stale = {}, {}, {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', P .. 'leases', '-inf', '(' .. now, 'LIMIT', 0, limit)) do
  local key = rkey(id)
  local cur = redis.call('HMGET', key, 's', 'q', 'o')
  local where = locate(id, 'active', cur[2], cur[3])
  if where and where[1] == 'active' then
    taken[#taken + 1] = id
    local token = callid .. ':' .. #taken
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
  end
end
if #stale > 0 then bulk('ZREM', P .. 'leases', stale) end
if #taken > 0 then
  bulk('RPUSH', log, taken)
  redis.call('EXPIRE', log, %(ttl)d)
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

# ARGV: P, call id, then per settlement: id, token, state, at, run_at, flags (3 characters '0'/'1': has
# error, has result, refund attempt), error, result, follow-up count, 10 values per follow-up task.
# Returns the ids whose lease was lost. A settlement repeated with the same token and verdict (a retry after
# a dropped connection) counts as applied and changes nothing.
_SETTLE = """
local callid = ARGV[2]
local lost, queues = {}, {}
-- Sorted-set changes are collected per key and made at the end, many members per command.
local removals, additions = {}, {}
local function later(map, key, a, b)
  local list = map[key]
  if not list then list = {}; map[key] = list end
  list[#list + 1] = a
  if b ~= nil then list[#list + 1] = b end
end
local i = 3
while i <= #ARGV do
  local id, token, state, at, run_at, flags = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4],
    ARGV[i + 5]
  local nthen = tonumber(ARGV[i + 8])
  local first = i + 9
  local err, res = ARGV[i + 6], ARGV[i + 7]
  i = first + nthen * 10
  local key = rkey(id)
  local cur = redis.call('HMGET', key, 's', 'k', 'q', 'o', 'a')
  -- The record's place in the indexes (and its index score) comes from the indexes themselves, so a damaged
  -- queue or enqueued_at field cannot misplace it; a record no active index holds is left to recovery.
  local where = nil
  if cur[1] == 'active' and cur[2] == token then where = locate(id, 'active', cur[3], cur[4]) end
  if where and where[1] == 'active' then
    local q, member, score = where[2], where[3], where[4]
    later(removals, P .. 'leases', id)
    later(removals, idx('active', q), member)
    local set = {'s', state, 'l', ''}
    if string.sub(flags, 1, 1) == '1' then
      set[#set + 1] = 'err'
      set[#set + 1] = err
    end
    if cur[3] ~= q then
      set[#set + 1] = 'q'
      set[#set + 1] = q
    end
    if state == 'pending' then
      set[#set + 1] = 'r'
      set[#set + 1] = run_at
      local attempts = count(cur[5])
      if string.sub(flags, 3, 3) == '1' and attempts and attempts > 0 then
        set[#set + 1] = 'a'
        set[#set + 1] = string.format('%d', attempts - 1)
      end
      redis.call('HSET', key, unpack(set))
      later(additions, ready(q), run_at, member)
      later(additions, idx('pending', q), score, member)
      queues[q] = true
    else
      set[#set + 1] = 'f'
      set[#set + 1] = at
      if string.sub(flags, 2, 2) == '1' then
        set[#set + 1] = 'res'
        set[#set + 1] = res
      end
      redis.call('HSET', key, unpack(set))
      later(additions, idx(state, q), score, member)
    end
    for t = 0, nthen - 1 do
      local b = first + t * 10
      if redis.call('EXISTS', rkey(ARGV[b])) == 0 then
        store(b, redis.call('INCR', P .. 'seq'), callid, nil, queues)
      end
    end
  elseif not (cur[2] == token and cur[1] == state) then
    lost[#lost + 1] = id
  end
end
for key, list in pairs(removals) do bulk('ZREM', key, list) end
for key, list in pairs(additions) do bulk('ZADD', key, list) end
announce(queues)
return lost
"""

# ARGV: P, alarm key, queues... Drops stale wake-up tokens (and the caller's alarm) and returns {run_at,
# member} of the PENDING task of the queues that is due first (or nil). Atomic, so a wake-up pushed after it
# is never lost and one pushed before is reflected in what it returns.
_PREPARE_WAIT = """
redis.call('DEL', ARGV[2])
local best = nil
for i = 3, #ARGV do
  local q = ARGV[i]
  redis.call('DEL', P .. 'w:' .. q)
  local first = redis.call('ZRANGE', ready(q), 0, 0, 'WITHSCORES')
  if first[2] and (best == nil or tonumber(first[2]) < tonumber(best[1])) then best = {first[2], first[1]} end
end
return best
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


def script(name: str, body: str) -> LuaScript:
    """The script ``name``: the shared prelude followed by ``body``."""
    return LuaScript(name, PRELUDE + body.replace("%(ttl)d", str(CALL_LOG_TTL)))


WORKER_SCRIPTS: dict[str, LuaScript] = {
    found.name: found
    for found in (
        script("enqueue", _ENQUEUE),
        script("claim", _CLAIM),
        script("reclaim", _RECLAIM),
        script("extend", _EXTEND),
        script("settle", _SETTLE),
        script("prepare_wait", _PREPARE_WAIT),
        script("layout", _LAYOUT),
    )
}
"""The scripts of the worker's path (and of opening), by name."""
