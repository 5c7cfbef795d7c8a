"""The Redis backend's claim script, where every flow-control rule is enforced in one atomic step, and the
scripts that share its bookkeeping: waiting for work, pause and resume, flow_state, and the layout migration.

They share the prelude and key layout of :mod:`lifecycle.asynctask._backends.redis._lua`.

**Parking.** A task its name's limits hold back stays PENDING, but the claim moves it out of the queue's
ready set into a *parked* set, so that later claims do not look at it again until it may start: a queue whose
head is 10 000 tasks of a saturated name costs each claim nothing once they are parked (parking is bounded
per claim like everything else, see ``SCAN_BOUND``), and the tasks of other names behind them are claimed.
A parked set holds the tasks of one queue held back by one limit, scored like the ready set:

- ``{P}:h:<len>:<queue>n<name>``  held by ``max_running`` of the name;
- ``{P}:h:<len>:<queue>k<len>:<name><key>``  held by ``max_running_per_key`` of the name and key;
- ``{P}:h:<len>:<queue>r<name>``  held by the name's rate (no token in the bucket).

``{P}:hs:<queue>`` (a hash) says when each of the queue's parked sets is to be rechecked: field
``n<name>``: ``-`` (a slot was freed: now), ``+<max_running>`` (at the next freed slot, or when the limit
changes), or a time; field ``r<name>``: the time the bucket next holds a whole token (``+``: never);
field ``k<name>``: the ``max_running_per_key`` the tasks were parked under, with the per-key recheck times
in ``{P}:hk:<len>:<queue><name>`` (a sorted set of keys scored ``-inf`` now, ``+inf`` at the next freed slot
of the key, or a time). ``{P}:hq:<name>`` is the set of queues holding parked tasks of the name: whatever
frees a slot (a settlement, a purge, a stale lease dropped) marks those queues' parked sets of the name (and
key) for a recheck and wakes the queues' idle workers; whatever takes a released-but-unclaimed task away
(cancel, expiry, purge, a debounce) marks them too, so a free slot is never left unused while tasks wait.

Each claim, per queue, before taking tasks: rechecks the parked sets that are due (or whose name the caller
does not limit, or limits differently), moving back to the ready set as many as the limit now lets start
(all of them when the caller has no such limit); then takes from the ready set in order, applying the
limits to each task with the running counts and the bucket as they stand after the tasks taken so far.
"""

from __future__ import annotations

import re

from ._lua import LAYOUT_VERSION, PRELUDE, LuaScript, script

__all__ = [
    "CLAIM_SCRIPTS",
    "EXPIRE_BOUND",
    "MOVE_BOUND",
    "PLAIN_BOUND",
    "PREPARE_WAIT_PRELUDE",
    "SCAN_BOUND",
    "WAKE_GRACE",
]

SCAN_BOUND = 1000
"""Besides the tasks it leases, a claim call examines or moves at most this many ready or parked entries
(parked, expired, unparked, not due) over all its queues, so it never holds the server for more than a few
milliseconds, however many tasks wait held back. A claim that stopped at the bound says so, and the backend's
next wait returns at once, so the next claim goes on where it stopped."""

MOVE_BOUND = 1000
"""A claim call moves at most this many due delayed tasks (plus its ``limit``) to the ready sets."""

EXPIRE_BOUND = 200
"""At most this many expired tasks a claim call cancels through the expiry sets (more are cancelled when the
claim meets them in a ready set)."""

PLAIN_BOUND = 64
"""A claim of at most this many tasks may take the plain path (see ``_CLAIM_PLAIN``); a larger one reads more
than one page of a ready set, which is the general part's."""

# The prelude's KEPT member, as Lua text, for the claim's plain path that runs before the prelude.
_KEPT = re.search(r"^local KEPT = (.+)$", PRELUDE, re.MULTILINE).group(1)  # type: ignore[union-attr]

WAKE_GRACE = 1
"""Seconds a claim sent behind a wait may move its ``now`` ahead to the ``run_at`` of a ready task it may take
(see the claim script), and how far ahead of the caller's ``now`` a ready task makes ``prepare_wait`` ring.
With one clock (or clocks in step) a ready task's ``run_at`` is never ahead of the real time; this bounds
what a skewed clock can do (an expiry or a rate bucket judged that much early)."""

# ARGV: P, now, now as sortable hex, lease_until, limit, call id, previous call id or '', limit count, then
# per limited name: name, rate, per, max_running, max_running_per_key ('' when not set); then queues... in
# priority order. A claim sent behind a wait (in the same write, so it runs when the wait ends) gives instead
# of the sortable hex '@' and the key where prepare_wait stored the server's TIME when the wait began; now and
# lease_until are then the caller's, read before that, and are advanced here by the time the server measured
# since (so no clock skew between client and server enters, and now is never later than the caller's clock;
# without the key or TIME, nothing is added).
_CLAIM_HEAD = """
local P = ARGV[1]
local now, SNOW, lease, limit, callid = ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5]), ARGV[6]
if ARGV[7] ~= '' then redis.call('DEL', P .. 'c:' .. ARGV[7]) end  -- forget(ARGV[7])
local log = P .. 'c:' .. callid
local before = redis.call('GET', log)  -- a repeat of this call: the general part replays what it leased
local WAITED = not before and string.sub(SNOW, 1, 1) == '@'
local NOW = nil  -- now as a number: kept where it is computed (parsing a time's text costs as much again)
if WAITED then
  local passed = 0
  local began = redis.call('GET', string.sub(SNOW, 2))
  if began then redis.call('DEL', string.sub(SNOW, 2)) end  -- once: a later claim never measures from it
  -- Only the start stored for this very call: a stale one (left by a wait whose claim never ran, then kept
  -- across a restart) would measure from an old start and put now and lease_until ahead of the real time.
  local s0, u0, of = string.match(began or '', '^(%d+) (%d+) (.+)$')
  local t = redis.pcall('TIME')  -- refused to an ACL user without it (prepare_wait then stored nothing)
  if s0 and of == callid and not t.err then
    passed = (tonumber(t[1]) - tonumber(s0)) + (tonumber(t[2]) - tonumber(u0)) / 1000000
  end
  if passed < 0 then passed = 0 end
  NOW = tonumber(now) + passed
  now = string.format('%.17g', NOW)  -- read back as NOW exactly (17 significant digits)
  lease = string.format('%.17g', tonumber(lease) + passed)
  -- As sortable_time() does, on the double's two 32-bit halves (a third of the instructions of a byte each).
  local hi, lo = struct.unpack('>I4I4', struct.pack('>d', NOW))
  if hi >= 2147483648 then
    hi, lo = 4294967295 - hi, 4294967295 - lo
  else
    hi = hi + 2147483648
  end
  SNOW = string.format('%08x%08x', hi, lo)
end
if not NOW then NOW = tonumber(now) end
local DUE = SNOW .. 'g'
local nlim = tonumber(ARGV[8])
local qfirst = 9 + nlim * 5
local paused = {}
-- Whether no queue is paused and the queues have no expiry entries, no delayed tasks and no parked sets
-- (none of the keys exists): then the plain path's reads of them (below) would find nothing, and one command
-- stands for them all. Asked only by a claim that may take the plain path.
local CLEAR = false
if not before then
  if nlim == 0 and limit >= 1 and limit <= %(plain)d then
    local keys = {P .. 'paused'}
    for qi = qfirst, #ARGV do
      local q = ARGV[qi]
      keys[#keys + 1] = P .. 'x:' .. q
      keys[#keys + 1] = P .. 'dl:' .. q
      keys[#keys + 1] = P .. 'hs:' .. q
    end
    CLEAR = redis.call('EXISTS', unpack(keys)) == 0
  end
  if not CLEAR then
    for _, q in ipairs(redis.call('SMEMBERS', P .. 'paused')) do paused[q] = true end
  end
end
-- The first page (limit + 16 entries) of each queue's ready set, as the wait's grace step read it.
local PAGES = {}
if WAITED and limit >= 1 then
  -- Numbers given to redis.call are formatted with '%.17g' (about 2k instructions each): a string instead.
  local LAST = string.format('%d', limit + 15)
  -- Behind a wait, now moves up to the run_at of the ready tasks this claim may take (the first `limit` of
  -- each queue), by at most %(grace)d s (a bound on what a clock skewed between hosts can do): a task is in
  -- a ready set only once a clock (its enqueuer's, a settlement's, another claim's) read a time at or past
  -- its run_at, and that was before this claim runs. The enqueue that ended the wait read its clock about as
  -- long before the server ran it as this caller read its own before the wait began, so without this the
  -- claim found that task not due yet in about half the cases and left it to another round trip.
  -- Each queue's page is read as long as the plain path's first page of it (kept in PAGES for the plain
  -- path, which so reads the ready set once; nothing is written in between).
  local top, cap = SNOW, NOW + %(grace)d
  for qi = qfirst, #ARGV do
    local q = ARGV[qi]
    if not paused[q] then
      local page = redis.call('ZRANGE', P .. 'rd:' .. q, '0', LAST)
      PAGES[q] = page
      for j = 1, math.min(#page, limit) do
        local member = page[j]
        local hex = string.sub(member, 1, 16)
        if hex > top then
          local t = unsortable(hex)
          if t <= cap then
            top = hex
            now, NOW = string.format('%.17g', t), t
          end
        end
      end
    end
  end
  SNOW = top
  DUE = SNOW .. 'g'
end
-- What a claim reads of each record it takes: FIELDS without st, f and l (started_at and lease_until are
-- the claim's own; a PENDING record has no finished_at), so no lookup is spent on them (an absent field
-- costs a scan of the whole hash). The reply gives the record in FIELDS order.
local TAKEN = {'n', 'q', 'p', 's', 'a', 'm', 'to', 'e', 'r', 'err', 'res', 'meta', 'pr', 'ck', 'ex', 'cr',
  'pd', 'pt', 'pm', 'g'}
"""

# The claim's plain path, run before the prelude is defined: defining the prelude's and the general part's
# functions and tables each call cost the server about as many instructions as taking the task (callgrind).
# A claim without limits whose queues hold only ready tasks to take (no due expiry entry, no due delayed
# task, no parked set; each record whole, not expired, in its queue's indexes) is done here. It reads first;
# when it finds anything else it has written nothing and leaves the call to the general part below, which
# then does what it always did. Otherwise it writes what the general part writes for these tasks, with the
# same commands: the record's HSET, the ready, pending and expiry entries' ZREM, the active index's and the
# leases' ZADD (KEPT first in each), the running sets' SADD, the call log, and the wake-up of another idle
# worker when it took `limit` tasks.
_CLAIM_PLAIN = """
if not before and nlim == 0 and limit >= 1 and limit <= %(plain)d then
  -- The tasks to take, in order: their claim members, ids and records (k-th each); per queue its last k.
  local plan, n, plain = {}, 0, true
  local LEFTQ, PM, PI, PR = {}, {}, {}, {}
  -- The plan reads everything before it writes: a queue named twice, or an id listed twice, would be read
  -- as it was (the general part sees its own writes), so either goes to the general part.
  local SEENQ, SEENID = {}, {}
  local budget = %(scan)d  -- counted as the general part does: one that would reach the bound is its
  for qi = qfirst, #ARGV do
    if n >= limit then break end
    local q = ARGV[qi]
    if SEENQ[q] then
      plain = false
      break
    end
    SEENQ[q] = true
    if not paused[q] then
      if not CLEAR and (redis.call('ZRANGEBYSCORE', P .. 'x:' .. q, '-inf', now, 'LIMIT', '0', '1')[1]
          or redis.call('ZRANGEBYSCORE', P .. 'dl:' .. q, '-inf', now, 'LIMIT', '0', '1')[1]
          or redis.call('HGETALL', P .. 'hs:' .. q)[1]) then  -- the general part's commands, reading alike
        plain = false
        break
      end
      local want = limit - n + 16
      if budget < 16 then  -- the general part's page would be shorter
        plain = false
        break
      end
      -- The first `want` entries (want <= limit + 16: a prefix of the page the grace step read, if it did).
      local page = PAGES[q]
      local got
      if page then
        got = math.min(#page, want)
      else
        page = redis.call('ZRANGE', P .. 'rd:' .. q, '0', string.format('%d', want - 1))
        got = #page
      end
      for j = 1, got do
        local member = page[j]
        if budget <= 0 then
          plain = false
          break
        end
        if n >= limit then
          LEFTQ[q] = true
          break
        end
        if member >= DUE then
          LEFTQ[q] = true
          budget = budget - 1
        else
          local id = string.sub(member, 33)
          if SEENID[id] then
            plain = false
            break
          end
          SEENID[id] = true
          local rec = redis.call('HMGET', P .. 't:' .. id, unpack(TAKEN))
          local iscore, ex = rec[8], tonumber(rec[15])
          if not (rec[1] or rec[2] or rec[4]) or rec[2] ~= q or (ex and ex <= NOW)
              or not (iscore and #iscore <= 24 and string.find(iscore, '^%d+%.%d+$')) then
            plain = false
            break
          end
          n = n + 1
          PM[n], PI[n], PR[n] = member, id, rec
        end
      end
      if not plain then break end
      if budget <= 0 then  -- the bound reached with the page's last entry: the general part says so
        plain = false
        break
      end
      if n < limit and got == want then  -- another page to read: the general part
        plain = false
        break
      end
      plan[#plan + 1] = q
      plan[#plan + 1] = n
    end
  end
  if plain then
    local KEPT = %(kept)s
    -- With a task to take, the reply's array is made as long as its first task's values at once (every one
    -- of them is set below; growing it from one entry reallocated it five times).
    local out = n > 0 and {'0', false, false, false, false, false, false, false, false, false, false, false,
      false, false, false, false, false, false, false, false, false, false, false, false, false, false}
      or {'0'}
    local added, names, m, k = {}, {}, 1, 0
    for e = 1, #plan, 2 do
      local q, last = plan[e], plan[e + 1]
      if last > k then
        local removed, unpending, xrem = {}, {}, {}
        local active, a2 = {'+inf', KEPT}, 2  -- then the entries in reverse (see the general part's take)
        for j = last, k + 1, -1 do
          active[a2 + 1] = PR[j][8]
          active[a2 + 2] = string.sub(PM[j], 17)
          a2 = a2 + 2
        end
        while k < last do
          k = k + 1
          local member, id, rec = PM[k], PI[k], PR[k]
          -- A number concatenated is formatted with '%.14g' (about 4k instructions): string.format('%d')
          -- instead, then concatenated (its '%s' would end a name or id at a NUL byte).
          local token = callid .. ':' .. string.format('%d', k)
          if rec[20] then token = token .. 'g' end  -- a group member's token says so (see settle)
          local set = {'s', 'active', 'st', now, 'l', lease, 'k', token}
          local a = rec[5]
          if a and #a <= 15 and string.match(a, '^%d+$') then  -- as count(): a damaged value is left alone
            rec[5] = string.format('%d', tonumber(a) + 1)
            set[#set + 1] = 'a'
            set[#set + 1] = rec[5]
          end
          local N, K = rec[1], rec[14]
          if N then
            -- The running sets of its name (and key), as the general part's count_in() and rn.
            local named = names[N]
            if not named then
              named = {'an:' .. N, string.format('%d', #N) .. ':' .. N}
              names[N] = named
            end
            local list = added[named[1]]
            if not list then
              list = {}
              added[named[1]] = list
            end
            list[#list + 1] = id
            local rn = named[2]
            if K then
              local setkey = 'ak:' .. rn .. K
              list = added[setkey]
              if not list then
                list = {}
                added[setkey] = list
              end
              list[#list + 1] = id
              rn = rn .. ':' .. K
            end
            set[#set + 1] = 'rn'
            set[#set + 1] = rn
          end
          redis.call('HSET', P .. 't:' .. id, unpack(set))
          rec[4] = 'active'
          if rec[15] then xrem[#xrem + 1] = id end
          removed[#removed + 1] = member
          unpending[#unpending + 1] = string.sub(member, 17)
          -- The reply's 25 values, as the general part's taken() writes them (not defined yet here).
          out[m + 1] = token
          out[m + 2] = id
          for i = 1, 9 do out[m + 2 + i] = rec[i] end
          out[m + 12] = now
          out[m + 13] = false
          out[m + 14] = lease
          for i = 10, 20 do out[m + 5 + i] = rec[i] end
          m = m + 25
        end
        redis.call('ZREM', P .. 'rd:' .. q, unpack(removed))
        redis.call('ZREM', P .. 'i:pending:' .. q, unpack(unpending))
        if #xrem > 0 then redis.call('ZREM', P .. 'x:' .. q, unpack(xrem)) end
        redis.call('ZADD', P .. 'i:active:' .. q, unpack(active))
      end
    end
    if n >= limit then
      -- More may be due than this call could take: wake another idle worker for the first queue with some.
      for qi = qfirst, #ARGV do
        local q = ARGV[qi]
        if not paused[q] and (LEFTQ[q] or redis.call('ZRANGE', P .. 'rd:' .. q, '0', '0')[1]
            or redis.call('ZRANGEBYSCORE', P .. 'dl:' .. q, '-inf', now, 'LIMIT', '0', '1')[1]) then
          local w = P .. 'w:' .. q
          if redis.call('EXISTS', w) == 0 then redis.call('LPUSH', w, '1') end
          break
        end
      end
    end
    for setkey, list in pairs(added) do redis.call('SADD', P .. setkey, unpack(list)) end
    if n > 0 then
      local leases, parts = {'+inf', KEPT}, {}  -- KEPT first: see the prelude
      for j = 1, n do
        local id = PI[j]
        leases[2 * j + 1] = lease
        leases[2 * j + 2] = id
        parts[j] = string.format('%d', #id) .. ':' .. id  -- as logged() writes it
      end
      redis.call('ZADD', P .. 'leases', unpack(leases))
      redis.call('SET', log, table.concat(parts), 'EX', '%(ttl)d')
    end
    return out
  end
end
"""

# The general part, after the prelude: every flow-control rule, parking, expiry, delayed tasks, damaged
# records, and the replay of a repeated call.
_CLAIM = """
if before then
  local again = replay(before, callid)
  table.insert(again, 1, '0')
  return again
end
local INF = math.huge
local LIM = {}
for j = 0, nlim - 1 do
  local b = 9 + j * 5
  LIM[ARGV[b]] = {rate = tonumber(ARGV[b + 1]), per = tonumber(ARGV[b + 2]), mr = tonumber(ARGV[b + 3]),
    mk = tonumber(ARGV[b + 4])}
end
-- Whether {P}:check exists, read when first needed: only a caller with limits ever looks (see running()).
local CHECK = nil
local function check()
  if CHECK == nil then CHECK = redis.call('EXISTS', P .. 'check') == 1 end
  return CHECK
end
local budget, moves, sweeps = %(scan)d, %(moves)d + limit, %(sweeps)d
local out, ids = {'0'}, {}
local n = 0
local RUN, CHECKED, ADDED, BUCKETS, REFUSED, NAMES = {}, {}, {}, {}, {}, {}

-- The ACTIVE tasks in running set `setkey`, counted once per call, when first needed (the ids this call
-- leased so far included: they are added at the end), then kept up to date as it claims. While {P}:check
-- exists (a recovery found a leased task whose record was deleted behind the backend's back), a set at its
-- limit is checked once per call: an id whose record is gone (or in a state other than ACTIVE) is dropped,
-- so such a leak holds a slot no longer than a lease.
local function running(setkey, limit)
  local c = RUN[setkey]
  if c == nil then
    c = redis.call('SCARD', P .. setkey) + #(ADDED[setkey] or {})
    RUN[setkey] = c
  end
  if limit and c >= limit and not CHECKED[setkey] and check() then
    CHECKED[setkey] = true
    local stale = {}
    for _, id in ipairs(redis.call('SMEMBERS', P .. setkey)) do
      local s = redis.call('HGET', rkey(id), 's')
      if not s or s == 'pending' or s == 'succeeded' or s == 'dead' or s == 'cancelled' then
        stale[#stale + 1] = id
      end
    end
    if #stale > 0 then
      bulk('SREM', P .. setkey, stale)
      c = c - #stale
      RUN[setkey] = c
    end
  end
  return c
end
-- Count leased task id in running set `setkey` (written at the end of the call). A set no limit of the
-- caller asks about is never counted (running() counts ADDED when it is).
local function count_in(setkey, id)
  local c = RUN[setkey]
  if c ~= nil then RUN[setkey] = c + 1 end
  local ids = ADDED[setkey]
  if not ids then
    ids = {}
    ADDED[setkey] = ids
  end
  ids[#ids + 1] = id
end
-- Name N's rate bucket refilled to now: {tokens, at, dirty}; full when never used (or unreadable).
local function bucket(N, L)
  local b = BUCKETS[N]
  if b then return b end
  local tokens, at = nil, nil
  local raw = redis.call('HGET', P .. 'tb', N)
  if raw then
    local t, a = string.match(raw, '^(%S+) (%S+)$')
    tokens, at = tonumber(t), tonumber(a)
  end
  if not tokens or not at or tokens - tokens ~= 0 or at - at ~= 0 then  -- never used, or unreadable
    tokens, at = L.rate, NOW
  elseif NOW > at and L.per then
    tokens = tokens + (NOW - at) * L.rate / L.per
    at = NOW
  end
  if tokens > L.rate then tokens = L.rate end
  b = {tokens = tokens, at = at, dirty = false}
  BUCKETS[N] = b
  return b
end
-- When bucket b, once it holds `tokens`, next holds a whole token (text; '+' when it never refills).
local function refill_time(b, L, tokens)
  if not L.per then return '+' end
  local t = b.at + (1 - tokens) * L.per / L.rate
  if t < NOW then t = NOW end
  return string.format('%.17g', t)
end
-- nil when limits L let a task of name N (key K) start now, its token then taken; else what holds it:
-- 'n' max_running, 'k' max_running_per_key, 'r' the rate.
local function admit(N, K, L)
  if L.mr and running('an:' .. N, L.mr) >= L.mr then return 'n' end
  if L.mk and K and running('ak:' .. enc(N) .. K, L.mk) >= L.mk then return 'k' end
  if L.rate then
    local b = bucket(N, L)
    if b.tokens < 1 then
      REFUSED[N] = true
      return 'r'
    end
    b.tokens = b.tokens - 1
    b.dirty = true
  end
  return nil
end
local function heldkey(q, kind, N, K)
  if kind == 'k' then return 'h:' .. enc(q) .. 'k' .. enc(N) .. K end
  return 'h:' .. enc(q) .. kind .. N
end
local function park(q, kind, N, K, L, score, member, id)
  local hk = heldkey(q, kind, N, K)
  redis.call('ZADD', P .. hk, score, member)
  redis.call('HSET', rkey(id), 'w', hk)
  local hs = P .. 'hs:' .. q
  if kind == 'n' then
    redis.call('HSETNX', hs, 'n' .. N, '+' .. string.format('%d', L.mr))
  elseif kind == 'r' then
    local b = bucket(N, L)
    redis.call('HSET', hs, 'r' .. N, refill_time(b, L, b.tokens))
  else
    redis.call('HSET', hs, 'k' .. N, string.format('%d', L.mk))
    redis.call('ZADD', P .. 'hk:' .. enc(q) .. N, 'NX', '+inf', K)
  end
  redis.call('SADD', P .. 'hq:' .. N, q)
end
-- Move up to cap parked tasks of set hk (the first in claim order) back to queue q's ready set, within the
-- budget. Returns how many moved and whether the set is now empty.
local function unpark(q, hk, cap)
  local want = cap
  if want > budget then want = budget end
  local moved = 0
  if want >= 1 then
    local popped = redis.call('ZPOPMIN', P .. hk, string.format('%d', want))
    local adds = {}
    for j = 1, #popped, 2 do
      adds[#adds + 1] = popped[j + 1]
      adds[#adds + 1] = popped[j]
    end
    moved = #popped / 2
    budget = budget - moved
    if moved > 0 then bulk('ZADD', ready(q), adds) end
  end
  return moved, redis.call('EXISTS', P .. hk) == 0
end
local function forget_held(q, N)
  local hs = P .. 'hs:' .. q
  if redis.call('HEXISTS', hs, 'n' .. N) == 0 and redis.call('HEXISTS', hs, 'r' .. N) == 0
      and redis.call('HEXISTS', hs, 'k' .. N) == 0 then
    redis.call('SREM', P .. 'hq:' .. N, q)
  end
end
-- Recheck queue q's parked sets that are due, or whose limit the caller does not set (or sets differently).
local function recheck(q)
  local hs = P .. 'hs:' .. q
  local held = redis.call('HGETALL', hs)
  for j = 1, #held, 2 do
    if budget <= 0 then return end
    local f, v = held[j], held[j + 1]
    local kind, N = string.sub(f, 1, 1), string.sub(f, 2)
    local L = LIM[N] or {}
    local plus = string.sub(v, 1, 1) == '+'
    local gone = false
    if kind == 'n' then
      if not L.mr or v == '-' or check() or (plus and tonumber(string.sub(v, 2)) ~= L.mr)
          or (not plus and tonumber(v) and tonumber(v) <= NOW) then
        budget = budget - 1
        local cap = INF
        if L.mr then cap = L.mr - running('an:' .. N, L.mr) end
        local moved, empty = unpark(q, heldkey(q, 'n', N), cap)
        if empty then
          redis.call('HDEL', hs, f)
          gone = true
        elseif cap > moved then
          redis.call('HSET', hs, f, now)
        else
          redis.call('HSET', hs, f, '+' .. string.format('%d', L.mr))
        end
      end
    elseif kind == 'r' then
      local waiting = not plus and tonumber(v) and tonumber(v) > NOW
      if L.rate and waiting and redis.call('EXISTS', P .. heldkey(q, 'r', N)) == 1 then
        REFUSED[N] = true  -- this claim finds due tasks of the name parked for want of a token
      end
      if not L.rate or not waiting then
        budget = budget - 1
        local cap, b = INF, nil
        if L.rate then
          b = bucket(N, L)
          cap = math.floor(b.tokens)
        end
        local moved, empty = unpark(q, heldkey(q, 'r', N), cap)
        if empty then
          redis.call('HDEL', hs, f)
          gone = true
        elseif cap > moved then
          redis.call('HSET', hs, f, now)
        else
          REFUSED[N] = true  -- tasks of the name stay parked: the bucket has no token for them
          redis.call('HSET', hs, f, refill_time(b, L, b.tokens - moved))
        end
      end
    elseif kind == 'k' then
      local hk = P .. 'hk:' .. enc(q) .. N
      local keys
      if not L.mk then
        keys = redis.call('ZRANGE', hk, 0, budget - 1)
      else
        if tonumber(v) ~= L.mk or check() then  -- the limit changed since these tasks were parked (or a leak
          -- is being looked for): recheck every key
          local adds = {}
          for _, K in ipairs(redis.call('ZRANGE', hk, 0, -1)) do
            adds[#adds + 1] = '-inf'
            adds[#adds + 1] = K
          end
          if #adds > 0 then bulk('ZADD', hk, adds) end
          redis.call('HSET', hs, f, string.format('%d', L.mk))
        end
        keys = redis.call('ZRANGEBYSCORE', hk, '-inf', now, 'LIMIT', 0, budget)
      end
      for _, K in ipairs(keys) do
        if budget <= 0 then break end
        budget = budget - 1
        local cap = INF
        if L.mk then cap = L.mk - running('ak:' .. enc(N) .. K, L.mk) end
        local moved, empty = unpark(q, heldkey(q, 'k', N, K), cap)
        if empty then
          redis.call('ZREM', hk, K)
        elseif cap > moved then
          redis.call('ZADD', hk, now, K)
        else
          redis.call('ZADD', hk, '+inf', K)
        end
      end
      if redis.call('EXISTS', hk) == 0 then
        redis.call('HDEL', hs, f)
        gone = true
      end
    else
      redis.call('HDEL', hs, f)  -- not a field this layout writes
    end
    if gone then forget_held(q, N) end
  end
end
-- Cancel PENDING task id of queue q (index member pmember, index score iscore) as expired; gid: its group
-- (its record's g field), which it makes CANCELLED.
local function expire(id, q, pmember, iscore, qfield, gid)
  local key = rkey(id)
  local set = {'s', 'cancelled', 'f', now, 'err', EXPIRED}
  if qfield ~= q then
    set[#set + 1] = 'q'
    set[#set + 1] = q
  end
  redis.call('HSET', key, unpack(set))
  redis.call('ZREM', idx('pending', q), pmember)
  redis.call('ZADD', idx('cancelled', q), iscore, pmember)
  if gid then member_ended(gid, id, 'cancelled', now, nil, callid, {}) end
  notify('s', id)
end
-- Cancel queue q's due tasks whose expiry passed, wherever they wait (ready, delayed, parked).
local function sweep(q)
  if sweeps <= 0 then return end
  local xk = expiring(q)
  local found = redis.call('ZRANGEBYSCORE', xk, '-inf', now, 'LIMIT', 0, sweeps)
  sweeps = sweeps - #found
  for _, id in ipairs(found) do
    local key = rkey(id)
    local cur = redis.call('HMGET', key, 'q', 'o', 'w', 'rs', 'ex', 'n', 'ck', 'g')
    local o = cur[2]
    local iscore = nil
    if type(o) == 'string' then iscore = redis.call('ZSCORE', idx('pending', q), o .. id) end
    local ex = tonumber(cur[5])
    if iscore and ex and ex <= NOW and type(cur[4]) == 'string' and cur[4] <= SNOW then
      nudge(q, cur[6], cur[7], unplace(id, q, cur[3], cur[4], o))
      expire(id, q, o .. id, iscore, cur[1], cur[8])
    else
      redis.call('ZREM', xk, id)  -- not pending here, or not due and expired: the entry is stale
    end
  end
end
-- Move queue q's due delayed tasks to its ready set (by their priority), in run_at order.
local function promote(q)
  if moves <= 0 then return end
  local dk = delayed(q)
  local due = redis.call('ZRANGEBYSCORE', dk, '-inf', now, 'LIMIT', 0, moves)
  if #due == 0 then return end
  moves = moves - #due
  local adds = {}
  for _, member in ipairs(due) do
    adds[#adds + 1] = pscore(redis.call('HGET', rkey(string.sub(member, 33)), 'pr'))
    adds[#adds + 1] = member
  end
  bulk('ZREM', dk, due)
  bulk('ZADD', ready(q), adds)
end
-- The reply's length is kept in NOUT: 25 values per task, each `#out + 1` a search of the growing table.
local NOUT = #out
local function taken(out, token, id, rec)
  local m = NOUT
  out[m + 1] = token
  out[m + 2] = id
  for i = 1, 9 do out[m + 2 + i] = rec[i] end
  out[m + 12] = now
  out[m + 13] = false
  out[m + 14] = lease
  for i = 10, 20 do out[m + 5 + i] = rec[i] end
  NOUT = m + 25
end
-- The queues whose ready set take() left a member in (one it fetched but did not examine, or not due): the
-- wake-up at the end need not look.
local LEFT = {}
-- Pairs list (score, member, ...) in reverse order of its pairs, after those of list `back`.
local function reversed(list, back)
  for j = #list - 1, 1, -2 do
    back[#back + 1] = list[j]
    back[#back + 1] = list[j + 1]
  end
  return back
end
-- Take queue q's ready tasks in order: cancel the expired, park the held back, lease the rest.
local function take(q)
  local rk, pk = ready(q), idx('pending', q)
  local removed, unpending, active, xrem = {}, {}, {}, {}
  local off = 0
  while n < limit and budget > 0 do
    local want = limit - n + 16
    if want > budget + limit - n then want = budget + limit - n end
    local page = redis.call('ZRANGE', rk, off, off + want - 1)
    if #page == 0 then break end
    off = off + #page
    for _, member in ipairs(page) do
      if n >= limit or budget <= 0 then
        LEFT[q] = true
        break
      end
      budget = budget - 1  -- given back when the task is leased: the bound is on the others
      -- Due when its 16 hex digits of run_at are at most now's (hex digits sort before 'g'); else it was
      -- moved here by a claim with a later clock.
      if member >= DUE then
        LEFT[q] = true
      else
        local pmember = string.sub(member, 17)
        local id = string.sub(member, 33)
        local key = rkey(id)
        local rec = redis.call('HMGET', key, unpack(TAKEN))
        if not (rec[1] or rec[2] or rec[4]) and redis.call('EXISTS', key) == 0 then
          removed[#removed + 1] = member  -- the record is gone: drop its entries
          unpending[#unpending + 1] = pmember
        else
          -- The active index is scored by enqueued_at; the pending index holds the same score when the
          -- record's own field is damaged.
          -- The usual repr of a time is passed on as it is (no number made of it and written out again).
          local iscore = rec[8]
          if not (iscore and #iscore <= 24 and string.find(iscore, '^%d+%.%d+$')) then
            iscore = tonumber(iscore)
            if not iscore or iscore ~= iscore then
              iscore = tonumber(redis.call('ZSCORE', pk, pmember)) or 0
            end
          end
          local N, K = rec[1], rec[14]
          local ex = tonumber(rec[15])
          local L = N and LIM[N]
          local kind = nil
          if ex and ex <= NOW then
            kind = 'expired'
          elseif L then
            kind = admit(N, K, L)
          end
          if kind == 'expired' then
            expire(id, q, pmember, iscore, rec[2], rec[20])
            removed[#removed + 1] = member
            xrem[#xrem + 1] = id
            nudge(q, N, K, 'rd:' .. q)
          elseif kind then
            park(q, kind, N, K, L, redis.call('ZSCORE', rk, member), member, id)
            removed[#removed + 1] = member
          else
            n = n + 1
            budget = budget + 1
            local token = callid .. ':' .. n
            if rec[20] then token = token .. 'g' end  -- a group member's token says so (see settle)
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
            if N then
              -- Counted in the running sets of its name (and key) until it leaves ACTIVE; rn says which, so
              -- release() undoes exactly this whatever the other fields hold by then.
              local names = NAMES[N]
              if not names then
                names = {'an:' .. N, enc(N)}
                NAMES[N] = names
              end
              count_in(names[1], id)
              local rn = names[2]
              if K then
                count_in('ak:' .. rn .. K, id)
                rn = rn .. ':' .. K
              end
              set[#set + 1] = 'rn'
              set[#set + 1] = rn
            end
            redis.call('HSET', key, unpack(set))
            rec[4] = 'active'
            if rec[15] then xrem[#xrem + 1] = id end
            active[#active + 1] = iscore
            active[#active + 1] = pmember
            ids[n] = id
            removed[#removed + 1] = member
            unpending[#unpending + 1] = pmember
            taken(out, token, id, rec)
          end
        end
      end
    end
    -- A short page was the set's end (this call only removes members, at its end): no ZRANGE to find it.
    if #page < want then break end
  end
  bulk('ZREM', rk, removed)
  bulk('ZREM', pk, unpending)
  bulk('ZREM', expiring(q), xrem)
  -- KEPT first (see there). The rest in reverse, should the set be a listpack all the same (a server with a
  -- larger zset-max-listpack-value): each ZADD walks it from its head, parsing every score, to the first
  -- greater entry, so ascending entries would each walk past the ones added before them.
  if #active > 0 then bulk('ZADD', idx('active', q), reversed(active, {'+inf', KEPT})) end
end

for qi = qfirst, #ARGV do
  if n >= limit or budget <= 0 then break end
  local q = ARGV[qi]
  if not paused[q] then
    sweep(q)
    promote(q)
    recheck(q)
    take(q)
  end
end
if budget <= 0 or moves <= 0 or sweeps <= 0 then out[1] = '1' end
if n >= limit then
  -- More may be due than this call could take: wake another idle worker for the first queue that has some.
  for qi = qfirst, #ARGV do
    local q = ARGV[qi]
    if not paused[q] and (LEFT[q] or redis.call('ZRANGE', ready(q), 0, 0)[1]
        or redis.call('ZRANGEBYSCORE', delayed(q), '-inf', now, 'LIMIT', 0, 1)[1]) then
      wake(q)
      break
    end
  end
end
for N, b in pairs(BUCKETS) do
  if b.dirty then redis.call('HSET', P .. 'tb', N, string.format('%.17g %.17g', b.tokens, b.at)) end
end
for N in pairs(REFUSED) do redis.call('HINCRBY', P .. 'tr', N, 1) end
for setkey, ids in pairs(ADDED) do bulk('SADD', P .. setkey, ids) end
if n > 0 then
  local leases = {'+inf', KEPT}  -- first: see there
  for j = 1, n do
    leases[#leases + 1] = lease
    leases[#leases + 1] = ids[j]
  end
  bulk('ZADD', P .. 'leases', leases)
  logged(log, ids, %(ttl)d)
end
notified()
return out
"""

# The lines of the prelude prepare_wait uses (verbatim; test_redis_wait checks them): it runs before every
# wait of an idle worker, and defining the whole prelude's functions and tables on each call cost the server
# about as much time as the rest of the script (the single enqueue's script leaves the prelude out too).
PREPARE_WAIT_PRELUDE = """
local P = ARGV[1]
local function ready(q) return P .. 'rd:' .. q end
local function delayed(q) return P .. 'dl:' .. q end
local function enc(s) return #s .. ':' .. s end
"""

# ARGV: P, alarm key, the caller's now ('' for a plain wait), then the time and what of a due thing the
# caller could not claim ('' ''), the call id of the claim sent behind ('' for a plain wait), then queues...
# Drops stale wake-up tokens (and the caller's alarm) and returns {time, what} of the first thing of the
# queues a claim may act on (or nil): the first ready task (its run_at), the first delayed task, the first
# parked set due for a recheck (a freed slot: -inf; a rate bucket: when it refills). Paused queues are left
# out. Atomic, so a wake-up pushed after it is never lost and one pushed before is reflected in what it
# returns.
# With the caller's now (a wait written together with its BLPOP and a claim behind that): it stores the
# server's TIME and the claim's call id in '<alarm key>:t' for that claim (see the claim script), and when
# the first thing is due by now, or a ready task's run_at is at most WAKE_GRACE ahead of it (the claim behind
# takes that one too), and it is not the one to skip, it rings the alarm, so the BLPOP behind returns at once
# and the claim runs; it then returns {time, what, '1'}.
# Shared by the claim and prepare_wait: the time the 16 hex digits of a claim member stand for (the inverse of
# sortable_time()), as a number; worked on the double's two 32-bit halves, not byte by byte.
_UNSORTABLE = """
local function unsortable(hex)
  local hi, lo = tonumber(string.sub(hex, 1, 8), 16), tonumber(string.sub(hex, 9, 16), 16)
  if hi >= 2147483648 then
    hi = hi - 2147483648
  else
    hi, lo = 4294967295 - hi, 4294967295 - lo
  end
  return (struct.unpack('>d', struct.pack('>I4I4', hi, lo)))
end
"""

_PREPARE_WAIT = """
local timed = ARGV[3] ~= ''
if timed then
  local t = redis.pcall('TIME')
  if t.err then
    redis.call('DEL', ARGV[2] .. ':t')
  else
    redis.call('SET', ARGV[2] .. ':t', t[1] .. ' ' .. t[2] .. ' ' .. ARGV[6], 'EX', '%(kept)d')
  end
end
redis.call('DEL', ARGV[2])
local paused = {}
for _, q in ipairs(redis.call('SMEMBERS', P .. 'paused')) do paused[q] = true end
local best = nil
local soon = false
-- The caller's now as a number (each parse of a time's text costs about 2k instructions), nil when not timed.
local cnow = timed and tonumber(ARGV[3])
-- x: t as a number, when the caller has it.
local function consider(t, what, x)
  x = x or tonumber(t)
  if x and x < math.huge and (best == nil or x < best[3]) then best = {t, what, x} end
end
for i = 7, #ARGV do
  local q = ARGV[i]
  redis.call('DEL', P .. 'w:' .. q)
  if not paused[q] then
    local head = redis.call('ZRANGE', ready(q), '0', '0')[1]
    if head then
      local x = unsortable(string.sub(head, 1, 16))
      local t = string.format('%.17g', x)  -- read back as x exactly (17 significant digits)
      consider(t, head, x)
      if timed and x <= cnow + %(grace)d and (t ~= ARGV[4] or head ~= ARGV[5]) then
        soon = true  -- the claim behind takes it whatever the caller's now (see the claim script)
      end
    end
    local first = redis.call('ZRANGE', delayed(q), '0', '0', 'WITHSCORES')
    if first[1] then consider(first[2], first[1]) end
    local held = redis.call('HGETALL', P .. 'hs:' .. q)
    for j = 1, #held, 2 do
      local f, v = held[j], held[j + 1]
      if string.sub(f, 1, 1) == 'k' then
        local key = redis.call('ZRANGE', P .. 'hk:' .. enc(q) .. string.sub(f, 2), '0', '0', 'WITHSCORES')
        if key[1] then consider(key[2], enc(q) .. f .. key[1]) end
      elseif v == '-' then
        consider('-inf', enc(q) .. f)
      elseif string.sub(v, 1, 1) ~= '+' then
        consider(v, enc(q) .. f)
      end
    end
  end
end
if best and timed and best[3] <= cnow and (best[1] ~= ARGV[4] or best[2] ~= ARGV[5]) then
  soon = true
end
if soon then
  redis.call('LPUSH', ARGV[2], '1')
  return {best[1], best[2], '1'}
end
if best then return {best[1], best[2]} end
return nil
"""

# ARGV: P, queue. Pauses the queue (idempotent).
_PAUSE = """
redis.call('SADD', P .. 'paused', ARGV[2])
return 1
"""

# ARGV: P, queue. Resumes the queue (idempotent) and wakes its idle workers (when it holds tasks at all).
_RESUME = """
local q = ARGV[2]
if redis.call('SREM', P .. 'paused', q) == 1 and redis.call('SISMEMBER', P .. 'queues', q) == 1 then
  wake(q)
end
return 1
"""

# ARGV: P, name, has key ('0'/'1'), key. Returns {running, running for the key, the stored bucket or nil, the
# refused count or nil}.
_FLOW_STATE = """
local N = ARGV[2]
local for_key = 0
if ARGV[3] == '1' then for_key = redis.call('SCARD', P .. 'ak:' .. enc(N) .. ARGV[4]) end
return {redis.call('SCARD', P .. 'an:' .. N), for_key, redis.call('HGET', P .. 'tb', N),
  redis.call('HGET', P .. 'tr', N)}
"""

# ARGV: P, chunk. Moves an older store to the current layout. Layout 1 to 2, at most `chunk` entries per
# call: the queues' pending sets {P}:r:<queue> (score run_at, member o .. id) become delayed sets (a claim
# moves the due tasks to the ready sets); then the ACTIVE tasks are counted in the running sets. Layout 2 to
# 3 (groups, cancellation of running tasks, progress) adds keys and record fields whose absence means what an
# older record means (no group, nothing asked, no progress), and layout 3 to 4 the KEPT member of the leases
# and active index sets (see the prelude), which the next claim adds: only the version changes. Returns the
# layout version when done, 0 when more calls are needed. Idempotent: safe to run from several processes at
# once and to repeat.
_MIGRATE = """
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
local chunk = tonumber(ARGV[2])
local layout = tonumber(redis.call('GET', P .. 'layout') or '0')
if layout >= %(version)d then return layout end
if layout >= 2 then
  redis.call('SET', P .. 'layout', '%(version)d')
  return %(version)d
end
local queues = redis.call('SMEMBERS', P .. 'queues')
for _, q in ipairs(queues) do
  local old = P .. 'r:' .. q
  local page = redis.call('ZRANGE', old, 0, chunk - 1, 'WITHSCORES')
  if #page > 0 then
    local adds, gone = {}, {}
    for j = 1, #page, 2 do
      local member, score = page[j], page[j + 1]
      local id = string.sub(member, 17)
      local rs = sortable(tonumber(score))
      adds[#adds + 1] = score
      adds[#adds + 1] = rs .. member
      gone[#gone + 1] = member
      if redis.call('EXISTS', rkey(id)) == 1 then redis.call('HSET', rkey(id), 'rs', rs) end
    end
    bulk('ZADD', delayed(q), adds)
    bulk('ZREM', old, gone)
    return 0
  end
end
for _, q in ipairs(queues) do
  for _, member in ipairs(redis.call('ZRANGE', idx('active', q), 0, -1)) do
    local id = string.sub(member, 17)
    local N = redis.call('HGET', rkey(id), 'n')
    if N then
      redis.call('SADD', P .. 'an:' .. N, id)
      redis.call('HSET', rkey(id), 'rn', enc(N))
    end
  end
end
redis.call('SET', P .. 'layout', '%(version)d')
return %(version)d
"""


def _claim_scripts() -> dict[str, LuaScript]:
    found = (
        script(
            "claim",
            # The prelude after the plain path, which returns before it is defined (see _CLAIM_PLAIN).
            _UNSORTABLE + _CLAIM_HEAD + _CLAIM_PLAIN.replace("%(kept)s", _KEPT) + PRELUDE + _CLAIM,
            prelude="",
            scan=SCAN_BOUND,
            moves=MOVE_BOUND,
            sweeps=EXPIRE_BOUND,
            grace=WAKE_GRACE,
            plain=PLAIN_BOUND,
        ),
        script(
            "prepare_wait",
            _UNSORTABLE + _PREPARE_WAIT,
            prelude=PREPARE_WAIT_PRELUDE,
            kept=3700,
            grace=WAKE_GRACE,
        ),
        script("pause", _PAUSE),
        script("resume", _RESUME),
        script("flow_state", _FLOW_STATE),
        script("migrate", _MIGRATE, version=LAYOUT_VERSION),
    )
    return {each.name: each for each in found}


CLAIM_SCRIPTS: dict[str, LuaScript] = _claim_scripts()
"""The claim script and the scripts sharing its bookkeeping, by name."""
