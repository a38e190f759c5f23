"""The Lua scripts behind the Redis stores.

Each script touches exactly one key, so every store works on Redis Cluster (the keys
also carry a hash tag). Time is the server's (``TIME``), in microseconds, so processes
on machines with skewed clocks still agree. Numbers go back as strings: Redis turns Lua
numbers into integers, and ``tostring`` keeps only 14 digits.
"""

from __future__ import annotations

__all__ = ["BREAKER", "BULKHEAD", "IDEMPOTENCY_CLAIM", "IDEMPOTENCY_WRITE", "LIMITER"]

# GCRA with reservations. ARGV: interval_us, tolerance_us, weight, max_wait_us (-1: no
# limit), refund_tat ("" unless giving back a reservation), batch (optional: take up to
# this many units at once when at least `weight` of them conform now).
# Returns {1, wait_us, reserved_tat}: admitted once wait_us has passed (0: at once), or
# {0, wait_us}: rejected, it would have had to wait wait_us; or, for a refund, {1} or {0};
# or, for a batch, {1, '0', reserved_tat, granted, first_slot_us}: `granted` units taken
# now, unit i (from 0) occupying the GCRA slot that starts first_slot_us + i * interval_us
# after the server's now.
LIMITER = """
local key = KEYS[1]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local weight = tonumber(ARGV[3])
local stored = redis.call('GET', key)
local tat = now
if stored then
  tat = tonumber(stored)
  if tat < now then tat = now end
end
if ARGV[5] ~= '' then
  -- Give back a reservation, but only if nothing was reserved after it: moving the
  -- theoretical arrival time back under a later reservation could over-admit.
  if stored == ARGV[5] then
    local back = tonumber(stored) - weight * interval
    if back > now then
      redis.call('SET', key, string.format('%.0f', back), 'PX', math.ceil((back - now) / 1000) + 1)
    else
      redis.call('DEL', key)
    end
    return {1}
  end
  return {0}
end
local batch = tonumber(ARGV[6] or '0')
if batch > weight then
  -- every unit that conforms now (the same test as below: 1 us of rounding allowed)
  local fits = math.floor((now + tolerance + 1 - tat) / interval)
  if fits > batch then fits = batch end
  if fits >= weight then
    local batch_tat = math.ceil(tat + fits * interval)
    local taken = string.format('%.0f', batch_tat)
    redis.call('SET', key, taken, 'PX', math.ceil((batch_tat - now) / 1000) + 1)
    return {1, '0', taken, tostring(fits), string.format('%.0f', tat - now)}
  end
end
local new_tat = math.ceil(tat + weight * interval)
local wait = new_tat - now - tolerance
-- new_tat is rounded up to a whole microsecond while the tolerance is fractional: a
-- request that conforms exactly must not be told to wait that rounding (1 us at most).
if wait <= 1 then wait = 0 end
wait = math.ceil(wait)
local max_wait = tonumber(ARGV[4])
if max_wait >= 0 and wait > max_wait then
  return {0, string.format('%.0f', wait)}
end
local reserved = string.format('%.0f', new_tat)
redis.call('SET', key, reserved, 'PX', math.ceil((new_tat - now) / 1000) + 1)
return {1, string.format('%.0f', wait), reserved}
"""

# The circuit breaker: one hash per breaker.
# Fields: s state (c/o/h), g generation, oa opened at (us), f forced (0/1),
# cf consecutive failures, p probes in flight, pa probes granted at (us),
# r ring of recent outcomes ('0'/'1'), rp ring position, rl ring length, rf failures in ring.
# ARGV: op (acquire | record | peek | open | close | half_open), reset_us, max_probes,
#       probe_lease_us, threshold, rate (-1: consecutive mode), window, minimum_calls,
#       pending_successes, pending_gen, gen, outcome (s success, f failure, n neutral).
# Returns {verdict, state, gen, consecutive, retry_after_us, transitions...} where verdict is
# 1 (admitted / recorded) or 0 (rejected) and transitions is a flat list of old,new,reason.
BREAKER = """
local key = KEYS[1]
local op = ARGV[1]
local reset = tonumber(ARGV[2])
local max_probes = tonumber(ARGV[3])
local probe_lease = tonumber(ARGV[4])
local threshold = tonumber(ARGV[5])
local rate = tonumber(ARGV[6])
local window = tonumber(ARGV[7])
local minimum = tonumber(ARGV[8])
local pending = tonumber(ARGV[9])
local pending_gen = ARGV[10]
local gen_of_call = ARGV[11]
local outcome = ARGV[12]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])

local h = redis.call('HMGET', key, 's', 'g', 'oa', 'f', 'cf', 'p', 'pa', 'r', 'rp', 'rl', 'rf')
local s = h[1] or 'c'
local g = tonumber(h[2] or '0')
local oa = tonumber(h[3] or '0')
local forced = h[4] or '0'
local cf = tonumber(h[5] or '0')
local p = tonumber(h[6] or '0')
local pa = tonumber(h[7] or '0')
local ring = h[8] or ''
local rp = tonumber(h[9] or '0')
local rl = tonumber(h[10] or '0')
local rf = tonumber(h[11] or '0')
local changes = {}
local dirty = false  -- write back only what changed: a closed acquire writes nothing
local names = {c = 'closed', o = 'open', h = 'half_open'}

local function move(new, reason)
  if s == new then return end
  dirty = true
  table.insert(changes, names[s])
  table.insert(changes, names[new])
  table.insert(changes, reason)
  s = new
  g = g + 1
  p = 0
  if new == 'o' then oa = now end
  if new == 'h' then pa = now end
  if new == 'c' then
    cf = 0
    ring = ''
    rp = 0
    rl = 0
    rf = 0
    forced = '0'
  end
end

local function push(bit, times)
  -- add `times` outcomes `bit` to the ring; only the last `window` matter
  if times > window then times = window end
  dirty = true
  for _ = 1, times do
    local old = nil
    if rl == window then
      old = string.sub(ring, rp + 1, rp + 1)
      if old == '1' then rf = rf - 1 end
    else
      rl = rl + 1
    end
    if #ring < window then
      ring = ring .. bit
    else
      ring = string.sub(ring, 1, rp) .. bit .. string.sub(ring, rp + 2)
    end
    if bit == '1' then rf = rf + 1 end
    rp = (rp + 1) % window
  end
end

local function settle(call_gen, failed, times)
  if tostring(g) ~= call_gen or forced == '1' then return end
  if s == 'c' then
    if rate >= 0 then
      push(failed and '1' or '0', times)
      if rl >= minimum and rf >= rate * rl then move('o', 'failure rate reached') end
    elseif failed then
      cf = cf + times
      dirty = true
      if cf >= threshold then move('o', 'failure threshold reached') end
    elseif cf ~= 0 then
      cf = 0
      dirty = true
    end
  elseif s == 'h' then
    if failed then move('o', 'probe failed') else move('c', 'probe succeeded') end
  end
end

if pending > 0 then settle(pending_gen, false, pending) end

local verdict = 1
local retry_after = -1
if op == 'acquire' then
  if s == 'o' then
    local elapsed = now - oa
    if forced == '1' then
      verdict = 0
    elseif elapsed < reset then
      verdict = 0
      retry_after = reset - elapsed
    else
      move('h', 'reset timeout elapsed')
    end
  end
  if verdict == 1 and s == 'h' then
    if p >= max_probes and now - pa >= probe_lease then
      -- the probes granted earlier never reported back (their process died): re-grant
      p = 0
      pa = now
    end
    if p < max_probes then
      p = p + 1
      dirty = true
    else
      verdict = 0
    end
  end
elseif op == 'record' then
  if outcome == 'n' then
    if s == 'h' and tostring(g) == gen_of_call and p > 0 then
      p = p - 1
      dirty = true
    end
  else
    settle(gen_of_call, outcome == 'f', 1)
  end
elseif op == 'open' then
  move('o', 'forced open')
  forced = '1'
  dirty = true
elseif op == 'close' then
  forced = '0'
  move('c', 'forced closed')
  -- already closed: no transition, but the streak and window are still forgotten
  cf = 0
  ring = ''
  rp = 0
  rl = 0
  rf = 0
  dirty = true
elseif op == 'half_open' then
  -- probe now: the next calls are probes, as if the reset timeout had elapsed
  if forced == '1' then
    forced = '0'
    dirty = true
  end
  move('h', 'forced half-open')
end

if dirty then
  redis.call('HSET', key, 's', s, 'g', g, 'oa', string.format('%.0f', oa), 'f', forced,
    'cf', cf, 'p', p, 'pa', string.format('%.0f', pa), 'r', ring, 'rp', rp, 'rl', rl, 'rf', rf)
end
local reply = {verdict, s, tostring(g), tostring(cf), string.format('%.0f', retry_after),
  tostring(rl), tostring(rf), string.format('%.0f', oa), forced, tostring(p),
  string.format('%.0f', now)}
for _, v in ipairs(changes) do table.insert(reply, v) end
return reply
"""

# The bulkhead: a sorted set of slot holders scored by lease expiry (us).
# ARGV: op (acquire | count | release | renew), limit, lease_us, then
#   acquire, count: the caller's token ('' for count), then tokens this process released
#     and may not have sent yet: removed first, in the same round trip;
#   release, renew: the tokens.
# acquire -> {1, in_use} or {0, in_use, us until the earliest lease expires}
# count -> {1, in_use}; release -> {removed}; renew -> {renewed}
BULKHEAD = """
local key = KEYS[1]
local op = ARGV[1]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local lease = tonumber(ARGV[3])
if op == 'release' then
  return {redis.call('ZREM', key, unpack(ARGV, 4))}
end
if op == 'renew' then
  local renewed = 0
  for i = 4, #ARGV do
    local score = string.format('%.0f', now + lease)
    renewed = renewed + redis.call('ZADD', key, 'XX', 'CH', score, ARGV[i])
  end
  redis.call('PEXPIRE', key, math.ceil(lease / 1000) * 2)
  return {renewed}
end
if #ARGV >= 5 then redis.call('ZREM', key, unpack(ARGV, 5)) end
redis.call('ZREMRANGEBYSCORE', key, '-inf', string.format('%.0f', now))
local used = redis.call('ZCARD', key)
if op == 'count' then return {1, used} end
if used < tonumber(ARGV[2]) then
  redis.call('ZADD', key, string.format('%.0f', now + lease), ARGV[4])
  redis.call('PEXPIRE', key, math.ceil(lease / 1000) * 2)
  return {1, used + 1}
end
local first = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
local until_free = 0
if first[2] then until_free = tonumber(first[2]) - now end
return {0, used, string.format('%.0f', until_free)}
"""

# Idempotency keys: one hash per (saga, key).
# Fields: run, hash, status, owner, lease, expires, result, error, saga, created.
# ARGV: run_id, input_hash, owner, lease_until, now, saga, created_at (wall-clock seconds)
# Returns {outcome, run_id, fields...} with outcome new | done | busy | resume | conflict |
# blocked.
IDEMPOTENCY_CLAIM = """
local key = KEYS[1]
local now = tonumber(ARGV[5])
local h = redis.call('HGETALL', key)
local function claim()
  redis.call('DEL', key)
  redis.call('HSET', key, 'run', ARGV[1], 'hash', ARGV[2], 'status', 'running',
    'owner', ARGV[3], 'lease', ARGV[4], 'saga', ARGV[6], 'created', ARGV[7])
  redis.call('PERSIST', key)
  return {'new', ARGV[1]}
end
if #h == 0 then return claim() end
local f = {}
for i = 1, #h, 2 do f[h[i]] = h[i + 1] end
local function reply(outcome)
  local out = {outcome, f['run']}
  for i = 1, #h do table.insert(out, h[i]) end
  return out
end
if f['hash'] ~= ARGV[2] then return reply('conflict') end
local status = f['status']
if status == 'completed' then
  if f['expires'] == nil or f['expires'] == '' or tonumber(f['expires']) > now then
    return reply('done')
  end
  return claim()
end
if status == 'compensation_failed' then return reply('blocked') end
if status == 'running' or status == 'compensating' then
  if tonumber(f['lease'] or '0') > now then return reply('busy') end
  redis.call('HSET', key, 'owner', ARGV[3], 'lease', ARGV[4])
  return reply('resume')
end
return claim()
"""

# ARGV: run_id, status ('' = unchanged), lease ('' = unchanged), error, result, expires,
#       ttl_ms (0: keep forever)
IDEMPOTENCY_WRITE = """
local key = KEYS[1]
if redis.call('HGET', key, 'run') ~= ARGV[1] then return 0 end
if ARGV[3] ~= '' then redis.call('HSET', key, 'lease', ARGV[3]) end
if ARGV[2] ~= '' then
  local status = ARGV[2]
  if status == 'failed' then
    redis.call('DEL', key)
    return 1
  end
  redis.call('HSET', key, 'status', status, 'error', ARGV[4], 'result', ARGV[5],
    'expires', ARGV[6])
  if status == 'completed' or status == 'compensation_failed' then
    redis.call('HSET', key, 'lease', '0')
  end
  local ttl = tonumber(ARGV[7])
  if ttl > 0 then redis.call('PEXPIRE', key, ttl) end
end
return 1
"""
