-- Shared by every script (prepended to each). Lua numbers are doubles: integers are exact
-- below 2^53, and the service refuses any input that could leave that range. Divisions go
-- through fmod, which is exact, so no quotient is ever rounded.

-- floor(a / b) for b > 0, any sign of a.
local function floor_div(a, b)
  local r = math.fmod(a, b)
  local q = (a - r) / b
  if r < 0 then q = q - 1 end
  return q
end

-- ceil(a / b) for a >= 0, b > 0.
local function ceil_div(a, b)
  local r = math.fmod(a, b)
  return (a - r) / b + (r > 0 and 1 or 0)
end

-- An integer as Redis stores it: never in exponent notation.
local function int(n)
  return string.format('%.0f', n)
end

-- Redis's clock, the only clock decisions use.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + floor_div(tonumber(t[2]), 1000)
end

-- A stored integer, or nil for anything else (missing, garbage, NaN, out of the exact range).
local function stored_integer(value)
  local n = tonumber(value)
  if n == nil or n ~= math.floor(n) or math.abs(n) > 9007199254740992 then return nil end
  return n
end
