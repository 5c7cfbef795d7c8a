"""The Lua scripts of the Redis backend's hot path, and the key layout every script shares.

Every state change of :class:`~lifecycle.asynctask.redis.RedisBackend` is one script (the claim, with every
flow-control rule, is in ``_lua_claim``; operator actions in ``_lua_admin``).

Each script receives the key prefix ``{name}:`` as ``ARGV[1]`` and one declared key (``{name}:seq``) so that
Redis Cluster routes it; every key a script builds starts with the same ``{name}`` hash tag, so all of them
live in the declared key's slot. The key layout, version 2 (documented in ``docs/backends.md``):

- ``{P}:t:<id>``           hash, the record. Fields: n name, q queue, p payload, s state, a attempts,
                           m max_retries, to timeout, e enqueued_at, r run_at, st started_at, f finished_at,
                           l lease_until, err last_error, res result, meta meta, pr priority, ck concurrency
                           key, ex expires_at; and the backend's own: o enqueue sequence (16 hex digits), k
                           lease token, c id of the enqueue call, x id of the last cancel/requeue call, w
                           which claim structure holds the PENDING task (a key suffix), rs run_at as 16 hex
                           digits that sort as the times do, fu ``1`` while a debounce follow-up waits, sv
                           the verdict a settlement applied before a follow-up replaced it. Times are the
                           engine's floats as Python ``repr`` text; ``""`` means None for to/st/f/l;
                           err/res/meta/pr/ck/ex are absent when None (pr when 0).
- Claim structures of a queue's PENDING tasks, all with the member ``rs .. o .. id`` (a "claim member"):
  ``{P}:dl:<queue>`` (delayed: score run_at; a claim moves the due ones to ready), ``{P}:rd:<queue>``
  (ready: score minus the priority, so the highest priority comes first and equal priorities sort by the
  member: run_at, then enqueue order), ``{P}:h:<queue held by>`` (parked: tasks a claim found held back by a
  flow limit, scored like ready; see ``_lua_claim``).
- ``{P}:x:<queue>``        sorted set of the queue's PENDING tasks that have an expiry, score the later of
                           run_at and expires_at, member id: what claims cancel as expired.
- ``{P}:i:<state>:<queue>`` sorted set per queue and state, score enqueued_at, member ``o .. id``: stats,
                           listing, requeue and purge; the truth about where a record is.
- ``{P}:leases``           sorted set of ACTIVE task ids by lease_until: what reclaim takes from.
- ``{P}:an:<name>``, ``{P}:ak:<len>:<name><key>`` sets of the ACTIVE task ids of a name, and of a name and
  concurrency key; ``{P}:ar`` hash id -> the name and key it was counted under (so every way out of ACTIVE
  removes it from exactly the sets it was added to).
- ``{P}:hs:<queue>``, ``{P}:hk:<len>:<queue><name>``, ``{P}:hq:<name>``: parked tasks' bookkeeping (see
  ``_lua_claim``); ``{P}:tb`` hash name -> rate bucket ``"tokens as_of"``; ``{P}:paused`` set of paused
  queues; ``{P}:uq:<unique key>`` uniqueness window ``"until call_id"`` (expires after the window);
  ``{P}:fu:<id>`` list, the debounce follow-up of an ACTIVE task (the 15 values of a new task).
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

LAYOUT_VERSION = 2
"""Version of the key layout; stored in ``{P}:layout``. A newer one is refused at open, an older one is
migrated (``_lua_claim``'s ``migrate`` script): version 1 had one ``{P}:r:<queue>`` set scored by run_at, no
priorities, keys, expiry or running-task sets."""

CALL_LOG_TTL = 300
"""Seconds a claim call's log survives, so a retry after a dropped connection can find its tasks."""

PRELUDE = """
local P = ARGV[1]
local FIELDS = {'n', 'q', 'p', 's', 'a', 'm', 'to', 'e', 'r', 'st', 'f', 'l', 'err', 'res', 'meta', 'pr',
  'ck', 'ex'}
local STATES = {'pending', 'active', 'succeeded', 'dead', 'cancelled'}
local EXPIRED = 'expired before it started'
local function rkey(id) return P .. 't:' .. id end
local function idx(state, q) return P .. 'i:' .. state .. ':' .. q end
local function ready(q) return P .. 'rd:' .. q end
local function delayed(q) return P .. 'dl:' .. q end
local function expiring(q) return P .. 'x:' .. q end
local function enc(s) return #s .. ':' .. s end
local function read(key) return redis.call('HMGET', key, unpack(FIELDS)) end
local WOKEN = {}
local function wake(q)
  if WOKEN[q] then return end
  WOKEN[q] = true
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
-- A time as 16 hex digits that sort (as text) the way the times do: the IEEE double, big-endian, with the
-- sign bit flipped for positive numbers and every bit flipped for negative ones.
local function sortable(x)
  local b = {string.byte(struct.pack('>d', x), 1, 8)}
  if b[1] >= 128 then
    for i = 1, 8 do b[i] = 255 - b[i] end
  else
    b[1] = b[1] + 128
  end
  return string.format('%02x%02x%02x%02x%02x%02x%02x%02x', unpack(b))
end
-- The ready-set score of a stored priority: minus it, so that the highest priority sorts first; 0 for a
-- missing or unreadable value (the record reads as priority 0 then, too).
local function pscore(p)
  if type(p) ~= 'string' then return '0' end
  local digits = p
  local negative = string.sub(p, 1, 1) == '-'
  if negative then digits = string.sub(p, 2) end
  if #digits == 0 or #digits > 15 or not string.match(digits, '^%d+$') or tonumber(digits) == 0 then
    return '0'
  end
  if negative then return digits end
  return '-' .. digits
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
-- Put PENDING task id (enqueue sequence o) into queue q's claim structures: ready when due by `now` (the
-- caller's time: an enqueue's enqueued_at, a settlement's at), else delayed; and into the expiry set when it
-- has an expiry. Returns the record's new w and rs fields (the caller writes them).
local function place(id, q, o, run_at, prio, ex, now)
  local rs = sortable(tonumber(run_at))
  local cm = rs .. o .. id
  local w
  if tonumber(run_at) <= tonumber(now) then
    w = 'rd:' .. q
    redis.call('ZADD', P .. w, pscore(prio), cm)
  else
    w = 'dl:' .. q
    redis.call('ZADD', P .. w, run_at, cm)
  end
  if type(ex) == 'string' and ex ~= '' and tonumber(ex) then
    local xs = run_at
    if tonumber(ex) > tonumber(run_at) then xs = ex end
    redis.call('ZADD', expiring(q), xs, id)
  end
  return w, rs
end
-- Take PENDING task id of queue q out of its claim structure (w and rs: its record's fields; o: its enqueue
-- sequence) and out of the expiry set. Returns the key suffix it was taken from (nil: none held it). A
-- parked task unparked by a claim keeps w naming its parked set, so the ready and delayed sets are tried too.
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
-- Task id leaves ACTIVE (settled, purged, or its lease found stale): remove it from the running sets it was
-- counted in (as its {P}:ar entry says, whatever its fields hold now; at most once) and recheck the parked
-- tasks of its name in every queue that has some.
local function release(id)
  local d = redis.call('HGET', P .. 'ar', id)
  if not d then return end
  redis.call('HDEL', P .. 'ar', id)
  local size, rest = string.match(d, '^(%d+):(.*)$')
  if not size then return end
  size = tonumber(size)
  local N = string.sub(rest, 1, size)
  local K = nil
  if #rest > size then K = string.sub(rest, size + 2) end
  redis.call('SREM', P .. 'an:' .. N, id)
  if K then redis.call('SREM', P .. 'ak:' .. enc(N) .. K, id) end
  for _, q in ipairs(redis.call('SMEMBERS', P .. 'hq:' .. N)) do signal(q, N, K) end
end
-- The 15 values describing one new task (see the codec's new_task_args), from ARGV[b] on.
local function args_task(b)
  local t = {}
  for j = 0, 14 do t[j + 1] = ARGV[b + j] end
  return t
end
-- Append new task t's optional record fields (meta, priority, key, expiry) to an HSET field list.
local function optional(fields, t)
  if string.sub(t[9], 1, 1) == '1' then
    fields[#fields + 1] = 'meta'
    fields[#fields + 1] = t[10]
  end
  if t[11] ~= '0' then
    fields[#fields + 1] = 'pr'
    fields[#fields + 1] = t[11]
  end
  if string.sub(t[9], 2, 2) == '1' then
    fields[#fields + 1] = 'ck'
    fields[#fields + 1] = t[12]
  end
  if t[13] ~= '' then
    fields[#fields + 1] = 'ex'
    fields[#fields + 1] = t[13]
  end
end
-- Store new task t as a fresh PENDING record with enqueue sequence number seq. old (a record with the same
-- id that is replaced, in a final state): its locate() result, or {} when no index holds it.
local function store(t, seq, callid, old, queues)
  local id, q = t[1], t[3]
  local key = rkey(id)
  if old then
    if old[3] then redis.call('ZREM', idx(old[1], old[2]), old[3]) end
    redis.call('DEL', key)
  end
  local o = string.format('%016x', seq)
  local w, rs = place(id, q, o, t[8], t[11], t[13], t[7])
  local fields = {'n', t[2], 'q', q, 'p', t[4], 's', 'pending', 'a', '0', 'm', t[5], 'to', t[6], 'e', t[7],
    'r', t[8], 'o', o, 'c', callid, 'w', w, 'rs', rs}
  optional(fields, t)
  redis.call('HSET', key, unpack(fields))
  redis.call('ZADD', idx('pending', q), t[7], o .. id)
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

# ARGV: P, mode ('error' | 'skip' | 'debounce'), call id, task count, then 15 values per task (see store()).
# Returns {1, flags} with one '1' (stored) or '0' (skipped) per task, or {0, {conflicting ids}}. Uniqueness
# windows are compared with each task's enqueued_at (never the server's clock); a window's key expires a
# minute after the window, only to free memory.
_ENQUEUE = """
local mode, callid, n = ARGV[2], ARGV[3], tonumber(ARGV[4])
local tasks = {}
for i = 1, n do tasks[i] = args_task(5 + (i - 1) * 15) end
local dups, dupseen, opened = {}, {}, {}
local function conflict(id)
  if not dupseen[id] then
    dups[#dups + 1] = id
    dupseen[id] = true
  end
end
-- Whether a window on t's unique key (opened earlier in this batch, or stored) ends after t's enqueued_at.
local function refused(t)
  if string.sub(t[9], 3, 3) ~= '1' then return false end
  local ends = nil
  local mine = opened[t[14]]
  if mine then
    ends = tonumber(mine[15])
  else
    local v = redis.call('GET', P .. 'uq:' .. t[14])
    if v then
      local e, cid = string.match(v, '^(%S+) (.*)$')
      if cid ~= callid then ends = tonumber(e) end  -- else opened by this very call, before a retry
    end
  end
  return ends ~= nil and ends > tonumber(t[7])
end
local function opens(t)
  if string.sub(t[9], 3, 3) == '1' then opened[t[14]] = t end
end
local queues = {}
local flags = {}
if mode == 'debounce' then
  for i = 1, n do
    if refused(tasks[i]) then conflict(tasks[i][1]) end
    opens(tasks[i])
  end
  if #dups > 0 then return {0, dups} end
  local touched = {}
  for i = 1, n do
    local t = tasks[i]
    local id = t[1]
    local key = rkey(id)
    local cur = redis.call('HMGET', key, 's', 'q', 'o', 'c')
    if cur[4] == callid and not touched[id] then
      -- applied by this very call, before a retry
    elseif not (cur[1] or cur[2] or cur[3]) then
      store(t, redis.call('INCR', P .. 'seq'), callid, nil, queues)
    else
      local where = locate(id, cur[1], cur[2], cur[3]) or {}
      if where[1] == 'pending' then
        -- Take the new fields; attempts, enqueued_at and the enqueue sequence stay.
        local q0, member, score = where[2], where[3], where[4]
        local o = string.sub(member, 1, 16)
        local old = redis.call('HMGET', key, 'w', 'rs', 'n', 'ck')
        nudge(q0, old[3], old[4], unplace(id, q0, old[1], old[2], o))
        local q = t[3]
        if q ~= q0 then
          redis.call('ZREM', idx('pending', q0), member)
          redis.call('ZADD', idx('pending', q), score, member)
        end
        redis.call('HDEL', key, 'meta', 'pr', 'ck', 'ex')
        local w, rs = place(id, q, o, t[8], t[11], t[13], t[7])
        local fields = {'n', t[2], 'q', q, 'p', t[4], 's', 'pending', 'm', t[5], 'to', t[6], 'r', t[8],
          'c', callid, 'w', w, 'rs', rs}
        optional(fields, t)
        redis.call('HSET', key, unpack(fields))
        queues[q] = true
      elseif where[1] == 'active' then
        -- One follow-up run, which the running attempt's settlement turns into the next PENDING period.
        local fk = P .. 'fu:' .. id
        redis.call('DEL', fk)
        redis.call('RPUSH', fk, unpack(t))
        redis.call('HSET', key, 'fu', '1', 'c', callid)
      else
        store(t, redis.call('INCR', P .. 'seq'), callid, where, queues)
      end
    end
    touched[id] = true
    flags[i] = '1'
  end
else
  local plan, seen = {}, {}
  local fresh = 0
  for i = 1, n do
    local t = tasks[i]
    local id = t[1]
    local cur = nil
    if not seen[id] then cur = redis.call('HMGET', rkey(id), 's', 'q', 'o', 'c') end
    if mode == 'error' then
      local bad = seen[id] or refused(t)
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
      opens(t)
    elseif seen[id] then
      plan[i] = 0
    elseif cur[4] == callid then
      plan[i] = 1
      seen[id] = true
    elseif cur[1] or cur[2] or cur[3] or refused(t) then
      plan[i] = 0
    else
      plan[i] = 2
      fresh = fresh + 1
      seen[id] = true
      opens(t)
    end
  end
  if #dups > 0 then return {0, dups} end
  local seq = 0
  if fresh > 0 then seq = redis.call('INCRBY', P .. 'seq', fresh) - fresh end
  for i = 1, n do
    local p = plan[i]
    if p == 0 then
      flags[i] = '0'
    elseif p == 1 then
      flags[i] = '1'
    else
      seq = seq + 1
      if p == 2 then p = nil end
      store(tasks[i], seq, callid, p, queues)
      flags[i] = '1'
    end
  end
end
for key, t in pairs(opened) do
  local ms = math.ceil((tonumber(t[15]) - tonumber(t[7])) * 1000)
  if ms > 0 then
    redis.call('SET', P .. 'uq:' .. key, t[15] .. ' ' .. callid, 'PX', string.format('%d', ms + 60000))
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
    release(id)
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
# error, has result, refund attempt), error, result, follow-up count, 15 values per follow-up task.
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
  i = first + nthen * 15
  local key = rkey(id)
  local cur = redis.call('HMGET', key, 's', 'k', 'q', 'o', 'a', 'pr', 'ex', 'fu', 'sv')
  -- The record's place in the indexes (and its index score) comes from the indexes themselves, so a damaged
  -- queue or enqueued_at field cannot misplace it; a record no active index holds is left to recovery.
  local where = nil
  if cur[1] == 'active' and cur[2] == token then where = locate(id, 'active', cur[3], cur[4]) end
  if where and where[1] == 'active' then
    local q, member, score = where[2], where[3], where[4]
    local o = string.sub(member, 1, 16)
    later(removals, P .. 'leases', id)
    later(removals, idx('active', q), member)
    release(id)
    local follow = nil
    if cur[8] == '1' then
      local fk = P .. 'fu:' .. id
      follow = redis.call('LRANGE', fk, 0, -1)
      redis.call('DEL', fk)
      if #follow ~= 15 then follow = nil end  -- damaged: settle as if there were none
    end
    if follow then
      -- The debounced follow-up: the record's next PENDING period, with the follow-up's fields.
      local t = follow
      local r = t[8]
      if state == 'pending' and tonumber(run_at) > tonumber(r) then r = run_at end
      local nq = t[3]
      redis.call('HDEL', key, 'meta', 'pr', 'ck', 'ex', 'res', 'fu')
      local w, rs = place(id, nq, o, r, t[11], t[13], at)
      local set = {'n', t[2], 'q', nq, 'p', t[4], 's', 'pending', 'a', '0', 'm', t[5], 'to', t[6], 'e', t[7],
        'r', r, 'st', '', 'f', '', 'l', '', 'w', w, 'rs', rs, 'sv', state}
      optional(set, t)
      if string.sub(flags, 1, 1) == '1' then
        set[#set + 1] = 'err'
        set[#set + 1] = err
      end
      redis.call('HSET', key, unpack(set))
      later(additions, idx('pending', nq), t[7], member)
      queues[nq] = true
    else
      local set = {'s', state, 'l', ''}
      if cur[8] then
        set[#set + 1] = 'fu'
        set[#set + 1] = ''
      end
      if string.sub(flags, 1, 1) == '1' then
        set[#set + 1] = 'err'
        set[#set + 1] = err
      end
      if cur[3] ~= q then
        set[#set + 1] = 'q'
        set[#set + 1] = q
      end
      if state == 'pending' then
        local w, rs = place(id, q, o, run_at, cur[6], cur[7], at)
        set[#set + 1] = 'r'
        set[#set + 1] = run_at
        set[#set + 1] = 'w'
        set[#set + 1] = w
        set[#set + 1] = 'rs'
        set[#set + 1] = rs
        local attempts = count(cur[5])
        if string.sub(flags, 3, 3) == '1' and attempts and attempts > 0 then
          set[#set + 1] = 'a'
          set[#set + 1] = string.format('%d', attempts - 1)
        end
        redis.call('HSET', key, unpack(set))
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
    end
    for t = 0, nthen - 1 do
      local b = first + t * 15
      if redis.call('EXISTS', rkey(ARGV[b])) == 0 then
        store(args_task(b), redis.call('INCR', P .. 'seq'), callid, nil, queues)
      end
    end
  elseif not (cur[2] == token and (cur[1] == state or cur[9] == state)) then
    lost[#lost + 1] = id
  end
end
for key, list in pairs(removals) do bulk('ZREM', key, list) end
for key, list in pairs(additions) do bulk('ZADD', key, list) end
announce(queues)
return lost
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


def script(name: str, body: str, **numbers: int) -> LuaScript:
    """The script ``name``: the shared prelude followed by ``body``, with ``%(name)d`` placeholders filled
    from ``numbers`` (``ttl``, the claim call log's lifetime, is always given)."""
    for placeholder, value in {"ttl": CALL_LOG_TTL, **numbers}.items():
        body = body.replace(f"%({placeholder})d", str(value))
    return LuaScript(name, PRELUDE + body)


WORKER_SCRIPTS: dict[str, LuaScript] = {
    found.name: found
    for found in (
        script("enqueue", _ENQUEUE),
        script("reclaim", _RECLAIM),
        script("extend", _EXTEND),
        script("settle", _SETTLE),
        script("layout", _LAYOUT),
    )
}
"""The scripts of the worker's path (and of opening), by name; the claim's are in ``_lua_claim``."""
