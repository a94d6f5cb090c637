-- Gives up a fill lock (the fetch failed or was not storable), so a waiting lookup can
-- take it.
-- KEYS[1]: the fill lock. Reply: 1 if there was one, 0 if not (expired, or stored).
return redis.call('DEL', KEYS[1])
