-- Reads limits without changing them.
-- KEYS[i]: item i's key (a monthly key with month). ARGV: month, its end (ms), then three
-- per item: kind and the limit as in admit.lua.
-- Reply: {0, month, then limit, remaining, reset_ms, used per item}, or {2, month} as in
-- admit.lua.
local now = now_ms()
local month = month_of(now)
local month_end = tonumber(ARGV[2])
-- ARGV before the limits'.
local HEADER = 2

-- Field n of limit i.
local function field(i, n) return ARGV[HEADER + 3 * (i - 1) + n] end

for i = 1, #KEYS do
  if field(i, 1) == 'monthly' and tonumber(ARGV[1]) ~= month then return {2, month} end
end

local reply = {0, month}
for i = 1, #KEYS do
  local key, kind = KEYS[i], field(i, 1)
  local p, q = tonumber(field(i, 2)), tonumber(field(i, 3))
  local snapshot, used
  if kind == 'rate' then
    local level = bucket_now(key, p, q, now)
    snapshot, used = bucket_snapshot(level, p, q), bucket_used(level, q)
  elseif kind == 'concurrency' then
    used = leases_live(key, now)
    snapshot = leases_snapshot(used, p)
  elseif kind == 'monthly' then
    used = month_total(key)
    snapshot = month_snapshot(used, p, month_end - now)
  else
    return redis.error_reply('unknown limit kind ' .. tostring(kind))
  end
  reply[#reply + 1] = snapshot[1]
  reply[#reply + 1] = snapshot[2]
  reply[#reply + 1] = snapshot[3]
  reply[#reply + 1] = used
end
return reply
