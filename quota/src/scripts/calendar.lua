-- The UTC calendar month of a time, as sluice::limits::month_index: year * 12 + month - 1,
-- by Howard Hinnant's civil_from_days.
local MS_PER_DAY = 86400000

local function month_of(ms)
  local z = floor_div(ms, MS_PER_DAY) + 719468
  local era = floor_div(z, 146097)
  local day_of_era = z - era * 146097
  local year_of_era = floor_div(day_of_era - floor_div(day_of_era, 1460)
    + floor_div(day_of_era, 36524) - floor_div(day_of_era, 146096), 365)
  local day_of_year = day_of_era
    - (365 * year_of_era + floor_div(year_of_era, 4) - floor_div(year_of_era, 100))
  local shifted_month = floor_div(5 * day_of_year + 2, 153) -- March = 0
  local month = shifted_month < 10 and shifted_month + 3 or shifted_month - 9
  local year = year_of_era + era * 400 + (month <= 2 and 1 or 0)
  return year * 12 + month - 1
end
