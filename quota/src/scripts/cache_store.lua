-- Stores a cached response in place of its fill lock, within the tenant's byte cap.
-- KEYS: the entry, its fill lock, then the tenant's index (zset: member = hex key, score =
-- expiry in ms), sizes (hash: member -> bytes) and bytes (string: the indexed total).
-- ARGV: the hex key, ttl_ms, tenant_max_bytes, the prefix of the tenant's entry keys
-- (prefix .. member is a member's entry, in the same hash slot), the entry's bytes.
-- Reply: {1, evicted} stored, evicting that many unexpired entries; {0, 0} refused: the
-- entry alone is over the cap.
local entry, fill, index, sizes, bytes = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local member, ttl_ms, max = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local prefix, value = ARGV[4], ARGV[5]
local size = string.len(value)
-- Expired members dropped per call, so that one call stays short.
local EXPIRED_PER_CALL = 100

redis.call('DEL', fill)
if size > max then return {0, 0} end
local now = now_ms()
local total = stored_integer(redis.call('GET', bytes)) or 0

-- Drops a member from the bookkeeping (its entry is the caller's business).
local function forget(m)
  total = total - (stored_integer(redis.call('HGET', sizes, m)) or 0)
  redis.call('HDEL', sizes, m)
  redis.call('ZREM', index, m)
end

-- Entries past their expiry are gone from Redis already; their sizes go too.
local expired = redis.call('ZRANGEBYSCORE', index, '-inf', int(now), 'LIMIT', 0, EXPIRED_PER_CALL)
for _, m in ipairs(expired) do
  redis.call('DEL', prefix .. m)
  forget(m)
end
-- A replaced entry's old size is no longer held.
if redis.call('ZSCORE', index, member) then forget(member) end
-- Bookkeeping partly lost (evicted by Redis, say) heals instead of drifting.
if redis.call('ZCARD', index) == 0 then
  total = 0
  redis.call('DEL', sizes)
elseif total < 0 then
  total = 0
end

local evicted = 0
while total + size > max do
  local popped = redis.call('ZPOPMIN', index)
  if #popped == 0 then
    total = 0
    break
  end
  local m, expiry = popped[1], tonumber(popped[2])
  redis.call('DEL', prefix .. m)
  total = total - (stored_integer(redis.call('HGET', sizes, m)) or 0)
  redis.call('HDEL', sizes, m)
  -- An expired entry beyond this call's sweep was gone anyway: not an eviction.
  if expiry > now then evicted = evicted + 1 end
end
if total < 0 then total = 0 end

redis.call('SET', entry, value, 'PX', int(ttl_ms))
redis.call('ZADD', index, int(now + ttl_ms), member)
redis.call('HSET', sizes, member, int(size))
redis.call('SET', bytes, int(total + size))
-- The bookkeeping lives as long as the tenant's last entry, then goes with it.
local last = redis.call('ZRANGE', index, -1, -1, 'WITHSCORES')
local keep = math.max(tonumber(last[2]) - now, ttl_ms)
for _, key in ipairs({index, sizes, bytes}) do redis.call('PEXPIRE', key, int(keep)) end
return {1, evicted}
