-- Looks a cached response up; if it is missing and nobody is fetching it, makes the caller
-- its fetcher (the fill lock). The service calls again while another call holds the lock.
-- KEYS[1]: the entry; KEYS[2]: its fill lock. ARGV[1]: fill_ms.
-- Reply: the entry's bytes (a hit); 1: the caller holds the fill lock now; 0: another
-- call holds it.
local entry = redis.call('GET', KEYS[1])
if entry then return entry end
if redis.call('SET', KEYS[2], '1', 'NX', 'PX', ARGV[1]) then return 1 end
return 0
