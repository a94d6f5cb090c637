-- Extends the leases of requests still in flight. An expired lease is not recreated: its
-- slot went back and may be held by another request by now.
-- KEYS[i]: lease i's limit key. ARGV[1]: lease_ms; ARGV[1 + i]: lease i's request id.
-- Reply: {renewed, lost}.
local now = now_ms()
local lease_ms = tonumber(ARGV[1])
local renewed, lost = 0, 0
for i = 1, #KEYS do
  local key, id = KEYS[i], ARGV[i + 1]
  local expiry = tonumber(redis.call('ZSCORE', key, id))
  if expiry ~= nil and expiry > now then
    -- GT: a lease renewed for longer before is not shortened.
    redis.call('ZADD', key, 'XX', 'GT', int(now + lease_ms), id)
    keep_leases(key, 2 * lease_ms)
    renewed = renewed + 1
  else
    if expiry ~= nil then redis.call('ZREM', key, id) end
    lost = lost + 1
  end
end
return {renewed, lost}
