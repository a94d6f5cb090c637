-- Admits a request: takes all of its demands, or none.
-- KEYS[1]: the reservation record; KEYS[1 + i]: demand i's key (a monthly key with month).
-- ARGV: month, its end (ms), its counters' expiry (ms), request id, lease_ms, hold_ms, then
-- four per demand: kind, amount, and the limit (rate: per_minute, capacity in parts;
-- concurrency: max, 0; monthly: limit, 0).
-- Reply (-1: none, or never):
--   {0, month, then limit, remaining, reset_ms per demand}     admitted
--   {1, index, retry_after_ms, limit, remaining, reset_ms}      rejected, nothing taken
--   {2, month}   monthly keys name another month than Redis's clock: ask again with this one
local now = now_ms()
local month = month_of(now)
local month_end, expire_at = tonumber(ARGV[2]), tonumber(ARGV[3])
local id, lease_ms = ARGV[4], tonumber(ARGV[5])
-- ARGV before the limits'.
local HEADER = 6
local count = #KEYS - 1

-- Field n of limit i.
local function field(i, n) return ARGV[HEADER + 4 * (i - 1) + n] end

for i = 1, count do
  if field(i, 1) == 'monthly' and tonumber(ARGV[1]) ~= month then return {2, month} end
end

-- Decide every demand before writing anything, so that a refusal writes nothing.
local reply, writes = {0, month}, {}
local function rejected(i, retry, snapshot)
  return {1, i - 1, retry, snapshot[1], snapshot[2], snapshot[3]}
end
for i = 1, count do
  local key, kind = KEYS[i + 1], field(i, 1)
  local amount, p, q = tonumber(field(i, 2)), tonumber(field(i, 3)), tonumber(field(i, 4))
  local snapshot
  if kind == 'rate' then
    local level, last = bucket_now(key, p, q, now)
    local took, after = bucket_take(level, amount, p, q)
    if not took then return rejected(i, after, bucket_snapshot(level, p, q)) end
    writes[i] = function() bucket_write(key, after, last, p, q) end
    snapshot = bucket_snapshot(after, p, q)
  elseif kind == 'concurrency' then
    local live = leases_live(key, now)
    if live + amount > p then return rejected(i, -1, leases_snapshot(live, p)) end
    -- The service sends amount 0 (a check) or 1 (one lease named by the request id).
    writes[i] = function() if amount > 0 then lease_take(key, id, now, lease_ms) end end
    snapshot = leases_snapshot(live + amount, p)
  elseif kind == 'monthly' then
    local total = month_total(key)
    if amount > p - total then
      local retry = amount <= p and month_end - now or -1
      return rejected(i, retry, month_snapshot(total, p, month_end - now))
    end
    writes[i] = function() month_add(key, amount, expire_at) end
    snapshot = month_snapshot(total + amount, p, month_end - now)
  else
    return redis.error_reply('unknown limit kind ' .. tostring(kind))
  end
  for _, value in ipairs(snapshot) do reply[#reply + 1] = value end
end

for i = 1, count do writes[i]() end
redis.call('SET', KEYS[1], '1', 'PX', ARGV[6])
return reply
