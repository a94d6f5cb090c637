-- The three kinds of limit, with the semantics of sluice::limits (bucket.rs, counter.rs).

-- Rate: a token bucket in a hash {level, last_ms}. Levels count parts of 1/60000 of a unit,
-- so a millisecond at per_minute units a minute refills exactly per_minute parts. A missing
-- key is a full bucket, which lets Redis expire a bucket once it would be full.
local PARTS_PER_UNIT = 60000
-- Debt stops here. Capacities are at most 2^52 parts (the service checks), so every level,
-- sum and difference below stays under 2^53, where doubles are exact.
local DEBT_FLOOR = -4503599627370496
-- How long a full bucket is kept before Redis may drop it.
local FULL_BUCKET_KEPT_MS = 60000

-- The bucket at `now`: refilled for the time elapsed and capped at the capacity; a clock
-- that went back refills nothing and never moves last_ms back.
local function bucket_now(key, per_minute, capacity, now)
  local stored = redis.call('HMGET', key, 'level', 'last_ms')
  local level, last = stored_integer(stored[1]), stored_integer(stored[2])
  if level == nil or last == nil then return capacity, now end
  if now > last then
    local refill = (now - last) * per_minute
    if refill >= capacity - level then level = capacity else level = level + refill end
    last = now
  end
  if level > capacity then level = capacity end
  return level, last
end

-- (true, level after) if the bucket holds `amount` units; else (false, ms until it will,
-- or -1 for never: more than the capacity, or no refill).
local function bucket_take(level, amount, per_minute, capacity)
  local need = amount * PARTS_PER_UNIT
  if level >= need then return true, level - need end
  if need > capacity or per_minute == 0 then return false, -1 end
  return false, ceil_div(need - level, per_minute)
end

-- Corrects a reservation: refunds up to the capacity (never lowering a level above it), or
-- charges the extra unconditionally, into debt.
local function bucket_settle(level, reserved, actual, capacity)
  if actual < reserved then
    return math.min(level + (reserved - actual) * PARTS_PER_UNIT, math.max(capacity, level))
  end
  return math.max(level - (actual - reserved) * PARTS_PER_UNIT, DEBT_FLOOR)
end

-- Ms until full; -1 for never.
local function bucket_ms_to_full(level, per_minute, capacity)
  if level >= capacity then return 0 end
  if per_minute == 0 then return -1 end
  return ceil_div(capacity - level, per_minute)
end

-- {limit, remaining, reset_ms}: whole units, floored; nothing remains in debt.
local function bucket_snapshot(level, per_minute, capacity)
  return {
    floor_div(math.max(capacity, 0), PARTS_PER_UNIT),
    floor_div(math.max(level, 0), PARTS_PER_UNIT),
    bucket_ms_to_full(level, per_minute, capacity),
  }
end

-- Whole units below the capacity, rounded up; more than the capacity in debt.
local function bucket_used(level, capacity)
  return ceil_div(math.max(capacity - level, 0), PARTS_PER_UNIT)
end

local function bucket_write(key, level, last, per_minute, capacity)
  redis.call('HSET', key, 'level', int(level), 'last_ms', int(last))
  local to_full = bucket_ms_to_full(level, per_minute, capacity)
  if to_full < 0 then
    redis.call('PERSIST', key)
  else
    redis.call('PEXPIRE', key, int(to_full + FULL_BUCKET_KEPT_MS))
  end
end

-- Concurrency: a sorted set of leases, member = request id, score = expiry (ms). A lease
-- whose expiry is not after now has expired: its slot is free again.
local function leases_live(key, now)
  return redis.call('ZCOUNT', key, '(' .. int(now), '+inf')
end

-- Keeps a lease set at least `ms` longer, never shortening what another lease needs.
local function keep_leases(key, ms)
  local ttl = redis.call('PTTL', key)
  if ttl == -1 or ttl < ms then redis.call('PEXPIRE', key, int(ms)) end
end

local function lease_take(key, id, now, lease_ms)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', int(now))
  redis.call('ZADD', key, int(now + lease_ms), id)
  keep_leases(key, 2 * lease_ms)
end

local function leases_snapshot(live, max)
  return {max, math.max(max - live, 0), 0}
end

-- Monthly: a string counter per month (the month is in the key), kept weeks after the
-- month ends, then dropped by Redis.
local function month_total(key)
  return stored_integer(redis.call('GET', key)) or 0
end

local function month_snapshot(total, limit, to_month_end)
  return {limit, math.max(limit - total, 0), to_month_end}
end

-- Adds `delta` (may be negative), never below zero; a counter without an expiry gets one.
local function month_add(key, delta, expire_at)
  if delta >= 0 or month_total(key) + delta >= 0 then
    redis.call('INCRBY', key, int(delta))
  else
    redis.call('SET', key, '0', 'KEEPTTL')
  end
  if redis.call('PTTL', key) == -1 then redis.call('PEXPIREAT', key, int(expire_at)) end
end
