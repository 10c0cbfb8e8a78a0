"""The Lua scripts of the Redis limiter store (text only; `redis.py` loads them once and runs them by SHA).

Each script does one whole decision atomically inside Redis with Redis's own clock (`TIME`), so no
replica's clock matters. The arithmetic is the one of `limits.SlidingWindow`, line for line: two fixed
windows per limit (current and previous), the previous one weighted by the share of it that still
overlaps the last `length` seconds. Per limit there are two keys sharing one hash tag, so in a Redis
Cluster they live in one slot:

    {<prefix>:<limit key>}:window   hash: i (window index), rc/rp requests, tc/tp tokens and
                                    pc/pp tokens reserved but not settled yet, each current/previous
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

-- One limit's window hash rolled to `index` (limits.SlidingWindow.roll). Reads only.
local function load(key, index)
  local v = redis.call('HMGET', key, 'i', 'rc', 'rp', 'tc', 'tp', 'pc', 'pp')
  local s = {i = tonumber(v[1]), rc = tonumber(v[2]) or 0, rp = tonumber(v[3]) or 0,
             tc = tonumber(v[4]) or 0, tp = tonumber(v[5]) or 0, pc = tonumber(v[6]) or 0,
             pp = tonumber(v[7]) or 0}
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

local function save(key, s, keep_ms)
  redis.call('HSET', key, 'i', s.i, 'rc', s.rc, 'rp', s.rp, 'tc', s.tc, 'tp', s.tp, 'pc', s.pc, 'pp', s.pp)
  redis.call('PEXPIRE', key, keep_ms)
end

local function keep_ms(length)
  return math.floor(length * 2000) + 1000
end
"""

ACQUIRE_LUA = (
    _PRELUDE
    + """
-- KEYS: per limit, its window hash then its lease set.
-- ARGV: length (s), tokens, lease id, lease ttl (ms), then per limit: rpm, tpm, concurrent (0: none).
-- All limits admit and the request is counted in each: {1, window index}. Else nothing is counted:
-- {0, sec, usec, then per limit: i, rc, rp, tc, tp, pending, leases held}.
local sec, usec, now, now_ms = clock()
local length, cost, lease, ttl = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
local index = math.floor(now / length)
local weight = 1.0 - (now - index * length) / length
local n = #KEYS / 2
local states = {}
local admit = true
for j = 1, n do
  local base = 4 + (j - 1) * 3
  local s = load(KEYS[2 * j - 1], index)
  s.rpm, s.tpm, s.conc = tonumber(ARGV[base + 1]), tonumber(ARGV[base + 2]), tonumber(ARGV[base + 3])
  s.held = 0
  if s.conc > 0 then
    redis.call('ZREMRANGEBYSCORE', KEYS[2 * j], '-inf', now_ms)  -- reclaim leases nobody renewed
    s.held = redis.call('ZCARD', KEYS[2 * j])
    if s.held >= s.conc then admit = false end
  end
  if s.rpm > 0 and s.rp * weight + s.rc + 1 > s.rpm + EPS then admit = false end
  if s.tpm > 0 and cost > 0 and s.tp * weight + s.tc + cost > s.tpm + EPS then admit = false end
  states[j] = s
end
if not admit then
  local out = {0, sec, usec}
  for j = 1, n do
    local s = states[j]
    local row = {s.i, s.rc, s.rp, s.tc, s.tp, s.pc + s.pp, s.held}
    for k = 1, #row do out[#out + 1] = row[k] end
  end
  return out
end
for j = 1, n do
  local s = states[j]
  if s.rpm > 0 or (s.tpm > 0 and cost > 0) then
    if s.rpm > 0 then s.rc = s.rc + 1 end
    if s.tpm > 0 and cost > 0 then
      s.tc = s.tc + cost
      s.pc = s.pc + cost
    end
    save(KEYS[2 * j - 1], s, keep_ms(length))
  end
  if s.conc > 0 then
    redis.call('ZADD', KEYS[2 * j], now_ms + ttl, lease)
    redis.call('PEXPIRE', KEYS[2 * j], ttl * 2)
  end
end
return {1, index}
"""
)

ADJUST_LUA = (
    _PRELUDE
    + """
-- Settle, release or roll back one reservation (limits.KeyState.adjust, plus the lease).
-- KEYS: per limit, its window hash then its lease set.
-- ARGV: length, reserved tokens, requests delta, tokens delta, lease id ('' none), then per limit:
--   the window index it was counted in, counts requests (1/0), counts tokens (1/0), holds the lease (1/0).
local sec, usec, now, now_ms = clock()
local length = tonumber(ARGV[1])
local reserved, dreq, dtok, lease = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5]
local index = math.floor(now / length)

-- Take `amount` back from the window it was counted in, if that window is still remembered.
local function refund(s, cur, prev, at, amount)
  if at == s.i then
    cur = math.max(0, cur - amount)
  elseif at == s.i - 1 then
    prev = math.max(0, prev - amount)
  end
  return cur, prev
end

for j = 1, #KEYS / 2 do
  local base = 5 + (j - 1) * 4
  local at = tonumber(ARGV[base + 1])
  local counts_requests, counts_tokens = ARGV[base + 2] == '1', ARGV[base + 3] == '1'
  if (counts_requests and dreq ~= 0) or (counts_tokens and (reserved > 0 or dtok ~= 0)) then
    local s = load(KEYS[2 * j - 1], index)
    if s.found or dreq > 0 or dtok > 0 then
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
      save(KEYS[2 * j - 1], s, keep_ms(length))
    end
  end
  if ARGV[base + 4] == '1' and lease ~= '' then
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
-- Read-only: the state of some limits now. KEYS: per limit, window hash and lease set. ARGV: length.
-- Returns {sec, usec, then per limit: i, rc, rp, tc, tp, pending, live leases}.
local sec, usec, now, now_ms = clock()
local index = math.floor(now / tonumber(ARGV[1]))
local out = {sec, usec}
for j = 1, #KEYS / 2 do
  local s = load(KEYS[2 * j - 1], index)
  local held = redis.call('ZCOUNT', KEYS[2 * j], '(' .. now_ms, '+inf')
  local row = {s.i, s.rc, s.rp, s.tc, s.tp, s.pc + s.pp, held}
  for k = 1, #row do out[#out + 1] = row[k] end
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
