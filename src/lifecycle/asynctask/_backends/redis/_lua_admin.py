"""The Lua scripts of the Redis backend's operator actions (cancel, requeue, purge, stats, listing), of a
running task's reports (is its cancellation asked, its progress) and of reading groups.

They share the prelude and key layout of :mod:`lifecycle.asynctask._backends.redis._lua`.
"""

from __future__ import annotations

from ._lua import LuaScript, script

__all__ = ["ADMIN_SCRIPTS"]

# ARGV: P, at, call id, ids... Returns the ids cancelled (PENDING ones) or asked to stop (ACTIVE ones: flag
# cr set, their debounce follow-up dropped, a 'c' notice published; they keep their running slots until
# their worker settles them). A cancelled group member makes its group CANCELLED. The record's place in the
# indexes comes from locate(), so a damaged state, queue or enqueued_at field cannot make the script fail
# half-way.
_CANCEL = """
local at, callid = ARGV[2], ARGV[3]
local done, queues = {}, {}
for i = 4, #ARGV do
  local id = ARGV[i]
  local key = rkey(id)
  local cur = redis.call('HMGET', key, 's', 'q', 'o', 'x', 'w', 'rs', 'n', 'ck', 'g', 'fu')
  local where = nil
  if cur[1] or cur[2] or cur[3] then where = locate(id, cur[1], cur[2], cur[3]) end
  if where and where[1] == 'pending' then
    local q, member = where[2], where[3]
    nudge(q, cur[7], cur[8], unplace(id, q, cur[5], cur[6], string.sub(member, 1, 16)))
    redis.call('HSET', key, 's', 'cancelled', 'f', at, 'x', callid, 'q', q)
    redis.call('ZREM', idx('pending', q), member)
    redis.call('ZADD', idx('cancelled', q), where[4], member)
    if cur[9] then member_ended(cur[9], id, 'cancelled', at, nil, callid, queues) end
    notify('s', id)
    done[#done + 1] = id
  elseif where and where[1] == 'active' then
    local set = {'cr', '1', 'x', callid}
    if cur[10] then
      redis.call('DEL', P .. 'fu:' .. id)
      set[#set + 1] = 'fu'
      set[#set + 1] = ''
    end
    redis.call('HSET', key, unpack(set))
    notify('c', id)
    done[#done + 1] = id
  elseif cur[1] == 'cancelled' and cur[4] == callid then
    done[#done + 1] = id
  end
end
notified()
return done
"""

# ARGV: P, ids... Returns those ACTIVE with their cancellation asked (cr set).
_CANCEL_REQUESTS = """
local out = {}
for i = 2, #ARGV do
  local cur = redis.call('HMGET', rkey(ARGV[i]), 's', 'cr')
  if cur[1] == 'active' and cur[2] == '1' then out[#out + 1] = ARGV[i] end
end
return out
"""

# ARGV: P, then per update: id, token, flags (3 characters '0'/'1': has done, has total, has message), done,
# total, message. Stores each update whose lease is held; returns the ids whose lease was lost.
_PROGRESS = """
local lost = {}
local NAMES = {'pd', 'pt', 'pm'}
for i = 2, #ARGV, 6 do
  local id, token, flags = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local key = rkey(id)
  local cur = redis.call('HMGET', key, 's', 'k')
  if cur[1] == 'active' and cur[2] == token then
    local set, gone = {}, {}
    for j = 1, 3 do
      if string.byte(flags, j) == 49 then
        set[#set + 1] = NAMES[j]
        set[#set + 1] = ARGV[i + 2 + j]
      else
        gone[#gone + 1] = NAMES[j]
      end
    end
    if #set > 0 then redis.call('HSET', key, unpack(set)) end
    if #gone > 0 then redis.call('HDEL', key, unpack(gone)) end
  else
    lost[#lost + 1] = id
  end
end
return lost
"""

# ARGV: P, group id. Returns nil for no such group, else {{n, o, c, f, ti, meta}, member ids, their results
# slots, their records' states (false where the record is gone or names another group)}.
_GROUP = """
local gid = ARGV[2]
local header = redis.call('HMGET', gkey('g', gid), 'n', 'o', 'c', 'f', 'ti', 'meta')
if not header[1] then return nil end
local ids = redis.call('LRANGE', gkey('gm', gid), 0, -1)
local slots, states = {}, {}
local rk = gkey('gr', gid)
for j, id in ipairs(ids) do
  slots[j] = redis.call('HGET', rk, id)
  local cur = redis.call('HMGET', rkey(id), 's', 'g')
  if cur[2] == gid then states[j] = cur[1] else states[j] = false end
end
return {header, ids, slots, states}
"""

# ARGV: P, outcome, before or '', chunk. Deletes up to chunk groups that ended with outcome (before `before`,
# when given). Returns how many.
_PURGE_GROUPS = """
local fk = gkey('gf', ARGV[2])
local found
if ARGV[3] == '' then
  found = redis.call('ZRANGE', fk, 0, tonumber(ARGV[4]) - 1)
else
  found = redis.call('ZRANGEBYSCORE', fk, '-inf', '(' .. ARGV[3], 'LIMIT', 0, tonumber(ARGV[4]))
end
for _, gid in ipairs(found) do
  redis.call('DEL', gkey('g', gid), gkey('gm', gid), gkey('gr', gid), gkey('gt', gid))
end
if #found > 0 then bulk('ZREM', fk, found) end
return #found
"""

# where: the record's locate() result (a DEAD or CANCELLED place).
_REQUEUE_ONE = """
local function requeue_one(id, where, now, now_rs, callid, queues)
  local state, q, member = where[1], where[2], where[3]
  local key = rkey(id)
  local cur = redis.call('HMGET', key, 'pr', 'ex', 'cr')
  place(id, q, string.sub(member, 1, 16), now, now_rs, cur[1], cur[2], now)
  redis.call('HSET', key, 's', 'pending', 'a', '0', 'r', now, 'f', '', 'x', callid, 'k', '', 'q', q, 'rs',
    now_rs)
  if cur[3] then redis.call('HDEL', key, 'cr') end
  redis.call('ZREM', idx(state, q), member)
  redis.call('ZADD', idx('pending', q), where[4], member)
  queues[q] = true
end
"""

# ARGV: P, now, now as sortable hex, call id, ids... Returns how many moved back to PENDING.
_REQUEUE_IDS = (
    _REQUEUE_ONE
    + """
local now, now_rs, callid = ARGV[2], ARGV[3], ARGV[4]
local moved, queues = 0, {}
for i = 5, #ARGV do
  local id = ARGV[i]
  local cur = redis.call('HMGET', rkey(id), 's', 'q', 'o', 'x')
  local where = nil
  if cur[1] or cur[2] or cur[3] then where = locate(id, cur[1], cur[2], cur[3]) end
  if where and (where[1] == 'dead' or where[1] == 'cancelled') then
    requeue_one(id, where, now, now_rs, callid, queues)
    moved = moved + 1
  elseif where and where[1] == 'pending' and cur[4] == callid then
    moved = moved + 1
  end
end
announce(queues)
return moved
"""
)

# ARGV: P, now, now as sortable hex, call id, limit, has_queue ('0'/'1'), queue. Moves up to limit DEAD
# tasks; returns {moved, examined}: index entries whose record is gone are dropped and count as examined.
_REQUEUE_DEAD = (
    _REQUEUE_ONE
    + """
local now, now_rs, callid, limit = ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5])
local qs
if ARGV[6] == '1' then qs = {ARGV[7]} else qs = redis.call('SMEMBERS', P .. 'queues') end
local moved, examined, queues = 0, 0, {}
for _, q in ipairs(qs) do
  if examined >= limit then break end
  local dk = idx('dead', q)
  local page = redis.call('ZRANGE', dk, 0, limit - examined - 1, 'WITHSCORES')
  for j = 1, #page, 2 do
    local member = page[j]
    local id = string.sub(member, 17)
    examined = examined + 1
    if redis.call('EXISTS', rkey(id)) == 1 then
      requeue_one(id, {'dead', q, member, page[j + 1]}, now, now_rs, callid, queues)
      moved = moved + 1
    else
      redis.call('ZREM', dk, member)
    end
  end
end
announce(queues)
return {moved, examined}
"""
)

# ARGV: P, queue, state, before or '', offset, chunk. Deletes matching records among the next chunk
# candidates of one (queue, state) index. Returns {deleted, skipped, examined}.
_PURGE = """
local q, state, before = ARGV[2], ARGV[3], ARGV[4]
local offset, chunk = tonumber(ARGV[5]), tonumber(ARGV[6])
local ik = idx(state, q)
local members
if before == '' then
  members = redis.call('ZRANGE', ik, offset, offset + chunk - 1)
else
  members = redis.call('ZRANGEBYSCORE', ik, '-inf', '(' .. before, 'LIMIT', offset, chunk)
end
local final = state == 'succeeded' or state == 'dead' or state == 'cancelled'
local limit = tonumber(before)
local deleted, skipped = 0, 0
for _, member in ipairs(members) do
  local id = string.sub(member, 17)
  local key = rkey(id)
  local wanted = member ~= KEPT  -- an active index's (see the prelude)
  if wanted and before ~= '' and final then
    local finished = tonumber(redis.call('HGET', key, 'f') or '')
    wanted = finished ~= nil and finished < limit
  end
  if wanted then
    if state == 'pending' then
      local cur = redis.call('HMGET', key, 'w', 'rs', 'n', 'ck')
      nudge(q, cur[3], cur[4], unplace(id, q, cur[1], cur[2], string.sub(member, 1, 16)))
    elseif state == 'active' then
      redis.call('ZREM', P .. 'leases', id)
      release(id, redis.call('HGET', key, 'rn'))
    end
    redis.call('ZREM', ik, member)
    redis.call('DEL', key, P .. 'fu:' .. id)
    deleted = deleted + 1
  else
    skipped = skipped + 1
  end
end
released()
if deleted > 0 then
  local empty = true
  for _, s in ipairs(STATES) do
    if redis.call('ZCOUNT', idx(s, q), '-inf', '(+inf') > 0 then empty = false; break end
  end
  if empty then
    -- Nothing of the queue is left: drop its parked tasks' bookkeeping (their sets are empty) too.
    local hs = P .. 'hs:' .. q
    local held = redis.call('HGETALL', hs)
    for j = 1, #held, 2 do
      local N = string.sub(held[j], 2)
      redis.call('SREM', P .. 'hq:' .. N, q)
      redis.call('DEL', P .. 'hk:' .. enc(q) .. N)
    end
    redis.call('SREM', P .. 'queues', q)
    redis.call('DEL', P .. 'w:' .. q, hs, idx('active', q))
  end
  -- No lease left but KEPT (see the prelude): the set goes, as it would have emptied without it.
  if redis.call('ZCARD', P .. 'leases') == 1 and redis.call('ZSCORE', P .. 'leases', KEPT) then
    redis.call('DEL', P .. 'leases')
  end
end
return {deleted, skipped, #members}
"""

# ARGV: P. Returns queue, then the count of each of STATES, per queue.
_STATS = """
local out = {}
for _, q in ipairs(redis.call('SMEMBERS', P .. 'queues')) do
  out[#out + 1] = q
  for _, s in ipairs(STATES) do
    if s == 'active' then
      out[#out + 1] = redis.call('ZCOUNT', idx(s, q), '-inf', '(+inf')  -- without KEPT (see the prelude)
    else
      out[#out + 1] = redis.call('ZCARD', idx(s, q))
    end
  end
end
return out
"""

# ARGV: P, limit, offset, has_queue ('0'/'1'), queue, states... Returns '' (no token), id and the 23 record
# FIELDS per record, newest enqueued_at first (then the later enqueue first).
_LIST = """
local limit, offset = tonumber(ARGV[2]), tonumber(ARGV[3])
local qs
if ARGV[4] == '1' then qs = {ARGV[5]} else qs = redis.call('SMEMBERS', P .. 'queues') end
local want = offset + limit
local found = {}
for _, q in ipairs(qs) do
  for si = 6, #ARGV do
    local more = 0
    if ARGV[si] == 'active' then more = 1 end  -- KEPT comes first (see the prelude): left out
    local page = redis.call('ZREVRANGE', idx(ARGV[si], q), 0, want - 1 + more, 'WITHSCORES')
    for j = 1, #page, 2 do
      if page[j] ~= KEPT then found[#found + 1] = {tonumber(page[j + 1]), page[j]} end
    end
  end
end
table.sort(found, function(a, b)
  if a[1] ~= b[1] then return a[1] > b[1] end
  return a[2] > b[2]
end)
local out = {}
for k = offset + 1, math.min(#found, want) do
  local id = string.sub(found[k][2], 17)
  emit(out, '', id, read(rkey(id)))
end
return out
"""


ADMIN_SCRIPTS: dict[str, LuaScript] = {
    found.name: found
    for found in (
        script("cancel", _CANCEL),
        script("cancel_requests", _CANCEL_REQUESTS),
        script("progress", _PROGRESS),
        script("group", _GROUP),
        script("purge_groups", _PURGE_GROUPS),
        script("requeue_ids", _REQUEUE_IDS),
        script("requeue_dead", _REQUEUE_DEAD),
        script("purge", _PURGE),
        script("stats", _STATS),
        script("list", _LIST),
    )
}
"""The operator actions' scripts, by name."""
