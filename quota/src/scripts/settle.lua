-- Settles one admitted request, at most once: the reservation record admission wrote is
-- deleted here, and without it nothing changes.
-- KEYS[1]: the reservation record; KEYS[1 + i]: item i's key (a monthly key with the month
-- charged). ARGV: request id, the month's counters' expiry (ms), then five per item: kind,
-- reserved, actual, and the limit as in admit.lua.
-- Reply: 0 settled, 1 duplicate.
if redis.call('DEL', KEYS[1]) == 0 then return 1 end
local now = now_ms()
local id, expire_at = ARGV[1], tonumber(ARGV[2])
-- ARGV before the items'.
local HEADER = 2
-- Field n of item i.
local function field(i, n) return ARGV[HEADER + 5 * (i - 1) + n] end

for i = 1, #KEYS - 1 do
  local key = KEYS[i + 1]
  local kind = field(i, 1)
  local reserved, actual = tonumber(field(i, 2)), tonumber(field(i, 3))
  local p, q = tonumber(field(i, 4)), tonumber(field(i, 5))
  if kind == 'rate' then
    if actual ~= reserved then
      local level, last = bucket_now(key, p, q, now)
      bucket_write(key, bucket_settle(level, reserved, actual, q), last, p, q)
    end
  elseif kind == 'concurrency' then
    if reserved > 0 then redis.call('ZREM', key, id) end
  elseif kind == 'monthly' then
    if actual ~= reserved then month_add(key, actual - reserved, expire_at) end
  else
    return redis.error_reply('unknown limit kind ' .. tostring(kind))
  end
end
return 0
