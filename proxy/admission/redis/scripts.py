"""The Lua scripts of the Redis limiter store (text only; `store.py` loads them once and runs them by SHA).

Each script does one whole decision atomically inside Redis with Redis's own clock (`TIME`), so no
replica's clock matters. The arithmetic is the one of `window.SlidingWindow`, line for line: two fixed
windows per limit and unit (current and previous), the previous one weighted by the share of it that
still overlaps the last `length` seconds. Per limit there are two keys sharing one hash tag, so in a
Redis Cluster they live in one slot:

    {<prefix>:<limit key>}:window   hash, per unit (field suffix: none for the minute, so the layout
                                    of minute-only limits is unchanged; _s, _h, _d): i (window index),
                                    rc/rp requests, tc/tp tokens and pc/pp tokens reserved but not
                                    settled yet, each current/previous
    {<prefix>:<limit key>}:leases   sorted set: concurrency lease id -> expiry (Redis ms)

Numbers are stored as integers; scripts return integers only (RESP truncates Lua floats).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

_PRELUDE = """
local EPS = 1e-9

local function clock()
  local t = redis.call('TIME')
  local sec, usec = tonumber(t[1]), tonumber(t[2])
  return sec, usec, sec + usec / 1000000, sec * 1000 + math.floor(usec / 1000)
end

-- One unit's fields of a limit's window hash, rolled to `index` (limits.SlidingWindow.roll). Reads only.
local function load(key, x, index)
  local v = redis.call('HMGET', key, 'i' .. x, 'rc' .. x, 'rp' .. x, 'tc' .. x, 'tp' .. x, 'pc' .. x, 'pp' .. x)
  local s = {i = tonumber(v[1]), rc = tonumber(v[2]) or 0, rp = tonumber(v[3]) or 0,
             tc = tonumber(v[4]) or 0, tp = tonumber(v[5]) or 0, pc = tonumber(v[6]) or 0,
             pp = tonumber(v[7]) or 0, x = x}
  s.found = s.i ~= nil
  if s.i == nil then s.i = index end
  if s.i ~= index then
    if index == s.i + 1 then
      s.rp, s.tp, s.pp = s.rc, s.tc, s.pc
    else
      s.rp, s.tp, s.pp = 0, 0, 0
    end
    s.rc, s.tc, s.pc = 0, 0, 0
    s.i = index
  end
  return s
end

local function save(key, s)
  local x = s.x
  redis.call('HSET', key, 'i' .. x, s.i, 'rc' .. x, s.rc, 'rp' .. x, s.rp, 'tc' .. x, s.tc, 'tp' .. x, s.tp,
             'pc' .. x, s.pc, 'pp' .. x, s.pp)
end
"""

ACQUIRE_LUA = (
    _PRELUDE
    + """
-- KEYS: per limit, its window hash then its lease set.
-- ARGV: tokens, lease id, lease ttl (ms), headroom (the share of every limit to leave free), then per
--   limit: concurrent (0: none), hash expiry (ms), units n, then per unit: field suffix, length (s),
--   requests limit, tokens limit (0: none).
-- All limits admit and the request is counted in each: {1, sec, usec}. Else nothing is counted:
-- {0, sec, usec, then per limit: leases held, then per unit: i, rc, rp, tc, tp, pending}.
local sec, usec, now, now_ms = clock()
local cost, lease, ttl = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
local keep = 1.0 - tonumber(ARGV[4])
local pos = 5
local limits = {}
local admit = true
for j = 1, #KEYS / 2 do
  local l = {conc = tonumber(ARGV[pos]), expiry = tonumber(ARGV[pos + 1]), held = 0, units = {}}
  local n = tonumber(ARGV[pos + 2])
  pos = pos + 3
  if l.conc > 0 then
    redis.call('ZREMRANGEBYSCORE', KEYS[2 * j], '-inf', now_ms)  -- reclaim leases nobody renewed
    l.held = redis.call('ZCARD', KEYS[2 * j])
    if l.held + 1 > l.conc * keep + EPS then admit = false end
  end
  for u = 1, n do
    local length = tonumber(ARGV[pos + 1])
    local index = math.floor(now / length)
    local weight = 1.0 - (now - index * length) / length
    local s = load(KEYS[2 * j - 1], ARGV[pos], index)
    s.rl, s.tl = tonumber(ARGV[pos + 2]), tonumber(ARGV[pos + 3])
    pos = pos + 4
    if s.rl > 0 and s.rp * weight + s.rc + 1 > s.rl * keep + EPS then admit = false end
    if s.tl > 0 and cost > 0 and s.tp * weight + s.tc + cost > s.tl * keep + EPS then admit = false end
    l.units[u] = s
  end
  limits[j] = l
end
if not admit then
  local out = {0, sec, usec}
  for j = 1, #limits do
    out[#out + 1] = limits[j].held
    for _, s in ipairs(limits[j].units) do
      local row = {s.i, s.rc, s.rp, s.tc, s.tp, s.pc + s.pp}
      for k = 1, #row do out[#out + 1] = row[k] end
    end
  end
  return out
end
for j = 1, #limits do
  local l = limits[j]
  local saved = false
  for _, s in ipairs(l.units) do
    if s.rl > 0 or (s.tl > 0 and cost > 0) then
      if s.rl > 0 then s.rc = s.rc + 1 end
      if s.tl > 0 and cost > 0 then
        s.tc = s.tc + cost
        s.pc = s.pc + cost
      end
      save(KEYS[2 * j - 1], s)
      saved = true
    end
  end
  if saved then redis.call('PEXPIRE', KEYS[2 * j - 1], l.expiry) end
  if l.conc > 0 then
    redis.call('ZADD', KEYS[2 * j], now_ms + ttl, lease)
    redis.call('PEXPIRE', KEYS[2 * j], ttl * 2)
  end
end
return {1, sec, usec}
"""
)

ADJUST_LUA = (
    _PRELUDE
    + """
-- Settle, release or roll back one reservation (limits.KeyState.adjust, plus the lease).
-- KEYS: per limit, its window hash then its lease set.
-- ARGV: reserved tokens, requests delta, tokens delta, lease id ('' none), then per limit: the sec and usec
--   it was counted at, holds the lease (1/0), hash expiry (ms), units n, then per unit: field suffix,
--   length (s), counts requests (1/0), counts tokens (1/0).
local sec, usec, now, now_ms = clock()
local reserved, dreq, dtok, lease = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]

-- Take `amount` back from the window it was counted in, if that window is still remembered.
local function refund(s, cur, prev, at, amount)
  if at == s.i then
    cur = math.max(0, cur - amount)
  elseif at == s.i - 1 then
    prev = math.max(0, prev - amount)
  end
  return cur, prev
end

local function apply(s, at, counts_requests, counts_tokens)
  if counts_tokens then
    s.pc, s.pp = refund(s, s.pc, s.pp, at, reserved)
    if dtok < 0 then
      s.tc, s.tp = refund(s, s.tc, s.tp, at, -dtok)
    elseif dtok > 0 then
      s.tc = s.tc + dtok
    end
  end
  if counts_requests then
    if dreq < 0 then
      s.rc, s.rp = refund(s, s.rc, s.rp, at, -dreq)
    elseif dreq > 0 then
      s.rc = s.rc + dreq
    end
  end
end

local pos = 5
for j = 1, #KEYS / 2 do
  local counted = tonumber(ARGV[pos]) + tonumber(ARGV[pos + 1]) / 1000000
  local holds, expiry, n = ARGV[pos + 2] == '1', tonumber(ARGV[pos + 3]), tonumber(ARGV[pos + 4])
  pos = pos + 5
  local saved = false
  for u = 1, n do
    local length = tonumber(ARGV[pos + 1])
    local counts_requests, counts_tokens = ARGV[pos + 2] == '1', ARGV[pos + 3] == '1'
    if (counts_requests and dreq ~= 0) or (counts_tokens and (reserved > 0 or dtok ~= 0)) then
      local s = load(KEYS[2 * j - 1], ARGV[pos], math.floor(now / length))
      if s.found or dreq > 0 or dtok > 0 then
        apply(s, math.floor(counted / length), counts_requests, counts_tokens)
        save(KEYS[2 * j - 1], s)
        saved = true
      end
    end
    pos = pos + 4
  end
  if saved then redis.call('PEXPIRE', KEYS[2 * j - 1], expiry) end
  if holds and lease ~= '' then
    redis.call('ZREM', KEYS[2 * j], lease)
  end
end
return 1
"""
)

LEASES_LUA = (
    _PRELUDE
    + """
-- Renew (push the expiry out) or forget (remove) many leases in one call.
-- KEYS: lease sets. ARGV: 'renew' | 'forget', ttl (ms), then per key: the number of ids, the ids.
-- Returns how many ids were already gone (renew: lost, e.g. reclaimed after an outage) or removed.
local sec, usec, now, now_ms = clock()
local mode, ttl = ARGV[1], tonumber(ARGV[2])
local pos, count = 3, 0
for j = 1, #KEYS do
  local n = tonumber(ARGV[pos])
  pos = pos + 1
  for k = 1, n do
    local id = ARGV[pos]
    pos = pos + 1
    if mode == 'renew' then
      -- Still present means nobody reclaimed it (reclaiming removes every expired lease at once),
      -- so pushing its expiry out never lets more than the limit in.
      if redis.call('ZSCORE', KEYS[j], id) then
        redis.call('ZADD', KEYS[j], now_ms + ttl, id)
      else
        count = count + 1
      end
    else
      count = count + redis.call('ZREM', KEYS[j], id)
    end
  end
  if mode == 'renew' and n > 0 then redis.call('PEXPIRE', KEYS[j], ttl * 2) end
end
return count
"""
)

SNAPSHOT_LUA = (
    _PRELUDE
    + """
-- Read-only: the state of some limits now. KEYS: per limit, window hash and lease set.
-- ARGV: per limit: units n, then per unit: field suffix, length (s).
-- Returns {sec, usec, then per limit: live leases, then per unit: i, rc, rp, tc, tp, pending}.
local sec, usec, now, now_ms = clock()
local out = {sec, usec}
local pos = 1
for j = 1, #KEYS / 2 do
  out[#out + 1] = redis.call('ZCOUNT', KEYS[2 * j], '(' .. now_ms, '+inf')
  local n = tonumber(ARGV[pos])
  pos = pos + 1
  for u = 1, n do
    local s = load(KEYS[2 * j - 1], ARGV[pos], math.floor(now / tonumber(ARGV[pos + 1])))
    pos = pos + 2
    local row = {s.i, s.rc, s.rp, s.tc, s.tp, s.pc + s.pp}
    for k = 1, #row do out[#out + 1] = row[k] end
  end
end
return out
"""
)


@dataclass(frozen=True, slots=True)
class Script:
    name: str
    text: str
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha", hashlib.sha1(self.text.encode()).hexdigest())  # noqa: S324 - Redis's id


ACQUIRE = Script("acquire", ACQUIRE_LUA)
ADJUST = Script("adjust", ADJUST_LUA)
LEASES = Script("leases", LEASES_LUA)
SNAPSHOT = Script("snapshot", SNAPSHOT_LUA)
SCRIPTS = (ACQUIRE, ADJUST, LEASES, SNAPSHOT)
